"""Alembic migrations of the access database. `upgrade(engine)` brings any database to the newest schema in place;
`alembic -c opt/access/migrations/alembic.ini ...` works too, for operators who want Alembic's own commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Migrate the database behind `engine` to the newest revision (a no-op when it is there already)."""
    import logging

    from alembic import command

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every start say nothing to a user
    command.upgrade(alembic_config(engine), "head")
