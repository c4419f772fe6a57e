"""hedgehog.utils.atomic: a file or folder is the old version or the new one, whole, whatever fails mid-write."""
import os

import pytest

from hedgehog.utils.atomic import atomic_dir, atomic_file, old_version


def test_atomic_file_keeps_the_old_file_when_the_write_dies(tmp_path):
    path = tmp_path / "state.pt"
    atomic_file(path, lambda tmp: tmp.write_bytes(b"old"))

    def dies_half_way(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_file(path, dies_half_way)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.pt"]


def test_atomic_dir_publishes_whole_and_replaces_the_old_version(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing visible until the block ends
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"] and os.listdir(tmp_path) == ["model"]


def test_atomic_dir_leaves_the_old_version_when_the_write_dies(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="mid-save"):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("mid-save")
    assert (out / "a").read_text() == "1" and os.listdir(tmp_path) == ["model"]


def test_a_crash_between_the_two_renames_leaves_the_old_version(tmp_path, monkeypatch):
    """The publish renames NAME to NAME.old, then the new folder to NAME: dying between them leaves NAME.old whole
    (the LM checkpoint's resume reads it)."""
    import hedgehog.utils.atomic as atomic

    out = tmp_path / "checkpoint"
    with atomic_dir(out) as tmp:
        (tmp / "state.json").write_text("old")
    real = os.replace
    calls = []

    def second_rename_dies(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "state.json").write_text("new")
    assert (old_version(out) / "state.json").read_text() == "old"
