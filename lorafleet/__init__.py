"""lorafleet: train, keep and serve fleets of per-customer QLoRA adapters."""

__version__ = "0.1.0"
