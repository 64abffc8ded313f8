"""Duplicates: the latest near-duplicate report (`python -m indexer duplicates`, indexer.jobs.duplicates), kept in the
database so that every server shows the same one and backups hold it. One report row (when it was made, the change
number it compared, its threshold, whether photos were compared, and its counts) and its pairs: two products of a
group by sku and the cosine similarity of their closest photos. Each run replaces both in one transaction; the pairs
go with their report.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "duplicate_reports",
        sa.Column("id", sa.Integer, primary_key=True),
        # timestamptz on PostgreSQL (UTC whatever the session's time zone); SQLite keeps UTC text either way.
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("change", sa.BigInteger, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("category_only", sa.Boolean, nullable=False),
        sa.Column("photo_check", sa.Boolean, nullable=False),
        sa.Column("photos", sa.BigInteger, nullable=False),
        sa.Column("products", sa.BigInteger, nullable=False),
        sa.Column("groups", sa.BigInteger, nullable=False),
        sa.Column("pairs", sa.BigInteger, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
    )
    op.create_table(
        "duplicate_pairs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("report_id", sa.Integer, sa.ForeignKey("duplicate_reports.id", ondelete="CASCADE"), nullable=False),
        sa.Column("group_number", sa.BigInteger, nullable=False),
        sa.Column("sku", sa.String(512), nullable=False),
        sa.Column("other_sku", sa.String(512), nullable=False),
        sa.Column("similarity", sa.Float, nullable=False),
    )
    # A page of the review reads its groups' pairs by group number.
    op.create_index("ix_duplicate_pairs_report_group", "duplicate_pairs", ["report_id", "group_number"])


def downgrade() -> None:
    op.drop_index("ix_duplicate_pairs_report_group", "duplicate_pairs")
    op.drop_table("duplicate_pairs")
    op.drop_table("duplicate_reports")
