"""User-facing errors of the model package (shared with the torch-free `gazetteer` package)."""

from gazetteer.errors import InputError

__all__ = ["InputError"]
