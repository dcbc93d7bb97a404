"""What a device's enrolment attestation proved.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("attestation", sa.String(40)))


def downgrade() -> None:
    op.drop_column("devices", "attestation")
