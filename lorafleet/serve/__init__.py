"""Serving: the lorafleet runtime (a KServe model with mixed-adapter batches) and its
OpenAI-compatible API, locally on 127.0.0.1 or as a KServe serving runtime in a cluster."""
