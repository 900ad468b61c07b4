"""Evaluation of candidate adapters: evaluators (loss, generation, task metrics, safety), the
pairwise LLM judge, and the suite that runs a candidate against the base model and production.

See docs/evaluation.md.
"""
