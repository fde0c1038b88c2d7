"""Gated releases: an access service that alone decides who gets a gated model version's bytes.

Accounts with roles (researcher, reviewer, admin) and hashed API tokens; requests for one release, reviews,
grants with expiry and a quota of whole downloads; releases whose download manifest the service signed
(Ed25519) at publication; per-file downloads checked against the grant; a keyed, hash-chained audit log.
`service.AccessService` holds the rules (no HTTP); `api` is the FastAPI app over it, `client` the downloader
researchers run, which needs nothing but the service's URL and a personal token. See docs/architecture.md.
"""
