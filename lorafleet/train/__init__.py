"""Fleet training: the per-worker QLoRA loop (`worker`) and the fleet runner (`runner`)."""
