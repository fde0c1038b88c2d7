"""Building the access service from a run configuration, and running it (`optctl access serve`).

The service is the only process that holds the access database's credentials, the keys and the release store's
credentials; everything a researcher runs talks to it over HTTP. `running` starts it in a background thread on
a free loopback port (the access demo in `make run`, and the tests), and stops it again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opt.access.auth import FailureLimiter
from opt.access.core import Limits
from opt.access.errors import AccessError
from opt.access.keys import load_keys, private_dir
from opt.access.release import ReleaseStore
from opt.access.service import AccessService

DB_URL_ENV = "OPT_ACCESS_DB_URL"

if TYPE_CHECKING:  # opt.config pulls in torch through the model presets; the access service must not need it
    from opt.config import AccessConfig


def build_service(cfg: AccessConfig, s3_client: Any = None) -> AccessService:
    """The service for a configuration's `access` section (its home made 0700 first)."""
    home = private_dir(Path(cfg.home))
    limits = Limits(
        grant_days=cfg.grant_days, max_grant_days=cfg.max_grant_days, download_quota=cfg.download_quota,
        max_download_quota=cfg.max_download_quota, link_ttl_seconds=cfg.link_ttl_seconds, token_days=cfg.token_days,
        download_hours=cfg.download_hours,
    )  # fmt: skip
    keys = load_keys(home, cfg.secret_env)
    db_url = os.environ.get(DB_URL_ENV) or cfg.db_url  # the environment keeps a password out of files and `ps`
    service = AccessService(db_url, keys, ReleaseStore(cfg.release_root, s3_client), limits, staging_root=cfg.staging_uri)
    service.two_person_models = frozenset(cfg.two_person_models)
    service.mail_settings = cfg.mail.model_copy(update={"portal_url": cfg.mail.portal_url or f"{cfg.url.rstrip('/')}/portal"})
    return service


def create_server(
    service: AccessService, host: str, port: int, limiter: FailureLimiter | None = None, trusted_proxy: str | None = None
) -> Any:
    """A uvicorn server for the service. Behind a TLS proxy, `trusted_proxy` (its address) is the one whose
    X-Forwarded-For is believed, so the failure limit counts the real client, not the proxy."""
    import uvicorn

    from opt.access.api import create_app

    # one process: the failure limiter and the SQLite writer queue are per process
    app = create_app(service, limiter=limiter)
    proxy = {"proxy_headers": True, "forwarded_allow_ips": trusted_proxy} if trusted_proxy else {"proxy_headers": False}
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, workers=1, **proxy)
    return uvicorn.Server(config)


def serve(cfg: AccessConfig, host: str, port: int, trusted_proxy: str | None = None) -> None:
    """Run the service in the foreground until interrupted."""
    from opt.access.mail import OutboxSender

    service = build_service(cfg)
    server = create_server(service, host, port, trusted_proxy=trusted_proxy)
    sender = OutboxSender(service, cfg.mail.send_every_s).start() if cfg.mail.host else None
    print(f"access service on http://{host}:{port} (OpenAPI at /openapi.json)")
    print(f"release signing key: ed25519 {service.keys.public_key} (key id {service.keys.key_id})", flush=True)
    try:
        server.run()
    finally:
        if sender is not None:
            sender.stop()
        service.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    service: AccessService
    app: Any


@contextlib.contextmanager
def running(service: AccessService, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30.0,
            limiter: FailureLimiter | None = None) -> Iterator[Running]:  # fmt: skip
    """`service` served on `host` (a free port by default) in a background thread, for the duration of the block."""
    port = port or free_port(host)
    server = create_server(service, host, port, limiter)
    thread = threading.Thread(target=server.run, name="access-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AccessError(f"the access service did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield Running(f"http://{host}:{port}", service, server.config.app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
