"""Image formats beyond Pillow's built-in ones: HEIC / HEIF (the default format of iPhone photos, which carry
EXIF GPS) through pillow-heif. AVIF is Pillow's own (Pillow >= 11.2 built with libavif).

The HEIF opener is registered with Pillow on first use (`enable_extra_formats`), never at import time; every
place that opens a user's image calls it first (pixels: `hierloc.data.images`; EXIF: `hierloc.data.exif`).
"""

from __future__ import annotations

import functools

# Suffixes of image files, lower-case: what a directory or a zip archive of images is searched for.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")


@functools.cache
def enable_extra_formats() -> None:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once per process; forked loader workers inherit
    it, spawned ones register it again on their first image). pillow-heif is imported here, not with this
    module, so that importing hierloc's light modules (the CLI parser) stays cheap."""
    import pillow_heif

    pillow_heif.register_heif_opener()
