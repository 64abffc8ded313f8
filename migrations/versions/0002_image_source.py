"""Where an image row came from: the catalog folder, or the storefront write API.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="catalog"))
    op.create_index("ix_images_source", "images", ["source"])


def downgrade() -> None:
    op.drop_index("ix_images_source", "images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("source")
