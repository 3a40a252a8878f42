"""`hierloc.inference.names`: paths reduced to base names, hub ids and bare names kept, paths in free text
scrubbed (what the server shows its clients)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hierloc.inference.names import path_name, scrub_paths


@pytest.mark.parametrize("value, name", [
    ("/srv/models/demo", "demo"), ("/srv/models/demo/", "demo"), (Path("/data/osv5m/train.csv"), "train.csv"),
    ("./runs/demo", "demo"), ("~/models/demo", "demo"), ("runs/x/backbone", "backbone"),
    ("C:\\data\\train.csv", "train.csv"),
    ("train.csv", "train.csv"), ("google/vit-base-patch16-224", "google/vit-base-patch16-224"), (None, None),
])
def test_a_path_is_named_by_its_base_name_and_a_name_is_kept(value, name):
    assert path_name(value) == name


def test_absolute_paths_in_free_text_become_base_names_and_the_rest_is_left_alone():
    text = ("cut.jpg: cannot use this image (FileNotFoundError: [Errno 2] No such file: "
            "'/usr/share/hierloc/basemap.jpg'); model=/srv/models/demo, see ~/logs/x.txt; top_k 1/2 a/b at /predict")
    scrubbed = scrub_paths(text)
    assert scrubbed == ("cut.jpg: cannot use this image (FileNotFoundError: [Errno 2] No such file: "
                        "'basemap.jpg'); model=demo, see x.txt; top_k 1/2 a/b at /predict")
    assert "/usr" not in scrubbed and "/srv" not in scrubbed and "~" not in scrubbed
