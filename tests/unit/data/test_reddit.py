"""PushShift thread reconstruction: OPT's longest comment chain per thread, across files and buckets."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zstandard

from opt.data import readers, reddit
from opt.data.reddit import bucket_files, iter_reddit, longest_chain, partition_reddit_file, read_rejected, threads_from_buckets
from opt.data.sources import Document, Rejected
from tests.unit.data.test_readers import GeneratorFile


def sub(sid: str, title: str = "", selftext: str = "") -> dict[str, Any]:
    return {"id": sid, "title": title or f"Title {sid}", "selftext": selftext, "subreddit": "AskScience", "created_utc": 1546300800}


def com(cid: str, sid: str, parent: str | None = None, body: str | None = None) -> dict[str, Any]:
    """A comment on submission `sid`; `parent` is a comment id (top level when None)."""
    return {
        "id": cid,
        "link_id": f"t3_{sid}",
        "parent_id": f"t1_{parent}" if parent else f"t3_{sid}",
        "body": body if body is not None else f"body {cid}",
        "created_utc": 1546300900,
    }


def write(path: Path, records: Sequence[dict[str, Any] | bytes]) -> str:
    """NDJSON, zstd-compressed when the name ends in .zst; bytes records are written verbatim."""
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def threads(tmp_path: Path, files: Mapping[str, Sequence[dict[str, Any] | bytes]], buckets: int = 1) -> list[Document | Rejected]:
    uris = [write(tmp_path / "in" / name, records) for name, records in files.items()]
    return list(iter_reddit("reddit", uris, tmp_path / "work", buckets))


def texts(items: list[Document | Rejected]) -> dict[str, str]:
    return {i.doc_id: i.text for i in items if isinstance(i, Document) and i.doc_id}


def test_longest_chain_is_not_the_first_branch_and_renders_exactly(tmp_path: Path) -> None:
    items = threads(
        tmp_path,
        {
            "RS_2019-01.zst": [sub("s1", "Why is the sky blue?", "Asking for a friend.\n")],
            "RC_2019-01.zst": [
                com("a", "s1", body="Short branch, long text " * 10),
                com("a1", "s1", "a"),
                com("b", "s1", body="  Rayleigh scattering.  "),
                com("b1", "s1", "b", "Why does that favour blue?"),
                com("b2", "s1", "b1", "Shorter wavelengths scatter more."),
                com("a2", "s1", "a"),  # a sibling of a1: branching without depth
            ],
        },
    )

    assert items == [
        Document(
            "reddit",
            str(tmp_path / "in" / "RS_2019-01.zst"),
            1,
            "Why is the sky blue?\n\nAsking for a friend.\n\n"
            "Rayleigh scattering.\n\nWhy does that favour blue?\n\nShorter wavelengths scatter more.",
            "s1",
        )
    ]


def test_ties_go_to_greater_length_then_smaller_ids() -> None:
    children = {"t3_s": ["t1_y", "t1_x", "t1_z"], "t1_y": ["t1_y1"], "t1_x": ["t1_x1"], "t1_z": ["t1_z1"]}
    same = {"t1_x": 3, "t1_x1": 3, "t1_y": 3, "t1_y1": 3, "t1_z": 1, "t1_z1": 1}
    assert longest_chain("t3_s", children, same) == ["t1_x", "t1_x1"]  # x and y tie on count and length
    longer_y = {**same, "t1_y1": 4}
    assert longest_chain("t3_s", children, longer_y) == ["t1_y", "t1_y1"]
    # count beats length: z's single long comment loses to a two-comment chain
    assert longest_chain("t3_s", {"t3_s": ["t1_z", "t1_x"], "t1_x": ["t1_x1"]}, {"t1_z": 99, "t1_x": 1, "t1_x1": 1}) == ["t1_x", "t1_x1"]


def test_tie_on_ids_is_independent_of_input_order(tmp_path: Path) -> None:
    records = [sub("s1", "T"), com("q", "s1", body="same"), com("p", "s1", body="same")]
    assert texts(threads(tmp_path / "1", {"RC_x.jsonl": records[1:], "RS_x.jsonl": records[:1]}))["s1"] == "T\n\nsame"
    first, second = threads(tmp_path / "2", {"mixed.ndjson": records}), threads(tmp_path / "3", {"mixed.ndjson": records[::-1]})
    assert first == [Document("reddit", str(tmp_path / "2/in/mixed.ndjson"), 1, "T\n\nsame", "s1")]
    assert texts(first) == texts(second)


@pytest.mark.parametrize("gone", ["[deleted]", "[removed]", "", "   "])
def test_deleted_comment_cuts_its_subtree(tmp_path: Path, gone: str) -> None:
    items = threads(
        tmp_path,
        {
            "RS_1.jsonl": [sub("s1", "T", "[removed]")],
            "RC_1.jsonl": [
                com("a", "s1", body="a"),
                com("a1", "s1", "a", body=gone),  # would make the a-chain 4 long
                com("a2", "s1", "a1", body="a2"),
                com("a3", "s1", "a2", body="a3"),
                com("b", "s1", body="b"),
                com("b1", "s1", "b", body="b1"),
            ],
        },
    )
    assert texts(items) == {"s1": "T\n\nb\n\nb1"}


def test_comment_with_missing_parent_is_cut_off_and_the_thread_still_reads(tmp_path: Path) -> None:
    items = threads(
        tmp_path,
        {"RC_1.jsonl": [com("a", "s1", body="a"), com("o1", "s1", "gone1", "orphan"), com("o2", "s1", "o1", "orphan reply")]},
    )
    (doc,) = items
    assert isinstance(doc, Document) and doc.text == "a" and doc.doc_id == "s1"
    assert (Path(doc.file).name, doc.line) == ("RC_1.jsonl", 1)  # no submission: the thread's earliest comment


def test_duplicate_ids_keep_the_first_by_file_then_line(tmp_path: Path) -> None:
    items = threads(
        tmp_path,
        {
            "RS_2019-01.jsonl": [sub("s1", "first title"), sub("s1", "same file, later line")],
            "RS_2019-02.jsonl": [sub("s1", "later file")],
            "RC_2019-02.jsonl": [com("c", "s1", body="from February")],
            "RC_2019-01.jsonl": [com("c", "s1", body="from January"), com("c", "s1", body="January again")],
        },
    )
    assert texts(items) == {"s1": "first title\n\nfrom January"}


def test_submission_without_comments_and_empty_threads(tmp_path: Path) -> None:
    items = threads(
        tmp_path,
        {
            "RS_1.jsonl": [
                sub("s1", "Lonely post", "With a body."),
                sub("s2", "[deleted]", "[deleted]"),
                sub("s3", "Title only", "[removed]"),
            ],
            "RC_1.jsonl": [com("c1", "s2", body="[deleted]"), com("c2", "s4", body="[removed]")],
        },
    )
    assert [(type(i).__name__, i.doc_id if isinstance(i, Document) else i.reason, i.line) for i in items] == [
        ("Document", "s1", 1),
        ("Rejected", "empty_thread", 2),
        ("Document", "s3", 3),
        ("Rejected", "empty_thread", 2),
    ]
    assert texts(items) == {"s1": "Lonely post\n\nWith a body.", "s3": "Title only"}
    assert isinstance(items[3], Rejected) and Path(items[3].file).name == "RC_1.jsonl" and items[3].excerpt == "t3_s4: "


def _partition(args: tuple[str, str, Path, int]) -> dict[str, Any]:
    return partition_reddit_file(*args)


def test_thread_split_across_months_partitioned_in_separate_processes(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    sids = [f"s{i}" for i in range(12)]
    jan = [com(f"{s}a", s, body=f"{s} jan") for s in sids]
    feb = [com(f"{s}b", s, f"{s}a", f"{s} feb") for s in sids]  # replies to January's comments
    uris = [
        write(inputs / "RS_2019-01.zst", [sub(s, f"title {s}") for s in sids]),
        write(inputs / "RC_2019-01.zst", jan),
        write(inputs / "RC_2019-02.zst", feb),
    ]
    work = tmp_path / "work"
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
        summaries = list(pool.map(_partition, [("reddit", uri, work, 4) for uri in uris]))

    parts = [Path(s["part"]) for s in summaries]
    assert [s["submissions"] + s["comments"] for s in summaries] == [12, 12, 12]
    per_bucket = [list(threads_from_buckets("reddit", bucket_files(parts, b))) for b in range(4)]

    assert sum(1 for docs in per_bucket if docs) > 1  # threads really spread over several buckets
    for docs in per_bucket:
        ids = [d.doc_id for d in docs if isinstance(d, Document)]
        assert len(ids) == len(docs) and ids == sorted(i or "" for i in ids)  # sorted by submission id within a bucket
    docs = [d for b in per_bucket for d in b]
    assert sorted(texts(docs).items()) == sorted((s, f"title {s}\n\n{s} jan\n\n{s} feb") for s in sids)
    assert all(isinstance(d, Document) and d.file == uris[0] for d in docs)


def test_partition_is_deterministic_and_a_rerun_replaces_its_part(tmp_path: Path) -> None:
    uri = write(tmp_path / "RC_1.zst", [com(f"c{i}", f"s{i % 7}", body=f"é {i}") for i in range(50)])

    first = partition_reddit_file("reddit", uri, tmp_path / "w", 3)
    snapshot = {p.name: p.read_bytes() for p in Path(first["part"]).iterdir()}
    again = partition_reddit_file("reddit", uri, tmp_path / "w", 3)

    assert again == first
    assert {p.name: p.read_bytes() for p in Path(again["part"]).iterdir()} == snapshot  # replaced, not appended to
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".tmp-")]
    assert sorted(snapshot) == ["00000.comments.jsonl", "00001.comments.jsonl", "00002.comments.jsonl", "rejected.jsonl", "source.json"]
    cid, sid, parent, lineno, body = json.loads(snapshot["00000.comments.jsonl"].splitlines()[0])  # compact rows
    assert (parent, body, reddit.bucket_of(sid, 3)) == (f"t3_{sid}", f"é {lineno - 1}", 0) and cid == f"c{lineno - 1}"
    assert "é".encode() in snapshot["00000.comments.jsonl"]  # UTF-8, not \u escapes


def test_a_5000_deep_chain_needs_no_recursion(tmp_path: Path) -> None:
    chain = [com("c0", "deep", body="0")] + [com(f"c{i}", "deep", f"c{i - 1}", str(i)) for i in range(1, 5000)]
    branch = [com("x", "deep", "c10", "side branch")]
    (doc,) = threads(tmp_path, {"RC_deep.jsonl": chain + branch})

    assert isinstance(doc, Document)
    assert doc.text == "\n\n".join(str(i) for i in range(5000))


def test_bad_records_are_rejected_with_file_line_and_reason(tmp_path: Path) -> None:
    good = [com(f"c{i}", "s1", body=f"comment number {i} " + "x" * 40) for i in range(2000)]
    whole = write(tmp_path / "whole" / "RC_2.zst", good)
    cut = tmp_path / "in" / "RC_2.zst"
    cut.parent.mkdir()
    cut.write_bytes(Path(whole).read_bytes()[:-30])
    bad = write(
        tmp_path / "in" / "RC_1.jsonl",
        [
            com("a", "s1"),
            b'{"id": "b", "body": ',  # 2
            b'{"id": "c", "body": "\xff"}',  # 3
            {"id": "d", "body": "no link"},  # 4
            {"id": "e", "link_id": "s1", "parent_id": "t3_s1", "body": "link without t3_"},  # 5
            b"[1, 2]",  # 6
            {"id": "../etc", "link_id": "t3_s1", "parent_id": "t3_s1", "body": "bad id"},  # 7
            b"",  # 8: blank, skipped
            {"id": "f", "link_id": "t3_s1", "parent_id": "t3_s1", "body": "z" * 500},  # 9: over max_line_bytes below
        ],
    )
    summaries = [partition_reddit_file("reddit", uri, tmp_path / "work", 2, max_line_bytes=300) for uri in (bad, str(cut))]

    rejected = [r for s in summaries for r in read_rejected(Path(s["rejected_file"]))]
    assert [(Path(r.file).name, r.line, r.reason) for r in rejected][:7] == [
        ("RC_1.jsonl", 2, "invalid_json"),
        ("RC_1.jsonl", 3, "invalid_utf8"),
        ("RC_1.jsonl", 4, "missing_fields"),
        ("RC_1.jsonl", 5, "missing_fields"),
        ("RC_1.jsonl", 6, "missing_fields"),
        ("RC_1.jsonl", 7, "missing_fields"),
        ("RC_1.jsonl", 9, "gigantic_record"),
    ]
    (corrupt,) = rejected[7:]
    assert corrupt.reason == "corrupt_stream" and corrupt.source == "reddit"
    assert summaries[0]["rejected_by_reason"] == {"gigantic_record": 1, "invalid_json": 1, "invalid_utf8": 1, "missing_fields": 4}
    assert summaries[1]["comments"] == corrupt.line - 1 < 2000  # everything before the break was kept


def test_kind_is_detected_by_fields_when_the_name_does_not_tell(tmp_path: Path) -> None:
    uri = write(tmp_path / "export.ndjson", [com("c", "s1", body="reply"), sub("s1", "Post"), {"id": "q", "score": 3}])

    summary = partition_reddit_file("reddit", uri, tmp_path / "w", 1)

    assert (summary["submissions"], summary["comments"], summary["rejected_by_reason"]) == (1, 1, {"missing_fields": 1})
    assert texts(list(threads_from_buckets("reddit", bucket_files([Path(summary["part"])], 0)))) == {"s1": "Post\n\nreply"}


def test_mixing_partitions_with_different_bucket_counts_is_refused(tmp_path: Path) -> None:
    a = partition_reddit_file("reddit", write(tmp_path / "RC_1.jsonl", [com("c", "s1")]), tmp_path / "w", 1)
    b = partition_reddit_file("reddit", write(tmp_path / "RC_2.jsonl", [com("d", "s1")]), tmp_path / "w", 2)
    with pytest.raises(ValueError, match="different bucket counts"):
        list(threads_from_buckets("reddit", bucket_files([Path(a["part"]), Path(b["part"])], 0)))


def test_partition_reads_the_input_as_a_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase 1 pulls the file through in bounded reads: a generator-backed file object serves it lazily."""

    def lines() -> Iterator[bytes]:
        for i in range(20_000):
            yield json.dumps(com(f"c{i}", f"s{i % 100}", body="w" * 100)).encode() + b"\n"

    fake = GeneratorFile(lines())
    monkeypatch.setattr(readers, "open_binary_stream", lambda uri: fake)

    summary = partition_reddit_file("reddit", "s3://dumps/RC_2019-03.jsonl", tmp_path / "w", 8, flush_bytes=64 << 10)

    assert summary["comments"] == 20_000
    assert len(fake.reads) > 2 and max(fake.reads) <= readers.CHUNK and fake.served > 2 * readers.CHUNK
    assert reddit.part_dir_name("s3://dumps/RC_2019-03.jsonl") == Path(summary["part"]).name


def test_half_emoji_escapes_become_replacement_characters(tmp_path: Path) -> None:
    # PushShift bodies often hold a lone "\ud83d" escape; it must not break the UTF-8 bucket files.
    line = b'{"id": "c", "link_id": "t3_s1", "parent_id": "t3_s1", "body": "ok \\ud83d and \\ud83d\\ude00"}'
    assert texts(threads(tmp_path, {"RC_1.jsonl": [line]})) == {"s1": "ok \ufffd and \U0001f600"}
