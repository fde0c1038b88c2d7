"""releases carry the registry's gate verdict: a version that failed its gates cannot be requested

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate", sa.String(length=16), server_default="passed", nullable=False))
        batch_op.add_column(sa.Column("gate_reasons", sa.Text(), server_default="[]", nullable=False))
        batch_op.create_check_constraint("ck_releases_gate", "gate IN ('passed', 'failed', 'overridden')")


def downgrade() -> None:
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_constraint("ck_releases_gate", type_="check")
        batch_op.drop_column("gate_reasons")
        batch_op.drop_column("gate")
