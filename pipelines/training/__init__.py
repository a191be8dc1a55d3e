"""Training stages on Ray Train: DOMINO soft-prompt learning (more to come: continual pretraining, LoRA SFT, DPO)."""
