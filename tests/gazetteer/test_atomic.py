"""gazetteer.atomic: outputs appear complete or not at all."""

import os

import pytest

from gazetteer import atomic
from gazetteer.errors import InputError


def test_atomic_write_text_and_bytes_replace_content_and_leave_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic.atomic_write_text(target, "first\n")
    atomic.atomic_write_bytes(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_write_uses_normal_file_permissions(tmp_path):
    target = tmp_path / "perm.txt"
    atomic.atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_open_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "keep.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.csv"]


def test_atomic_directory_publishes_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic.atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "a.txt").write_text("a")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_removes_temp_and_keeps_old_on_error(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic.atomic_directory(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("fail")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_refuses_existing_without_overwrite_and_replaces_with_it(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        with atomic.atomic_directory(final):
            pass
    with atomic.atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unwritable_destination_is_an_input_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="not a directory|is a file"):
        with atomic.atomic_directory(blocker / "out"):
            pass
    with pytest.raises(InputError):
        atomic.atomic_write_text(blocker / "x.txt", "x")
    with pytest.raises(InputError, match="is a file"):
        atomic.check_output_directory(blocker / "deeper" / "out")
    with pytest.raises(InputError, match="a file with that name exists"):
        atomic.check_output_directory(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_read_only_parent_is_an_input_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(InputError, match="permission"):
            atomic.check_output_directory(parent / "out")
    finally:
        parent.chmod(0o700)
