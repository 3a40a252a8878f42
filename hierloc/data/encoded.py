"""`EncodedImage`: an image file's bytes held in memory (an upload), named like a file.

`hierloc.data.images.load_image`, `Preprocessor.load`, `hierloc.data.exif.read_gps` and `HierLoc.predict` take it
wherever they take a path, with the same guards and the same decoding, so the same bytes give the same answer as
the file would, and nothing is written to disk. Torch-free, so that the EXIF reader can take it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedImage:
    """The bytes of an image file (JPEG, PNG, ...) and the name its answers and errors are reported under."""

    name: str
    data: bytes

    def __repr__(self) -> str:  # never print the bytes
        return f"EncodedImage(name={self.name!r}, {len(self.data)} bytes)"


def source_name(source: str | os.PathLike | EncodedImage) -> str:
    """The name a path or an `EncodedImage` is reported under."""
    return source.name if isinstance(source, EncodedImage) else os.fspath(source)
