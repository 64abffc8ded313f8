"""Deleted images become tombstones first, so an id in any index version still in use resolves.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))  # timestamptz
    op.create_index("ix_images_deleted_at", "images", ["deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_images_deleted_at", "images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("deleted_at")
