"""Users, devices, operations, callback outbox and the hash-chained audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("username", sa.String(300), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("last_login_at", Time),
        sa.Column("last_failed_login_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("public_key", sa.LargeBinary(65), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("enrolled_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("last_used_at", Time),
        sa.Column("counter", sa.BigInteger, nullable=False),
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_devices_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_user_id", "devices", ["user_id"])
    op.create_table(
        "operations",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("device_id", sa.Uuid, nullable=False),
        sa.Column("client_id", sa.String(100)),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("challenge", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.Column("completed_at", Time),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("amount", sa.String(32)),
        sa.Column("currency", sa.String(3)),
        sa.Column("payee_name", sa.String(140)),
        sa.Column("payee_account", sa.String(70)),
        sa.Column("text", sa.Text),
        sa.Column("pre_context", sa.Text),
        sa.Column("post_context_sealed", sa.LargeBinary),
        sa.Column("require_user_verification", sa.Boolean, nullable=False),
        sa.Column("callback_url", sa.String(2000)),
        sa.Column("device_name", sa.String(100)),
        sa.Column("device_platform", sa.String(32)),
        sa.Column("public_key", sa.LargeBinary(65)),
        sa.Column("decision", sa.String(16)),
        sa.Column("user_verification", sa.String(16)),
        sa.Column("counter", sa.BigInteger),
        sa.Column("device_signature", sa.LargeBinary),
        sa.Column("failure_reason", sa.String(32)),
        sa.Column("result", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_operations"),
    )
    op.create_index("ix_operations_user_id", "operations", ["user_id"])
    op.create_index("ix_operations_phase_expires_at", "operations", ["phase", "expires_at"])
    op.create_index("ix_operations_device_id_phase", "operations", ["device_id", "phase"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("operation_id", sa.Uuid),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", Time, nullable=False),
        sa.Column("delivered_at", Time),
        sa.Column("failed_at", Time),
        sa.Column("last_error", sa.String(300)),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_delivered_at_failed_at", "outbox", ["delivered_at", "failed_at"])
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("at", Time, nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("operation_id", sa.Uuid),
        sa.Column("user_id", sa.Uuid),
        sa.Column("device_id", sa.Uuid),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(300)),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": bytes(32)}])


def downgrade() -> None:
    for table in ("audit_head", "audit_log", "outbox", "operations", "devices", "users"):
        op.drop_table(table)
