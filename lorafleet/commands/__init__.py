"""Sub-command groups of the ``lorafleet`` CLI, one module per area (``app`` in each)."""
