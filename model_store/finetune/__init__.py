"""Fine-tuning (and training from scratch) of GPT-2 into the store: `python -m model_store finetune`.

config.py (options, no torch) · data.py (files -> packed blocks, data order) · objective.py (cross-entropy,
unlikelihood) · model.py (HF model from the store or scratch, LoRA) · checkpoint.py (run directory) ·
distributed.py (torchrun group) · train.py (the loop) · export.py + card.py (publish into the store) ·
cli.py (the subcommand's arguments). Imports torch only through the modules that need it.
"""
