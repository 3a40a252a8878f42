"""Training: the training loop and its shared step (train.py), the GWH-InfoNCE loss (losses.py), the feature
cache (features.py), resumable checkpoints (checkpoint.py), signal handling (interrupt.py) and the peer objectives
(peers.py)."""
