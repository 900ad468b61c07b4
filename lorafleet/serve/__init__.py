"""Serving: the lorafleet runtime (a KServe model with mixed-adapter batches), its
OpenAI-compatible and admin APIs, adapter admission checks, and the weighted adapter router
(in-process or as a standalone proxy), locally on 127.0.0.1 or in a cluster."""
