"""The data stages of an expert: validate, synthesize, curate (see docs/data.md).

- :mod:`lorafleet.data.validate`: great-expectations suites per task;
  :mod:`lorafleet.data.report` renders their results as HTML and Markdown.
- :mod:`lorafleet.data.pii`: personal data and off-platform requests.
- :mod:`lorafleet.data.synth`: the generator interface and the programmatic generator;
  :mod:`lorafleet.data.teacher`: the resumable teacher-LLM generator.
- :mod:`lorafleet.data.curate`: dedup, near-dedup, decontamination, the synthetic cap.
- :mod:`lorafleet.data.shard`: split seeds and merge outputs for ``dsl.ParallelFor``.
"""
