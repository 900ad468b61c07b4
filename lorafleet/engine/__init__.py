"""Model execution: one base model with many LoRA adapters, run in mixed-adapter batches.

:mod:`~lorafleet.engine.batched_lora` holds the stacked multi-LoRA kernels and
:mod:`~lorafleet.engine.generation` the batched greedy generator built on them. Both the
evaluator and the serving runtime run models through this layer; it imports neither.
"""
