"""PushShift Reddit dumps reduced to OPT's "longest comment chain per thread", in bounded memory.

A thread's comments are spread over many monthly files (RC_2019-01.zst, RC_2019-02.zst, ...), and one
month is far larger than memory, so reconstruction runs in two phases:

1. `partition_reddit_file` streams one input file and appends compact records to bucket files chosen
   by a stable hash of the submission id. Each input file gets its own part directory, so files can
   be partitioned in parallel processes with no shared file; the directory appears atomically (built
   under a temporary name, then renamed), so a retried or crashed run never leaves half a part.
2. `threads_from_buckets` loads one bucket (its files from every part), rebuilds each thread and
   yields one `Document` per thread. Memory is one bucket: choose `buckets` ~ total input / RAM budget.

Part directory layout (`out_dir/<file name>.<crc32 of the URI>/`):
    source.json                   {"file": <input URI>, "source": ..., "buckets": N}
    <bucket:05d>.submissions.jsonl  [id, line, title, selftext]            one JSON array per line
    <bucket:05d>.comments.jsonl     [id, submission_id, parent_id, line, body]
    rejected.jsonl                {"source", "file", "line", "reason", "excerpt"} per bad record
Records keep input order and are written with fixed JSON separators, so the bytes are deterministic.

The chain rule (OPT paper, section 3.2: "the longest chain of comments in each thread"):
- a chain is a path from the submission down through replies to a leaf; the longest has the most
  comments; ties go to the greater total body length, then to the lexicographically smaller sequence
  of comment ids (which reduces to the smaller id at the first branch point);
- a comment whose body is `[deleted]`, `[removed]` or empty is dropped and cuts its whole subtree off:
  its replies answer text we no longer have, so a chain through them would not read as a conversation.
  A comment whose parent is absent from the input is cut off the same way (a missing parent is
  indistinguishable from a deleted one);
- duplicate ids (monthly dumps overlap) keep the first record, in order of (input URI, line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opt.data import readers
from opt.data.readers import LineFault, excerpt_of, fix_surrogates
from opt.data.sources import Document, Rejected, SourceError
from opt.storage import TMP_PREFIX

SUBMISSIONS, COMMENTS = "submissions", "comments"
DELETED_BODIES = frozenset({"", "[deleted]", "[removed]", "[deleted by user]"})
FLUSH_BYTES = 32 << 20  # buffered bucket records per process before appending them to disk
_ID = re.compile(r"^[0-9A-Za-z_]+$")  # base36 ids; anything else is a malformed record
# One encoder for every row: json.dumps() with non-default arguments builds a new one per call.
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def bucket_of(submission_id: str, buckets: int) -> int:
    """The bucket of a thread: crc32 of its submission id (stable across processes, unlike `hash()`)."""
    return zlib.crc32(submission_id.encode("utf-8")) % buckets


def part_dir_name(uri: str) -> str:
    """The part directory of one input file: its name plus a hash of the full URI (same names in two folders)."""
    return f"{uri.rstrip('/').rsplit('/', 1)[-1]}.{zlib.crc32(uri.encode('utf-8')):08x}"


def _usable(text: str) -> bool:
    return text.strip() not in DELETED_BODIES


def _kind_from_name(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1]
    if name.startswith("RS_"):
        return SUBMISSIONS
    if name.startswith("RC_"):
        return COMMENTS
    return None


def _kind_from_fields(record: dict[str, Any]) -> str | None:
    if "parent_id" in record or "link_id" in record or "body" in record:
        return COMMENTS
    if "title" in record:
        return SUBMISSIONS
    return None


def _strip_prefix(value: Any, prefixes: tuple[str, ...]) -> str | None:
    """The id of a fullname like `t3_abc` when it carries one of `prefixes`, else None."""
    if isinstance(value, str) and value.startswith(prefixes) and _ID.match(value[3:]):
        return value[3:]
    return None


def _keep(text: str) -> str:
    return text


def _compact(record: dict[str, Any], kind: str, lineno: int, surrogates: bool) -> tuple[str, list[Any]] | None:
    """(submission id, compact row) for a valid record, None when required fields are missing or malformed.

    `surrogates`: the raw line has a `\\uD8xx`-style escape, so lone surrogates may need replacing.
    """
    fix = fix_surrogates if surrogates else _keep
    rid = record.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        return None
    if kind == SUBMISSIONS:
        title, selftext = record.get("title"), record.get("selftext") or ""
        if not isinstance(title, str) or not isinstance(selftext, str):
            return None
        return rid, [rid, lineno, fix(title), fix(selftext)]
    sid = _strip_prefix(record.get("link_id"), ("t3_",))
    parent = record.get("parent_id")
    body = record.get("body")
    if sid is None or _strip_prefix(parent, ("t1_", "t3_")) is None or not isinstance(body, str):
        return None
    return sid, [rid, sid, parent, lineno, fix(body)]


class _BucketWriter:
    """Buffers rows per bucket file and appends them in batches, so at most one file is open at a time
    (thousands of buckets would exhaust file descriptors) and memory stays under `flush_bytes`."""

    def __init__(self, part: Path, flush_bytes: int) -> None:
        self._part, self._flush_bytes = part, flush_bytes
        self._buf: dict[str, list[bytes]] = defaultdict(list)
        self._size = 0

    def add(self, name: str, row: list[Any]) -> None:
        line = _ROW_ENCODER.encode(row).encode("utf-8") + b"\n"
        self._buf[name].append(line)
        self._size += len(line)
        if self._size >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        for name in sorted(self._buf):
            with open(self._part / name, "ab") as f:
                f.writelines(self._buf[name])
        self._buf.clear()
        self._size = 0


def partition_reddit_file(
    source: str,
    uri: str,
    out_dir: Path,
    buckets: int,
    *,
    max_line_bytes: int = readers.MAX_LINE_BYTES,
    flush_bytes: int = FLUSH_BYTES,
) -> dict[str, Any]:
    """Phase 1: stream one PushShift NDJSON file (RS_* submissions, RC_* comments, or detected by fields)
    into `out_dir/<part>/<bucket>.<kind>.jsonl`, bucketed by submission id.

    Safe to run once per input file in separate processes: each file writes only its own part
    directory, which replaces any earlier one atomically. Bad records go to `<part>/rejected.jsonl`
    (read them with `read_rejected`) with reasons `invalid_utf8`, `invalid_json`, `missing_fields`
    (required fields absent or malformed, or not an object), `gigantic_record`, `corrupt_stream`.
    Returns a JSON-serialisable summary: file, part, buckets, submissions, comments, rejected,
    rejected_by_reason, rejected_file. Raises `SourceError` only if the file cannot be read at all.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / part_dir_name(uri)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{part.name}.", dir=out_dir))
    name_kind = _kind_from_name(uri)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    try:
        (tmp / "source.json").write_text(json.dumps({"file": uri, "source": source, "buckets": buckets}, sort_keys=True))
        writer = _BucketWriter(tmp, flush_bytes)
        with open(tmp / "rejected.jsonl", "w", encoding="utf-8") as rejected:

            def reject(lineno: int, reason: str, excerpt: str) -> None:
                reasons[reason] += 1
                rejected.write(json.dumps(asdict(Rejected(source, uri, lineno, reason, excerpt)), ensure_ascii=False) + "\n")

            try:
                for lineno, payload in readers.iter_lines(uri, max_line_bytes):
                    if isinstance(payload, LineFault):
                        reject(lineno, payload.reason, payload.excerpt)
                        continue
                    if not payload.strip():
                        continue
                    try:
                        record = json.loads(payload.decode("utf-8"))
                    except UnicodeDecodeError:
                        reject(lineno, "invalid_utf8", excerpt_of(payload))
                        continue
                    except (ValueError, RecursionError):
                        reject(lineno, "invalid_json", excerpt_of(payload))
                        continue
                    kind = name_kind or (_kind_from_fields(record) if isinstance(record, dict) else None)
                    maybe_surrogates = b"\\ud" in payload or b"\\uD" in payload  # a surrogate can only come from an escape
                    compact = _compact(record, kind, lineno, maybe_surrogates) if kind is not None and isinstance(record, dict) else None
                    if kind is None or compact is None:
                        reject(lineno, "missing_fields", excerpt_of(payload))
                        continue
                    sid, row = compact
                    writer.add(f"{bucket_of(sid, buckets):05d}.{kind}.jsonl", row)
                    counts[kind] += 1
            except OSError as e:
                raise SourceError(f"source {source!r}: cannot read {uri}: {e}") from e
        writer.flush()
        # Publish: a concurrent or earlier run of the same file is replaced whole, never merged into.
        if part.exists():
            shutil.rmtree(part)
        os.replace(tmp, part)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "file": uri,
        "part": str(part),
        "buckets": buckets,
        SUBMISSIONS: counts[SUBMISSIONS],
        COMMENTS: counts[COMMENTS],
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected_file": str(part / "rejected.jsonl"),
    }


