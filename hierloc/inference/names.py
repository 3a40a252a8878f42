"""The names a report gives a file or directory: its base name, never the absolute path it has on the machine
that wrote the report.

A model's description (`HierLoc.describe`, the ``model`` block of `hierloc predict --format json` and of every
answer of `hierloc serve`), its provenance (`hierloc.inference.explain.model_provenance`, the map's header) and
the server's error messages name the model directory, the training CSV and the backbone this way, so that a
client of the server learns nothing about the server's file system. A hub id (``owner/name``) is a name already
and is kept as it is.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re

# an absolute POSIX path of at least two components inside free text, e.g. "/srv/models/demo/config.json",
# starting at the text's start or after a space, quote, bracket, '=' or ':' (so "a/b" and "1/2" are left alone)
_ABSOLUTE_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"(\[=:]))(?:~|/[^\s/'\"()\[\],;]+)(?:/[^\s/'\"()\[\],;]*)+")


def path_name(value: str | os.PathLike | None) -> str | None:
    """A path -> its base name ('/srv/models/demo/' -> 'demo', 'C:\\data\\train.csv' -> 'train.csv'); a bare
    name or a hub id 'owner/name' unchanged; None -> None."""
    if value is None:
        return None
    text = os.fspath(value)
    if not isinstance(text, str) or text == "":
        return text
    if "\\" in text or re.match(r"^[A-Za-z]:", text):
        return ntpath.basename(ntpath.normpath(text)) or text
    parts = [part for part in text.split("/") if part]
    looks_like_path = text.startswith(("/", "~", ".")) or len(parts) > 2
    if not looks_like_path:
        return text
    return posixpath.basename(posixpath.normpath(text)) or text


def scrub_paths(text: str) -> str:
    """Free text (an error message) with every absolute path in it replaced by its base name."""
    return _ABSOLUTE_PATH.sub(lambda match: path_name(match.group(0)) or "", text)
