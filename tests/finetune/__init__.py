"""Fine-tuning tests: data, training, resume, export, LoRA and DDP on a tiny random GPT-2."""
