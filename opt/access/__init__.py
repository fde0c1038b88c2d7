"""Gated access to model weights: requests, reviews, grants scoped to one model version, signed expiring
download links, download events and an append-only audit log. A pure library: the API, pages, CLI and
flows call `AccessService`.
"""

from opt.access.db import AccessRequest, AppendOnlyViolation, AuditEntry, DownloadEvent, Grant, RequestStatus
from opt.access.links import LINK_SCHEME, AccessDenied, AccessError, DownloadLink, LinkPayload
from opt.access.service import AccessService, load_secret

__all__ = [
    "LINK_SCHEME",
    "AccessDenied",
    "AccessError",
    "AccessRequest",
    "AccessService",
    "AppendOnlyViolation",
    "AuditEntry",
    "DownloadEvent",
    "DownloadLink",
    "Grant",
    "LinkPayload",
    "RequestStatus",
    "load_secret",
]
