"""The downloader against the running service: parallel, resumable, verified while it streams, never a half file
under its final name; the service's side of it: byte ranges, and resuming costs no quota."""

from __future__ import annotations

import os
import secrets
import stat

import pytest

from opt.access.errors import AccessError, TamperedRelease
from opt.access.release import parse_range
from tests.access_world import World

BIG = secrets.token_bytes(3_000_000)
FILES = {"consolidated/model.safetensors": BIG, "hf/model.safetensors": BIG[::-1], "hf/config.json": b"{}", "README.md": b"# card\n"}


def test_parallel_download_verifies_every_file_and_keeps_the_signed_record(world: World, tmp_path):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob, files=FILES)
    got = alice.client.download(model, version, tmp_path, workers=3, progress=False)
    assert {f.path for f in got} == set(FILES) and not any(f.skipped for f in got)
    for rel, data in FILES.items():
        assert (tmp_path / rel).read_bytes() == data
    record = (tmp_path / ".opt-release.json").read_text()
    assert world.service.keys.public_key in record  # anyone can check the release offline with it


def test_a_dropped_download_resumes_without_more_quota(world: World, tmp_path):
    alice, bob = world.person(), world.person("reviewer")
    model, version, grant = world.granted(alice, bob, quota=1, files=FILES)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()  # the first try started...
    part = tmp_path / "consolidated" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BIG[:1_234_567])  # ...and dropped part-way through a file
    (tmp_path / "README.md").write_bytes(FILES["README.md"])  # one file had arrived whole
    got = {f.path: f for f in alice.client.download(model, version, tmp_path, progress=False)}
    assert got["consolidated/model.safetensors"].resumed_from == 1_234_567 and got["README.md"].skipped
    assert (tmp_path / "consolidated" / "model.safetensors").read_bytes() == BIG and not part.exists()
    assert [g["downloads_used"] for g in alice.http.get("/v1/grants").json()] == [1]  # one whole download, one unit
    assert [e["subject"] for e in world.audit(actor=alice.name, action="download.resumed")] == [f"download:{dl['id']}"]
    assert grant["download_quota"] == 1


def test_a_corrupt_partial_file_is_caught_and_nothing_kept_under_its_name(world: World, tmp_path):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob, files=FILES)
    part = tmp_path / "hf" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # not the file's first bytes
    with pytest.raises(TamperedRelease, match="hf/model.safetensors: its sha256 differs"):
        alice.client.download(model, version, tmp_path, progress=False)
    assert not (tmp_path / "hf" / "model.safetensors").exists() and not part.exists()
    alice.client.download(model, version, tmp_path, progress=False)  # run again: it starts that file over
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == FILES["hf/model.safetensors"]


def test_the_service_answers_byte_ranges(world: World):
    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.granted(alice, bob, files=FILES)
    dl = alice.http.post("/v1/downloads", json={"model": model, "version": version}).json()
    link = alice.http.get(f"/v1/downloads/{dl['id']}/files/hf/model.safetensors").headers["location"]
    anon = world.anonymous()
    r = anon.get(link, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == FILES["hf/model.safetensors"][100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(BIG)}" and r.headers["accept-ranges"] == "bytes"
    r = anon.get(link, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == FILES["hf/model.safetensors"][-10:]
    r = anon.get(link, headers={"Range": f"bytes={len(BIG)}-"})
    assert r.status_code == 416


def test_parse_range() -> None:
    assert parse_range(None, 10) is None and parse_range("bytes=0-", 10) == (0, 9)
    assert parse_range("bytes=2-4", 10) == (2, 4) and parse_range("bytes=5-100", 10) == (5, 9) and parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole file
    for bad in ("bytes=10-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(AccessError, match="range not satisfiable"):
            parse_range(bad, 10)


def test_the_token_never_travels_on_the_command_line(world: World, tmp_path, capsys, monkeypatch):
    from opt.access.cli import DEFAULT_URL
    from opt.cli import build_parser, main

    access = build_parser()._subparsers._group_actions[0].choices["access"]  # type: ignore[union-attr]
    for name, sub in access._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        assert not any(o in ("--token", "--api-token") for a in sub._actions for o in a.option_strings), name
    assert DEFAULT_URL.startswith("http://127.0.0.1")
    alice = world.person()
    monkeypatch.delenv("OPT_ACCESS_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(alice.token)
    os.chmod(token_file, 0o644)
    assert main(["access", "whoami", "--server", world.srv.url, "--token-file", str(token_file)]) == 2
    assert "readable by other users" in capsys.readouterr().err
    os.chmod(token_file, stat.S_IRUSR | stat.S_IWUSR)
    assert main(["access", "whoami", "--server", world.srv.url, "--token-file", str(token_file)]) == 0
    assert capsys.readouterr().out.strip() == f"{alice.name} (researcher)"


def test_what_users_typed_is_printed_escaped(world: World, capsys, monkeypatch):
    from opt.cli import main

    alice, bob = world.person(), world.person("reviewer")
    model, version, _ = world.release()
    req = world.request(alice, model, version)
    forged = "no\n2026-12-01 12:00:00 admin request.approved request:1"
    assert bob.http.post(f"/v1/requests/{req['id']}/deny", json={"reason": forged}).status_code == 200
    monkeypatch.setenv("OPT_ACCESS_URL", world.srv.url)
    monkeypatch.setenv("OPT_ACCESS_TOKEN", alice.token)
    assert main(["access", "list"]) == 0
    out = capsys.readouterr().out
    assert "reason: no\\n2026-12-01 12:00:00 admin" in out and "\n2026-12-01 12:00:00 admin" not in out
    monkeypatch.setenv("OPT_ACCESS_TOKEN", bob.token)
    assert main(["access", "audit", "--subject", f"request:{req['id']}"]) == 0
    # this request's own entries (the session's fuzzer may have probed the same id before it existed)
    lines = [line for line in capsys.readouterr().out.splitlines() if alice.name in line or bob.name in line]
    assert len(lines) == 2 and all(line.split()[0].isdigit() for line in lines)  # created, denied: no forged third line
