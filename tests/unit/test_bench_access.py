"""bench/download.py and bench/authz_load.py run their quick forms end to end: the download through the service
writes every byte, and the quota storm never gets more downloads than the grant allows."""

from __future__ import annotations

import json

from tests.conftest import load_bench


def test_download_bench_compares_the_service_with_a_static_server(capsys) -> None:  # type: ignore[no-untyped-def]
    out = load_bench("download").main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "download"
    assert out["ours_mb_per_s"] > 0 and out["peer_mb_per_s"] > 0 and out["size_mb"] == 32


def test_authz_load_bench_holds_the_quota_under_a_storm(capsys) -> None:  # type: ignore[no-untyped-def]
    out = load_bench("authz_load").main(["--quick"])
    (sqlite,) = out["results"]
    assert sqlite["errors"] == 0 and sqlite["requests"] > 0 and sqlite["p99_ms"] >= sqlite["p50_ms"]
    assert sqlite["started"] == sqlite["downloads_used"] == 3 and not sqlite["over_quota"]
