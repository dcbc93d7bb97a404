"""Access keys (hashed) and consumed one-time tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "access_keys",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("callback_url", sa.String(2000)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("revoked_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_access_keys"),
    )
    op.create_table(
        "consumed_tokens",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("consumed_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_consumed_tokens"),
    )
    op.create_index("ix_consumed_tokens_expires_at", "consumed_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_table("consumed_tokens")
    op.drop_table("access_keys")
