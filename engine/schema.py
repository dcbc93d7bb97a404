"""The database schema (SQLAlchemy Core). Created and upgraded by the Alembic migrations in
engine/migrations, never by ``create_all``; a test checks that the migrated database
matches these tables.

Times are stored as UTC. Secrets are not stored: device public keys are public, the
post-operation context is sealed by the HSM's data key, access keys (later) are hashes.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

Time = sa.DateTime(timezone=True)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("username", sa.String(300), nullable=False, unique=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attributes", sa.JSON, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("last_login_at", Time),
    sa.Column("last_failed_login_at", Time),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column(
        "user_id",
        sa.Uuid,
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("public_key", sa.LargeBinary(65), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("enrolled_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("last_used_at", Time),
    sa.Column("counter", sa.BigInteger, nullable=False),
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("attestation", sa.String(40)),
)

operations = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    # No foreign keys to users and devices: the history of a deleted user stays readable.
    sa.Column("user_id", sa.Uuid, nullable=False, index=True),
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
    sa.Column("result_token", sa.Text),
    sa.Index("ix_operations_phase_expires_at", "phase", "expires_at"),
    sa.Index("ix_operations_device_id_phase", "device_id", "phase"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
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
    #: The process delivering the callback (its name in notices) holds it until then
    #: (engine/callbacks.py).
    sa.Column("lease_until", Time),
    sa.Column("leased_by", sa.String(16)),
    sa.Index("ix_outbox_delivered_at_failed_at", "delivered_at", "failed_at"),
    # An operation's unfinished callbacks (they go out in order: engine/statements.py).
    sa.Index(
        "ix_outbox_unfinished_operation",
        "operation_id",
        postgresql_where=sa.text("delivered_at IS NULL AND failed_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL AND failed_at IS NULL"),
    ),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
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
)

#: One row: the sequence number and hash of the newest audit entry. Writers lock it, so the
#: chain is appended one entry at a time even across processes.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)

#: Relying-party access keys: only a SHA-256 of the secret part is stored.
access_keys = sa.Table(
    "access_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("scopes", sa.String(200), nullable=False),
    sa.Column("callback_url", sa.String(2000)),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time),
    #: The key may start authentications without user verification (possession only).
    sa.Column("possession_only", sa.Boolean, nullable=False, server_default=sa.false()),
)

#: One-time tokens (intent, result) once used: their ``jti`` may not be used again.
consumed_tokens = sa.Table(
    "consumed_tokens",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("consumed_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False, index=True),
)
