"""One access service per test session (the attack suite and the other access tests): real HTTP on loopback.

`world` holds it and makes what each test needs fresh (accounts with their tokens, releases, requests,
grants), through the operator's side where an operator would, and over HTTP where a person would.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from opt.access.client import AccessClient
from opt.access.server import Running, build_service, running
from opt.config import AccessConfig

PURPOSE = "Study how memorisation scales with model size in OPT models"


@dataclass
class Person:
    name: str
    role: str
    token: str
    http: httpx.Client
    client: AccessClient


@dataclass
class World:
    srv: Running
    root: Path
    _n: Iterator[int] = field(default_factory=itertools.count)

    @property
    def service(self) -> Any:
        return self.srv.service

    def person(self, role: str = "researcher", prefix: str = "") -> Person:
        name = f"{prefix or role}{next(self._n)}-{secrets.token_hex(2)}"
        _, token = self.service.add_user(name, f"{name}@uni.edu", role)
        http = httpx.Client(base_url=self.srv.url, headers={"Authorization": f"Bearer {token.token}"}, timeout=30)
        return Person(name, role, token.token, http, AccessClient(self.srv.url, token.token))

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.srv.url, timeout=30)

    def release(self, files: dict[str, bytes] | None = None, model: str = "opt-gated") -> tuple[str, str, Path]:
        """A freshly published release (a new version of `model`); returns (model, version, the source folder)."""
        version = str(next(self._n))
        src = self.root / "src" / model / version
        for rel, data in (files or {"hf/model.safetensors": secrets.token_bytes(200_000), "hf/config.json": b'{"n_layer": 2}'}).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        paths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        self.service.publish_release(model, version, src, paths, "Non-commercial research only.")
        return model, version, src

    def request(self, who: Person, model: str, version: str) -> dict:
        rel = who.http.get(f"/v1/releases/{model}/{version}").json()
        body = {"model": model, "version": version, "affiliation": "Uni", "organisation_kind": "academic", "purpose": PURPOSE,
                "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
        r = who.http.post("/v1/requests", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def granted(self, who: Person, reviewer: Person, quota: int = 3, files: dict[str, bytes] | None = None) -> tuple[str, str, dict]:
        """A new release, requested by `who` and approved by `reviewer`: (model, version, grant)."""
        model, version, _ = self.release(files)
        req = self.request(who, model, version)
        r = reviewer.http.post(f"/v1/requests/{req['id']}/approve", json={"quota": quota})
        assert r.status_code == 200, r.text
        return model, version, r.json()

    def audit(self, **filters: str) -> list[dict]:
        """Audit entries as an operator reads them (straight from the service, not over HTTP)."""
        from opt.access.auth import Principal
        from opt.access.db import Role
        from opt.access.schemas import AuditOut

        admin = Principal(0, "operator", Role.ADMIN)
        return [
            AuditOut.of(e).model_dump()
            for e in self.service.audit(admin, filters.get("actor"), filters.get("action"), filters.get("subject"))
        ]

    def refused(self, actor: str, action: str) -> list[dict]:
        return [e for e in self.audit(actor=actor) if e["action"] == f"{action}.refused"]


@pytest.fixture(scope="session")
def access_world(tmp_path_factory) -> Iterator[World]:
    from opt.access.auth import FailureLimiter

    root = tmp_path_factory.mktemp("access")
    home = root / "home"
    cfg = AccessConfig(home=str(home), db_url=f"sqlite:///{home / 'access.db'}", release_root=str(home / "releases"),
                       staging_uri=str(root / "staging"), max_grant_days=90, max_download_quota=10)  # fmt: skip
    service = build_service(cfg)
    # the whole suite calls from 127.0.0.1, many tests on purpose without valid credentials: the limit is tested alone
    with running(service, limiter=FailureLimiter(max_failures=10_000)) as srv:
        yield World(srv, root)
    service.close()


@pytest.fixture
def world(access_world: World) -> World:
    return access_world
