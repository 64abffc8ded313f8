"""Catalog views: an image row is a photo (view "") or an extra view of it (index.catalog_views), so a photo's
rows are unique by (rel_path, view) rather than by rel_path.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# 0001 left the unique constraint on rel_path unnamed: PostgreSQL named it itself; SQLite's is found by
# reflection, named by this convention, when the batch copies the table.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _rel_path_constraint() -> str:
    return "images_rel_path_key" if op.get_bind().dialect.name == "postgresql" else "uq_images_rel_path"


def upgrade() -> None:
    with op.batch_alter_table("images", naming_convention=NAMING) as batch:
        batch.add_column(sa.Column("view", sa.String(16), nullable=False, server_default=""))
        batch.drop_constraint(_rel_path_constraint(), type_="unique")
        batch.create_unique_constraint("uq_images_rel_path_view", ["rel_path", "view"])


def downgrade() -> None:
    # The extra views go with the column: `make index` embeds them again if they are configured.
    op.execute(sa.text("DELETE FROM images WHERE view <> ''"))
    with op.batch_alter_table("images", naming_convention=NAMING) as batch:
        batch.drop_constraint("uq_images_rel_path_view", type_="unique")
        batch.create_unique_constraint(_rel_path_constraint(), ["rel_path"])
        batch.drop_column("view")
