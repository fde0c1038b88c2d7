"""The run lease: one trainer per run; a dead holder's lease expires and is taken over; races have one winner."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest

from opt import storage
from opt.train.lease import LEASE_FILE, LeaseHeld, acquire


def test_a_second_trainer_is_refused_naming_the_holder_until_the_first_releases(tmp_path: Path) -> None:
    run = str(tmp_path / "runs" / "r")
    first = acquire(run)
    held = json.loads((tmp_path / "runs" / "r" / LEASE_FILE).read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    with pytest.raises(LeaseHeld, match=rf"being trained by {socket.gethostname()} pid {os.getpid()} since \d{{4}}-") as e:
        acquire(run)
    assert "when its lease expires" in str(e.value) and "\n" not in str(e.value)
    first.release()
    assert not (tmp_path / "runs" / "r" / LEASE_FILE).exists()
    acquire(run).release()


def test_a_dead_holders_lease_expires_and_is_taken_over_and_the_old_holder_learns_it(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    dead = acquire(run, ttl_s=30, now=time.time() - 31)  # its last heartbeat was 31 s ago
    new = acquire(run, ttl_s=30)
    assert new.taken_over is not None and new.taken_over["token"] == dead.record["token"]
    assert not dead.renew() and dead.lost.is_set()  # a holder that was only slow stops instead of writing on
    dead.release()  # does not remove the new holder's lease
    assert json.loads((tmp_path / "r" / LEASE_FILE).read_text())["token"] == new.record["token"]
    assert new.renew() and not new.lost.is_set()


def test_a_lease_of_a_process_killed_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    now = time.time()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LEASE_FILE).write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": int(gone), "since": now,
                                                         "heartbeat": now, "ttl_s": 120}))  # fmt: skip
    lease = acquire(str(tmp_path / "r"))
    assert lease.taken_over is not None and lease.taken_over["pid"] == int(gone)
    lease.release()


def test_the_heartbeat_keeps_a_live_lease(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    with acquire(run, ttl_s=0.4) as lease:
        time.sleep(1.0)  # longer than the ttl: only the heartbeat keeps it
        with pytest.raises(LeaseHeld):
            acquire(run, ttl_s=0.4)
        assert not lease.lost.is_set()
    acquire(run).release()


def test_an_unreadable_lease_counts_as_expired(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LEASE_FILE).write_text("{not json")
    lease = acquire(str(tmp_path / "r"))
    assert lease.taken_over is not None
    lease.release()


def _race(run: str, start: float, out: str) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        acquire(run, ttl_s=60)
        Path(out).write_text("won")
    except LeaseHeld:
        Path(out).write_text("refused")


def test_of_trainers_racing_for_a_free_lease_exactly_one_wins(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    start = time.time() + 1.0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(run, start, str(tmp_path / f"out{i}"))) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted((tmp_path / f"out{i}").read_text() for i in range(6))
    assert outcomes == ["refused"] * 5 + ["won"]


def test_compare_and_swap_writes_only_over_what_the_writer_saw(tmp_path: Path) -> None:
    uri = str(tmp_path / "x.json")
    assert storage.write_if_unchanged(uri, b"a", None)
    assert not storage.write_if_unchanged(uri, b"b", None)  # exists already
    assert not storage.write_if_unchanged(uri, b"b", b"stale")
    assert storage.write_if_unchanged(uri, b"b", b"a") and Path(uri).read_bytes() == b"b"
    assert not storage.write_if_unchanged(uri, None, b"a") and storage.write_if_unchanged(uri, None, b"b")
    assert not Path(uri).exists() and storage.list_files(str(tmp_path)) == []  # the lock file is never listed
