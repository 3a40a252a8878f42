"""PathArray (compact path store): the same answers as the numpy string array it replaces."""

import hashlib
import pickle

import numpy as np
import pytest

from hierloc.data.pathstore import PathArray
from hierloc.training.features import paths_digest

STRINGS = ["/data/a.jpg", "/données/été/ü.jpg", "/" + "x" * 70 + ".jpg", "/raw/\udcff.jpg", "/b.png", "/c"]


def _numpy_digest(array: np.ndarray) -> str:
    """The feature cache's digest of a numpy '<U' path array (dtype name, then the array's bytes)."""
    return hashlib.sha256(str(array.dtype).encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture
def pair():
    return PathArray.from_strings(STRINGS), np.asarray(STRINGS, dtype=str)


def test_elements_and_dtype_match_numpy(pair):
    paths, reference = pair
    assert len(paths) == len(reference) and paths.shape == reference.shape and paths.dtype == reference.dtype
    assert [paths[i] for i in range(len(STRINGS))] == STRINGS and paths[-2] == STRINGS[-2]
    assert paths.tolist() == STRINGS and list(paths) == STRINGS
    converted = np.asarray(paths, dtype=str)
    assert converted.dtype == reference.dtype and (converted == reference).all()
    with pytest.raises(IndexError):
        paths[len(STRINGS)]


@pytest.mark.parametrize("key", [np.array([5, 0, 2, 2, -1]), slice(1, 5), slice(None, None, -2),
                                 np.array([True, False, True, False, False, True]), np.array([], dtype=np.int64)])
def test_selection_matches_numpy_and_keeps_the_width(pair, key):
    paths, reference = pair
    selected = paths[key]
    assert isinstance(selected, PathArray)
    assert selected.tolist() == reference[key].tolist()
    assert selected.dtype == reference[key].dtype          # numpy keeps the parent's width, so does PathArray


def test_digest_is_the_numpy_arrays_digest_in_any_block_size(pair):
    paths, reference = pair
    for block_rows in (1, 4, 1000):
        assert paths_digest(paths, block_rows) == _numpy_digest(reference)
    order = np.array([3, 1])
    assert paths_digest(paths[order], 1) == _numpy_digest(reference[order])
    assert paths_digest(paths[order]) != paths_digest(paths[order[::-1]])


def test_concatenate_numpy_conversion_and_pickle_round_trip(pair):
    paths, reference = pair
    parts = [paths[:2], paths[2:3], paths[3:]]
    assert PathArray.concatenate(parts) == paths and parts == []
    assert PathArray.from_numpy(reference) == paths
    assert pickle.loads(pickle.dumps(paths)) == paths


def test_storage_is_the_utf8_bytes_plus_offsets():
    strings = [f"/data/images/{i // 1000:04d}/{i:08d}.jpg" for i in range(50_000)]
    paths = PathArray.from_strings(strings)
    assert paths.data.nbytes == sum(len(s) for s in strings)
    assert paths.nbytes == paths.data.nbytes + 8 * (len(strings) + 1)
    assert paths.nbytes * 3 < np.asarray(strings, dtype=str).nbytes
    assert paths[np.arange(49_999, -1, -7)].tolist() == strings[::-1][::7]
