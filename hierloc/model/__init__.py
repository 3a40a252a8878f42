"""Model: image backbones (backbones.py) and the encoder
around one (encoders.py), the HierLoc network (network.py), the concept head (concepts.py) and the
model directory on disk (modeldir.py)."""
