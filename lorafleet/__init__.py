"""lorafleet: build, gate and ship a fleet of LoRA experts on one shared base model."""

__version__ = "0.1.0"
