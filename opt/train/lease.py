"""The run lease: one trainer per run at a time, on a local store or S3.

A trainer takes `<run>/LEASE.json` before it writes anything of the run and renews it (a heartbeat) while it
trains. A second trainer on the same run is refused at once with the holder's host, pid and start, and how to
take over. A holder that died stops renewing, so its lease expires after `ttl_s` and the next trainer takes it
over (recorded in the logbook); one that died on this host (its pid is gone) is taken over at once. Taking,
renewing and releasing are compare-and-swap writes (`storage.write_if_unchanged`: a lock file locally, a
conditional PUT on S3), so two trainers that race for a free or expired lease cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opt import storage
from opt.errors import OptError

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE.json"
TTL_S = 120.0
"""How long a lease outlives its last heartbeat (renewed every TTL_S / 4)."""


class LeaseHeld(OptError):
    """Another trainer holds the run's lease."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Lease:
    """A held lease; `renewing()` keeps it alive from a background thread."""

    uri: str
    record: dict[str, Any]
    ttl_s: float = TTL_S
    taken_over: dict[str, Any] | None = None
    """The expired lease this one replaced (its holder died or lost its storage), if any."""
    lost: threading.Event = field(default_factory=threading.Event)
    on_lost: Callable[[str], Any] | None = None
    """Called (from the heartbeat thread) with the new holder when another trainer took the lease over."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _text: str = ""

    def renew(self) -> bool:
        """Push the heartbeat forward; False (and `lost` set) if another trainer holds the lease now."""
        new = {**self.record, "heartbeat": time.time()}
        text = json.dumps(new, indent=2)
        try:
            ok = storage.write_if_unchanged(self.uri, text.encode(), self._text.encode())
        except storage.StorageError as e:  # the store is unreachable: try again at the next beat
            log.warning("could not renew the run lease %s: %s", self.uri, e)
            return True
        if not ok:
            self.lost.set()
            try:
                holder = describe(json.loads(storage.read_text(self.uri)))
            except (storage.StorageError, ValueError):
                holder = "nobody (the lease is gone)"
            log.error("the run lease %s is held by %s now; this trainer stops", self.uri, holder)
            if self.on_lost is not None:
                self.on_lost(holder)
            return False
        self.record, self._text = new, text
        return True

    def start_renewing(self) -> Lease:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                if not self.renew():
                    return

        self._thread = threading.Thread(target=beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and remove the lease, unless another trainer holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost.is_set():
            try:
                storage.write_if_unchanged(self.uri, None, self._text.encode())
            except storage.StorageError as e:
                log.warning("could not release the run lease %s (it expires by itself): %s", self.uri, e)

    def __enter__(self) -> Lease:
        return self.start_renewing()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {_iso(float(holder.get('since', 0)))}"


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): no need to wait for expiry."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def acquire(run_uri: str, command: str = "optctl train", ttl_s: float = TTL_S, now: float | None = None) -> Lease:
    """Take the run's lease, or LeaseHeld naming the live holder; an expired lease is taken over."""
    uri = storage.join(run_uri, LEASE_FILE)
    t = time.time() if now is None else now
    record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": t, "heartbeat": t,
              "ttl_s": ttl_s, "command": command}  # fmt: skip
    text = json.dumps(record, indent=2)
    for _ in range(5):  # a lost race re-reads the lease once more
        try:
            current = storage.read_text(uri) if storage.exists(uri) else None
        except storage.StorageError:
            current = None
        if current is None:
            if storage.write_if_unchanged(uri, text.encode(), None):
                return Lease(uri, record, ttl_s, _text=text)
            continue
        try:
            held = json.loads(current)
            expires = float(held["heartbeat"]) + float(held.get("ttl_s", ttl_s))
        except (ValueError, KeyError, TypeError):
            held, expires = {"host": "?", "pid": "?", "since": 0}, 0.0  # unreadable: treat as expired
        if expires > t and not _dead_here(held):
            raise LeaseHeld(
                f"run {run_uri} is being trained by {describe(held)} (heartbeat {_iso(float(held.get('heartbeat', 0)))}); "
                f"wait for it to finish, stop it, or, if it is dead, run again after {_iso(expires)} when its lease expires"
            )
        if storage.write_if_unchanged(uri, text.encode(), current.encode()):
            log.warning("took over the expired lease of run %s from %s", run_uri, describe(held))
            return Lease(uri, record, ttl_s, taken_over=held, _text=text)
    raise LeaseHeld(f"run {run_uri}: another trainer keeps taking the lease at the same time; try again")
