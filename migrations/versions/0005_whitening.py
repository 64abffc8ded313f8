"""The catalog's whitening: each projection fitted by `make index`, kept with the catalog it was fitted on, so
every server and indexer that shares the database uses the same one (and an index names its own by sha256).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "whitenings",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("network_key", sa.String(128), nullable=False, index=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("whitenings")
