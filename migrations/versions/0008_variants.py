"""Variants: several products may share one photo (sizes or colours photographed once). Each product that names a
photo has its own image rows, carrying the same vector, so an image row stays one product with one category and one
price for the index's filters; a photo's rows are unique by (rel_path, view, product_id) instead of (rel_path, view).
The columns keep rel_path first, so the unique index still serves the lookups by file.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("uq_images_rel_path_view", type_="unique")
        batch.create_unique_constraint("uq_images_rel_path_view_product", ["rel_path", "view", "product_id"])


def downgrade() -> None:
    # One product per photo again: each photo keeps the rows of its first product (the lowest id); the other
    # variants' rows go (their products are removed with the next run's products left without images).
    op.execute(
        sa.text(
            "DELETE FROM images WHERE EXISTS (SELECT 1 FROM images AS other WHERE other.rel_path = images.rel_path "
            "AND other.view = images.view AND other.product_id < images.product_id)"
        )
    )
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("uq_images_rel_path_view_product", type_="unique")
        batch.create_unique_constraint("uq_images_rel_path_view", ["rel_path", "view"])
