"""Possession-only authentications per access key; one result token per transaction;
leases on callbacks, so that one process delivers each.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "access_keys",
        sa.Column("possession_only", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column("operations", sa.Column("result_token", sa.Text))
    op.add_column("outbox", sa.Column("lease_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("outbox", "lease_until")
    op.drop_column("operations", "result_token")
    op.drop_column("access_keys", "possession_only")
