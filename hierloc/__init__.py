"""hierloc: hierarchical visual geolocation with hyperbolic entity embeddings (HierLoc, ICLR 2026).

    from hierloc import HierLoc
    model = HierLoc.from_pretrained("runs/demo")

Importing the package is cheap: it imports nothing. ``hierloc.HierLoc`` (the predictor,
`hierloc.inference.predictor.HierLoc`) is loaded on first access, and torch, transformers and geoopt with it.
Layers (each a sub-package): geometry -> data -> model -> training / inference -> cli.
"""

from hierloc.version import __version__

__all__ = ["HierLoc", "__version__"]


def __getattr__(name: str):
    """Lazy public names (PEP 562): `hierloc.HierLoc` imports the predictor only when it is first used."""
    if name == "HierLoc":
        from hierloc.inference.predictor import HierLoc

        return HierLoc
    raise AttributeError(f"module 'hierloc' has no attribute {name!r}")
