"""Change numbers: every committed change to an image (or to the product fields results show) gets one,
so servers apply only what changed since the last number they saw; file size and mtime let a re-run
skip reading unchanged photos.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("change", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("file_size", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("file_mtime_ns", sa.BigInteger, nullable=True))
    op.create_index("ix_images_change", "images", ["change"])
    state = op.create_table(
        "store_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(state, [{"name": "head", "value": 0}])


def downgrade() -> None:
    op.drop_table("store_state")
    op.drop_index("ix_images_change", "images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("file_mtime_ns")
        batch.drop_column("file_size")
        batch.drop_column("change")