def read_rejected(path: Path) -> Iterator[Rejected]:
    """The `Rejected` records that phase 1 wrote to a part's `rejected.jsonl`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Rejected(**json.loads(line))


def bucket_files(parts: Iterable[Path], bucket: int) -> list[Path]:
    """The files of one bucket across the given part directories (what `threads_from_buckets` takes)."""
    out = []
    for part in parts:
        for kind in (SUBMISSIONS, COMMENTS):
            path = Path(part) / f"{bucket:05d}.{kind}.jsonl"
            if path.exists():
                out.append(path)
    return out


# --- phase 2 -------------------------------------------------------------------------------------


def longest_chain(root: str, children: Mapping[str, Sequence[str]], length: Mapping[str, int]) -> list[str]:
    """The longest root-to-leaf path below `root` (root excluded), iteratively (threads run thousands deep).

    `children` maps a node to its usable child nodes; `length[node]` is its body length. Longest = most
    nodes, then greatest total length, then lexicographically smallest node sequence. Because sibling
    ids differ, the last rule is decided at the first branch point: each node picks its best child by
    (count, length) and, on a tie, the smallest id, so a greedy walk from the root finds the global best.
    """
    order: list[str] = []
    seen = {root}
    stack = [root]
    while stack:  # pre-order: every node is listed before its descendants
        node = stack.pop()
        order.append(node)
        for child in children.get(node, ()):
            if child not in seen:  # malformed input must not loop
                seen.add(child)
                stack.append(child)
    best: dict[str, tuple[int, int, str | None]] = {}  # node -> (chain count, chain length, next node)
    for node in reversed(order):  # children before parents
        pick: str | None = None
        pick_key = (0, 0)
        for child in children.get(node, ()):
            count, total, _ = best[child]
            if pick is None or (count, total) > pick_key or ((count, total) == pick_key and child < pick):
                pick, pick_key = child, (count, total)
        own = (0, 0) if node == root else (1, length[node])
        best[node] = (own[0] + pick_key[0], own[1] + pick_key[1], pick)
    chain: list[str] = []
    nxt = best[root][2]
    while nxt is not None:
        chain.append(nxt)
        nxt = best[nxt][2]
    return chain


def _read_part_meta(path: Path, cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    part = path.parent
    if part not in cache:
        cache[part] = json.loads((part / "source.json").read_text(encoding="utf-8"))
    return cache[part]


def threads_from_buckets(source: str, bucket_files: list[Path]) -> Iterator[Document | Rejected]:
    """Phase 2: rebuild every thread of one bucket and yield one Document per thread, sorted by submission id.

    `bucket_files` are one bucket's files from all parts (see `bucket_files()`); they are read in order of
    (input URI, kind), so "first" among duplicates is deterministic whatever order they are passed in.
    A Document's text is the submission title and selftext (when not deleted/removed) and then each body
    of the longest comment chain, separated by blank lines; `file`/`line` name the submission's input
    line (for a thread whose submission is absent: the thread's earliest comment), `doc_id` the
    submission id. A thread with no usable text becomes `Rejected(reason="empty_thread")`.
    """
    meta: dict[Path, dict[str, Any]] = {}
    files = sorted(bucket_files, key=lambda p: (_read_part_meta(p, meta)["file"], p.name, str(p)))
    if len({m["buckets"] for m in (_read_part_meta(p, meta) for p in files)}) > 1:
        raise ValueError("bucket files come from partitions with different bucket counts; re-partition every file alike")

    submissions: dict[str, tuple[str, str, str, int]] = {}  # sid -> (title, selftext, file, line)
    comments: dict[str, tuple[str, str, str, str, int]] = {}  # cid -> (sid, parent fullname, body, file, line)
    for path in files:
        uri = _read_part_meta(path, meta)["file"]
        is_submissions = path.name.endswith(f".{SUBMISSIONS}.jsonl")
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if is_submissions:
                    sid, lineno, title, selftext = row
                    submissions.setdefault(sid, (title, selftext, uri, lineno))
                else:
                    cid, sid, parent, lineno, body = row
                    comments.setdefault(cid, (sid, parent, body, uri, lineno))

    # Per thread: the reply tree over usable comments only (node names are fullnames, t3_/t1_).
    children: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    anchors: dict[str, tuple[str, int]] = {}  # sid -> earliest (file, line) among its comments
    for cid, (sid, parent, body, uri, lineno) in comments.items():
        anchors[sid] = min(anchors.get(sid, (uri, lineno)), (uri, lineno))
        if _usable(body):
            children[sid][parent].append(f"t1_{cid}")

    for sid in sorted(set(submissions) | set(anchors)):
        sub = submissions.get(sid)
        kids = children.get(sid, {})
        lengths = {node: len(comments[node[3:]][2].strip()) for nodes in kids.values() for node in nodes}
        chain = longest_chain(f"t3_{sid}", kids, lengths)
        parts = [t for t in (sub[:2] if sub else ()) if _usable(t)] + [comments[node[3:]][2] for node in chain]
        text = "\n\n".join(p.strip() for p in parts)
        file, lineno = (sub[2], sub[3]) if sub else anchors[sid]
        if text:
            yield Document(source, file, lineno, text, sid)
        else:
            yield Rejected(source, file, lineno, "empty_thread", excerpt_of(f"t3_{sid}: {sub[0] if sub else ''}"))


def iter_reddit(source: str, uris: Sequence[str], work_dir: Path, buckets: int = 64) -> Iterator[Document | Rejected]:
    """Both phases in one process, for small inputs and tests: partition every file, then read every bucket.

    Phase 1's rejects come first (file order), then the threads of bucket 0, 1, ...
    """
    parts = []
    for uri in uris:
        summary = partition_reddit_file(source, uri, work_dir, buckets)
        parts.append(Path(summary["part"]))
        yield from read_rejected(Path(summary["rejected_file"]))
    for bucket in range(buckets):
        yield from threads_from_buckets(source, bucket_files(parts, bucket))
