"""opt.storage on local paths: the byte-level contract every stage relies on, and crash safety."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opt import storage
from opt.storage import TMP_PREFIX, StorageError


def test_write_then_read_returns_the_same_bytes_and_hashlib_sha256(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "blob.bin")  # parent directories are created
    data = os.urandom(3000) + b"\x00tail"

    info = storage.write_bytes(uri, data)

    assert storage.read_bytes(uri) == data
    assert info.uri == uri
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_write_replaces_an_existing_object(tmp_path: Path) -> None:
    uri = str(tmp_path / "obj")
    storage.write_bytes(uri, b"old contents that are longer")
    storage.write_text(uri, "new")
    assert storage.read_text(uri) == "new"
    assert storage.list_files(str(tmp_path)) == [uri]


def test_empty_object_round_trips(tmp_path: Path) -> None:
    uri = str(tmp_path / "empty")
    info = storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())


def test_put_file_and_get_file_copy_bytes_and_report_the_sha256(tmp_path: Path) -> None:
    # Larger than storage.CHUNK so the streaming copy loops more than once.
    data = os.urandom(storage.CHUNK + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    info = storage.put_file(src, str(tmp_path / "store" / "obj.bin"))
    out = storage.get_file(info.uri, tmp_path / "download" / "copy.bin")

    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert out == tmp_path / "download" / "copy.bin"
    assert out.read_bytes() == data


def test_read_of_a_missing_object_raises_storage_error_naming_the_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing")
    with pytest.raises(StorageError, match="missing"):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match="missing"):
        storage.stat(uri)


def test_get_file_of_a_missing_object_raises_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        storage.get_file(str(tmp_path / "missing"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_list_files_is_recursive_sorted_and_only_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    for rel in ("b.txt", "a/2.txt", "a/1.txt", "a/deep/x.bin"):
        storage.write_bytes(str(root / rel), rel.encode())
    (root / "empty-dir").mkdir()

    assert storage.list_files(str(root)) == sorted(str(root / rel) for rel in ("a/1.txt", "a/2.txt", "a/deep/x.bin", "b.txt"))
    assert storage.list_files(str(root / "a" / "deep")) == [str(root / "a" / "deep" / "x.bin")]
    assert storage.list_files(str(tmp_path / "nothing-here")) == []


def test_list_files_hides_in_flight_temp_files(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "done"), b"x")
    (tmp_path / f"{TMP_PREFIX}done.abc123").write_bytes(b"half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"{TMP_PREFIX}other.xyz").write_bytes(b"half")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "done")]


def test_successful_writes_leave_no_temp_files(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "a"), b"1")
    src = tmp_path / "src"
    src.write_bytes(b"2")
    storage.put_file(src, str(tmp_path / "b"))
    storage.get_file(str(tmp_path / "b"), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "src"]


def test_exists_and_delete_of_objects_and_directories(tmp_path: Path) -> None:
    one = str(tmp_path / "one")
    tree = tmp_path / "tree"
    storage.write_bytes(one, b"1")
    storage.write_bytes(str(tree / "x"), b"x")
    storage.write_bytes(str(tree / "sub" / "y"), b"y")

    assert storage.exists(one) and storage.exists(str(tree / "sub" / "y"))
    storage.delete(one)
    assert not storage.exists(one)
    storage.delete(str(tree))  # a directory goes with everything under it
    assert not storage.exists(str(tree))
    assert storage.list_files(str(tmp_path)) == []
    storage.delete(str(tmp_path / "never-existed"))  # missing targets are fine


def test_stat_reports_size_and_sha256_of_the_stored_bytes(tmp_path: Path) -> None:
    uri = str(tmp_path / "obj")
    written = storage.write_bytes(uri, b"hello world")
    info = storage.stat(uri)
    assert info == written
    assert (info.size, info.sha256) == (11, hashlib.sha256(b"hello world").hexdigest())


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("/data/store", ("runs", "r1"), "/data/store/runs/r1"),
        ("/data/store/", ("/runs/", "r1/"), "/data/store/runs/r1"),
        ("s3://bucket", ("prefix", "key.bin"), "s3://bucket/prefix/key.bin"),
        ("s3://bucket/p/", ("k",), "s3://bucket/p/k"),
        ("rel", (), "rel"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


# --- crash safety --------------------------------------------------------------------------------

# The child copies a FIFO into `target` with put_file. It reads in CHUNK-sized blocks, so once the
# parent has fed one and a half chunks and kept the FIFO open, the child has written the first chunk
# to its temp file and is blocked reading the second: killed there, it is provably mid-write.
_CHILD = "import sys\nfrom opt import storage\ninfo = storage.put_file(sys.argv[1], sys.argv[2])\nprint(info.size, info.sha256)\n"


def _start_put_file(src: Path, uri: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(src), uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _open_fifo_for_writing(fifo: Path, child: subprocess.Popen[bytes], deadline: float) -> int:
    """Open the FIFO once the child has opened its read end (non-blocking polls, so a dead child cannot hang us)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert child.poll() is None, f"child exited early: {child.communicate()}"
            assert time.monotonic() < deadline, "child never opened the FIFO"
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return fd


def _wait_for_partial_temp(directory: Path, min_size: int, child: subprocess.Popen[bytes], deadline: float) -> Path:
    while True:
        temps = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
        if temps and temps[0].stat().st_size >= min_size:
            return temps[0]
        assert child.poll() is None, f"child exited early: {child.communicate()}"
        assert time.monotonic() < deadline, "child never started writing its temp file"
        time.sleep(0.01)


def test_sigkill_mid_write_leaves_the_old_object_intact(tmp_path: Path) -> None:
    store = tmp_path / "store"
    target = str(store / "model.safetensors")
    old = os.urandom(4096)
    storage.write_bytes(target, old)
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)

    child = _start_put_file(fifo, target)
    deadline = time.monotonic() + 20
    fd = -1
    try:
        fd = _open_fifo_for_writing(fifo, child, deadline)
        os.write(fd, b"N" * (storage.CHUNK + storage.CHUNK // 2))  # never closed before the kill: no EOF
        temp = _wait_for_partial_temp(store, storage.CHUNK, child, deadline)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if fd >= 0:
            os.close(fd)

    assert child.returncode == -signal.SIGKILL
    assert temp.exists()  # the half-written copy is left behind by the kill ...
    assert storage.read_bytes(target) == old  # ... but the object still holds the old bytes
    assert storage.stat(target).sha256 == hashlib.sha256(old).hexdigest()
    assert storage.list_files(str(store)) == [target]  # and listings never show the temp file


def test_put_file_reads_a_pipe_source_once(tmp_path: Path) -> None:
    # A source that can be read only once (a pipe, stdin) must land whole, with the hash of what landed.
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    target = tmp_path / "store" / "obj"
    data = b"streamed through a pipe\n" * 1000
    child = _start_put_file(fifo, str(target))
    try:
        fd = _open_fifo_for_writing(fifo, child, time.monotonic() + 20)
        os.write(fd, data)
        os.close(fd)  # EOF
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:  # e.g. blocked re-opening the drained pipe
            child.kill()
            child.wait()
    assert child.returncode == 0, err.decode()
    assert target.read_bytes() == data
    assert out.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
