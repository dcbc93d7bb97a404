"""The holder of an outbox row's lease, so that a process whose lease was taken over (it
renewed too late) learns it and stops sending those callbacks; an index of each
operation's unfinished callbacks, which go out in order whichever host wrote them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("leased_by", sa.String(16)))
    unfinished = sa.text("delivered_at IS NULL AND failed_at IS NULL")
    op.create_index(
        "ix_outbox_unfinished_operation",
        "outbox",
        ["operation_id"],
        postgresql_where=unfinished,
        sqlite_where=unfinished,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_unfinished_operation", table_name="outbox")
    op.drop_column("outbox", "leased_by")
