"""Words: a full-text index of each product's title, category and attribute values (indexer.storage.text).

SQLite: an FTS5 table, product_text (rowid = the product's id), kept in step by triggers on products, so every
statement that writes a product (bulk or one at a time) updates it in the same transaction. It keeps its own copy
of the text: an external-content table would need the attribute values as a column of products. PostgreSQL: a
generated tsvector column, products.words, with a GIN index; the database recomputes it on every write. Both
are filled for the products already stored.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The attribute values of a products row (`row`: new or old), as one text.
_SQLITE_ATTRS = "(SELECT group_concat(value, ' ') FROM json_each({row}.attributes))"
_SQLITE_INSERT = (
    "INSERT INTO product_text(rowid, title, category, attrs) "
    "VALUES (new.id, new.title, coalesce(new.category, ''), " + _SQLITE_ATTRS.format(row="new") + ")"
)
SQLITE = [
    # unicode61 folds case and, with remove_diacritics 2, accents: "Éclair" is found by "eclair".
    "CREATE VIRTUAL TABLE product_text USING fts5(title, category, attrs, tokenize = 'unicode61 remove_diacritics 2')",
    f"CREATE TRIGGER product_text_insert AFTER INSERT ON products BEGIN {_SQLITE_INSERT}; END",
    "CREATE TRIGGER product_text_update AFTER UPDATE OF title, category, attributes ON products BEGIN "
    f"DELETE FROM product_text WHERE rowid = old.id; {_SQLITE_INSERT}; END",
    "CREATE TRIGGER product_text_delete AFTER DELETE ON products BEGIN "
    "DELETE FROM product_text WHERE rowid = old.id; END",
    "INSERT INTO product_text(rowid, title, category, attrs) "
    "SELECT id, title, coalesce(category, ''), " + _SQLITE_ATTRS.format(row="products") + " FROM products",
]
# 'simple': lower-cased words, no stemming and no stop words, whatever the catalog's language. The attribute
# values are the JSON document's strings (jsonb_to_tsvector), its keys are not words of the product.
POSTGRESQL = [
    "ALTER TABLE products ADD COLUMN words tsvector GENERATED ALWAYS AS ("
    "to_tsvector('simple'::regconfig, title || ' ' || coalesce(category, '')) || "
    "jsonb_to_tsvector('simple'::regconfig, coalesce(attributes, '{}'::jsonb), '[\"string\", \"numeric\"]')"
    ") STORED",
    "CREATE INDEX ix_products_words ON products USING GIN (words)",
]


def upgrade() -> None:
    for statement in POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE:
        op.execute(sa.text(statement))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text("DROP INDEX ix_products_words"))
        op.execute(sa.text("ALTER TABLE products DROP COLUMN words"))
        return
    for trigger in ("insert", "update", "delete"):
        op.execute(sa.text(f"DROP TRIGGER product_text_{trigger}"))
    op.execute(sa.text("DROP TABLE product_text"))
