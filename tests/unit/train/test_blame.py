"""Which failed ranks blame their node (counted towards keeping it out of restarts), from real error texts."""

from __future__ import annotations

import pytest

from opt.train.restarts import _PEER_ERROR

# what surviving ranks reported in node-kill and hang drills on this machine (gloo over TCP)
PEER_ERRORS = [
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:29584. This is typically caused by a remote worker crashing.",
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:10433: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.",
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete",
    "RuntimeError: NCCL communicator was aborted on rank 3.",
]
# a rank's own fault: its node is blamed
OWN_ERRORS = [
    "RuntimeError: chaos: node 54f7 fails (train.chaos.crash_on_nodes)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "OSError: [Errno 28] No space left on device",
]


@pytest.mark.parametrize("text", PEER_ERRORS)
def test_errors_seen_from_a_lost_peer_blame_nobody(text: str) -> None:
    assert _PEER_ERROR.search(text)


@pytest.mark.parametrize("text", OWN_ERRORS)
def test_a_ranks_own_error_blames_its_node(text: str) -> None:
    assert not _PEER_ERROR.search(text)


def test_the_driver_takes_up_the_controllers_policy_state_from_the_logbook() -> None:
    from opt.train.restarts import _PolicyState

    t0 = 1000.0
    entries = [
        {"event": "failure", "t": t0 - 50, "node": "old", "blamed": True},  # an earlier driver's: not ours
        {"event": "failure", "t": t0 + 1, "node": "a", "blamed": True},
        {"event": "failure", "t": t0 + 1, "node": "b", "blamed": False},  # only lost its peer
        {"event": "restart", "t": t0 + 2, "attempt": 2, "failures_in_a_row": 1, "excluded_nodes": []},
        {"event": "failure", "t": t0 + 9, "node": "a", "blamed": True},
        {"event": "restart", "t": t0 + 10, "attempt": 3, "failures_in_a_row": 0, "excluded_nodes": ["x"]},
    ]
    state = _PolicyState.from_logbook(entries, since=t0, current=_PolicyState(attempt=1, before=7))
    assert (state.attempt, state.in_a_row, state.excluded, state.before) == (3, 0, ["x"], 7)
    assert state.node_failures == {"a": 2}
