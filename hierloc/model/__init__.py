"""Model: image encoders (encoders.py), the HierLoc network (network.py), the concept head (concepts.py) and the
model directory on disk (modeldir.py)."""
