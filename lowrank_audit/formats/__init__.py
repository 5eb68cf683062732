"""Files the tool writes besides reports: PEFT LoRA adapters and factorized checkpoints."""
