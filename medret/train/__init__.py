"""Distributed training of hashing encoders with Ray Train (``TorchTrainer``, DDP)."""
