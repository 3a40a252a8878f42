"""hierloc: hierarchical visual geolocation with hyperbolic entity embeddings (HierLoc, ICLR 2026).

Importing the package is cheap: torch, transformers and geoopt are imported by the submodules that need them.
"""

__version__ = "0.1.0"
