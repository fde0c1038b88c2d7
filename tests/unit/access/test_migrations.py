"""The access database upgrades in place: a database made at an older revision reaches the newest with its rows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text


def test_a_revision_0001_database_upgrades_in_place(tmp_path: Path) -> None:
    from alembic import command

    from opt.access.db import make_engine
    from opt.access.migrations import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    command.upgrade(alembic_config(old), "0001")  # as a database made before releases carried their gate
    with old.begin() as conn:
        columns = "model_name, model_version, location, manifest, signature, key_id, licence, licence_sha256, published_at"
        conn.execute(text(f"INSERT INTO releases ({columns}) VALUES ('m', '1', '/r', '{{}}', 's', 'k', 'l', 'h', '2026-11-30 00:00:00')"))
    old.dispose()
    engine = make_engine(url)  # what the service does on start
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
        assert conn.execute(text("SELECT model_name, gate, gate_reasons FROM releases")).one() == ("m", "passed", "[]")
    engine.dispose()


def test_the_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    """A model changed without a migration (or the reverse) would leave production databases behind."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from opt.access.db import Base, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], diff
