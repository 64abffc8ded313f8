"""Products and their images, each image with its embedding.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sku", sa.String(512), nullable=False, unique=True),
        sa.Column("title", sa.String(1024), nullable=False),
        sa.Column("category", sa.String(256)),
        sa.Column("price", sa.Float),
        sa.Column("url", sa.String(2048)),
        # JSONB on PostgreSQL, JSON text on SQLite.
        sa.Column("attributes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    )
    op.create_index("ix_products_category", "products", ["category"])
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rel_path", sa.String(2048), nullable=False, unique=True),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model_key", sa.String(128), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),  # BLOB on SQLite, bytea on PostgreSQL
        # timestamptz on PostgreSQL (UTC whatever the session's time zone); SQLite keeps UTC text either way.
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_images_product_id", "images", ["product_id"])


def downgrade() -> None:
    op.drop_table("images")
    op.drop_table("products")
