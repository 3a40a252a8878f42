"""The package version (read by `hierloc.__version__` and written into model directories and datasets)."""

__version__ = "0.1.0"
