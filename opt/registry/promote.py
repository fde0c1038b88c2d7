"""Promotion: who made which version the `champion` (or another alias), when and why, and the history of it.

A version whose gates failed is refused unless promoted with an override reason; a gated one is then let through
the access service too (its release was published as failed, which nobody may request). Each promotion is a tag
on the version (`opt.promoted.<alias>`), an entry in the registered model's history (`opt.<alias>_history`,
newest last) and a `promoted` event in the version's training-run logbook. Rolling back is promoting the previous
champion again: the history keeps both.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from opt.registry.mlflow_registry import CHAMPION, RegistryError, version_info

HISTORY_LIMIT = 200  # entries kept in the history tag (MLflow tag values are bounded)


def promote(tracking_uri: str, name: str, version: str, alias: str = CHAMPION, reason: str = "", override: str | None = None,
            actor: str = "unknown", access_cfg: Any = None) -> dict[str, Any]:  # fmt: skip
    """Point `alias` at `name` v`version` and record it; RegistryError when its gates failed and there is no override."""
    from opt.tracking import client

    if not reason.strip():
        raise RegistryError("a promotion needs --reason: why this version, now")
    info = version_info(tracking_uri, name, version)
    tags = info["tags"]
    failed = tags.get("opt.gate") != "passed"
    if failed and not (override and override.strip()):
        first = (json.loads(tags.get("opt.gate_reasons", "[]")) or ["no gate verdict recorded"])[0]
        raise RegistryError(f"{name} v{version} failed its gates ({first}); promote it anyway only with --override REASON")
    c = client(tracking_uri)
    try:
        previous: str | None = str(c.get_model_version_by_alias(name, alias).version)
    except Exception:
        previous = None
    at = datetime.now(UTC).isoformat(timespec="seconds")
    entry = {"version": version, "alias": alias, "by": actor, "at": at, "reason": reason.strip(), "previous": previous,
             "override": override.strip() if failed and override else None}  # fmt: skip
    c.set_registered_model_alias(name, alias, version)
    c.set_model_version_tag(name, version, f"opt.promoted.{alias}", json.dumps(entry, sort_keys=True))
    history = history_of(tracking_uri, name, alias) + [entry]
    c.set_registered_model_tag(name, f"opt.{alias}_history", json.dumps(history[-HISTORY_LIMIT:], sort_keys=True))
    run_uri = tags.get("opt.checkpoint_uri", "").rsplit("/step-", 1)[0]
    if run_uri:
        from opt.logbook import Logbook

        Logbook(run_uri).append("promoted", model=name, **entry)
    if failed and tags.get("opt.access_class") == "gated" and access_cfg is not None:
        _override_release(access_cfg, name, version, entry["override"] or "")
    return entry


def history_of(tracking_uri: str, name: str, alias: str = CHAMPION) -> list[dict[str, Any]]:
    """Every promotion to `alias`, oldest first."""
    from opt.tracking import client

    try:
        model = client(tracking_uri).get_registered_model(name)
    except Exception:
        raise RegistryError(f"no registered model {name} in {tracking_uri}") from None
    out: list[dict[str, Any]] = json.loads((model.tags or {}).get(f"opt.{alias}_history", "[]"))
    return out


def compare(tracking_uri: str, name: str, a: str, b: str) -> list[tuple[str, str, str]]:
    """(figure, version a's, version b's) rows: perplexity, every task metric, every gate check, access and aliases."""
    va, vb = version_info(tracking_uri, name, a), version_info(tracking_uri, name, b)

    def figures(v: dict[str, Any]) -> dict[str, str]:
        t = v["tags"]
        out = {"perplexity": t.get("opt.eval_perplexity", ""), "gate": t.get("opt.gate", ""), "access": t.get("opt.access_class", ""),
               "aliases": ", ".join(v["aliases"]) or "-", "dataset": t.get("opt.dataset_id", ""),
               "step": t.get("opt.step", "")}  # fmt: skip
        for task, metrics in sorted(json.loads(t.get("opt.eval_tasks", "{}")).items()):
            for metric, value in sorted(metrics.items()):
                out[f"{task}.{metric}"] = f"{value:.4g}"
        for reason in json.loads(t.get("opt.gate_reasons", "[]")):
            out[f"reason: {reason.split(' ')[0]}"] = reason
        return out

    fa, fb = figures(va), figures(vb)
    return [(k, fa.get(k, "-"), fb.get(k, "-")) for k in dict.fromkeys([*fa, *fb])]


def _override_release(access_cfg: Any, name: str, version: str, reason: str) -> None:
    import os

    if access_cfg.publish_via == "service":
        from opt.access.client import AccessClient

        token = os.environ.get("OPT_ACCESS_TOKEN")
        if not token:
            raise RegistryError("the release of a gated version is overridden through the access service: set $OPT_ACCESS_TOKEN (an admin)")
        client = AccessClient(os.environ.get("OPT_ACCESS_URL") or access_cfg.url, token)
        try:
            client.call("POST", f"/v1/releases/{name}/{version}/override", {"reason": reason})
        finally:
            client.close()
        return
    from opt.access.server import build_service

    service = build_service(access_cfg)
    try:
        service.override_gate(name, version, reason)
    finally:
        service.close()
