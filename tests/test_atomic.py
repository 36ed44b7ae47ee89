"""lvd.atomic: a file or folder appears whole or not at all, whatever happens to its writer."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lvd.atomic import AtomicFile, atomic_folder, atomic_path, atomic_write, temporaries

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new")
        assert path.read_text() == "old"  # a reader sees the old file until the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old bytes")
    with pytest.raises(error):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise error
    assert path.read_bytes() == b"old bytes" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    """Eight threads write 1 MiB each (all one byte value, in 64 KiB pieces) to the same path ten times; every
    write that ends leaves the file whole: one writer's bytes, never a mix, never a short file."""
    path, size, errors = tmp_path / "out.bin", 1 << 20, []

    def writer(value: int) -> None:
        try:
            for _ in range(10):
                with atomic_write(path) as f:
                    for _ in range(size // (64 << 10)):
                        f.write(bytes([value]) * (64 << 10))
                data = path.read_bytes()
                assert len(data) == size and data.count(data[:1]) == size
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = path.read_bytes()
    assert len(data) == size and data.count(data[:1]) == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


KILLED_WRITER = """
import os, sys
from lvd.atomic import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"half")
    f.flush()
    os._exit(9)  # dies like SIGKILL: no cleanup runs
"""


def test_a_killed_writer_leaves_the_old_file_and_a_hidden_temporary(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == b"old"
    (left,) = temporaries(tmp_path, "shard-*.tar")
    assert left.name.startswith(".shard-000000.tar.") and left.name.endswith(".tmp") and left.read_bytes() == b"half"
    assert sorted(tmp_path.glob("*.tar")) == [path]  # a shard lister does not take it for a shard


def test_atomic_file_commits_or_discards(tmp_path):
    kept, dropped = AtomicFile(tmp_path / "kept.txt", "w", encoding="utf-8"), AtomicFile(tmp_path / "dropped")
    kept.file.write("yes")
    dropped.file.write(b"no")
    assert kept.commit() == tmp_path / "kept.txt"
    dropped.discard()
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"] and (tmp_path / "kept.txt").read_text() == "yes"
    with pytest.raises(ValueError, match="mode"):
        AtomicFile(tmp_path / "x", "ab")


def test_atomic_path_keeps_the_suffix_and_replaces_only_on_success(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"old")
    with atomic_path(path, suffix=".mp4") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and not tmp.exists()
        tmp.write_bytes(b"new")  # the writer creates the file itself, as ffmpeg does
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(path, suffix=".mp4") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("ffmpeg failed")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_atomic_folder_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "export"
    (out / "old_part").mkdir(parents=True)
    (out / "old_part" / "weights").write_bytes(b"old")
    with atomic_folder(out) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "transformer").mkdir()
        (tmp / "transformer" / "weights").write_bytes(b"new")
        assert (out / "old_part" / "weights").read_bytes() == b"old"  # untouched until the block ends
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["transformer", "transformer/weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "weights").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (out / "weights").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_a_folder_does_not_replace_a_file(tmp_path):
    (tmp_path / "export").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_folder(tmp_path / "export"):
            pass
    assert (tmp_path / "export").read_text() == "a file" and len(list(tmp_path.iterdir())) == 1
