"""Words: the full-text index of each product's title, category and attribute values, and searching it.

SQLite keeps an FTS5 table, product_text (rowid = product id), that triggers on products keep in step with every
write, whatever statement makes it (make index, import-vectors, the write API); PostgreSQL keeps a generated
tsvector column, products.words, under a GIN index, which the database itself recomputes on every write. Both are
made by migrations/versions/0007_product_words.py. Both tokenise language-neutrally (FTS5's unicode61 without
diacritics; PostgreSQL's 'simple' configuration), so "apple" finds "Apple" and no word is stemmed or dropped.

A shopper's words never reach either query language as they were typed: they are split into tokens here
(letters and digits), and each token is passed quoted (FTS5) or through plainto_tsquery (PostgreSQL), so no
operator, quote or wildcard can change the query. Every token must occur (AND).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Float, Integer, bindparam, column, func, literal, select, table, text
from sqlalchemy.engine import Engine

from indexer.records import ShownProduct
from indexer.storage.schema import HAS_LIVE_IMAGE, Product

if TYPE_CHECKING:  # the storage layer does not import the vector index
    from indexer.index.live_index import Filters

# The longest `q` accepted, in characters, and the most tokens searched for.
MAX_WORDS_CHARS = 200
MAX_TOKENS = 16
# A token is a run of letters and digits: what FTS5's unicode61 tokenizer keeps (it splits on "_" too).
_TOKEN = re.compile(r"[^\W_]+")

# The FTS5 table on SQLite; its columns are title, category and attrs (the attribute values).
FTS_TABLE = "product_text"
# The tsvector column on PostgreSQL.
TSVECTOR_COLUMN = "words"
# The PostgreSQL text search configuration: no stemming, no stop words.
PG_CONFIG = "simple"


class WordsError(ValueError):
    """Words that cannot be searched; the message says what to send."""


@dataclass(frozen=True)
class Words:
    """A shopper's words as searched: the tokens, lower-cased, in order, without repeats."""

    tokens: tuple[str, ...]

    @classmethod
    def parse(cls, raw: str) -> Words:
        """The tokens of `raw`; WordsError when it is blank, longer than MAX_WORDS_CHARS or holds no letter or
        digit."""
        if not raw.strip():
            raise WordsError("q is empty: send the words to search for, or leave q out")
        if len(raw) > MAX_WORDS_CHARS:
            raise WordsError(f"q is {len(raw)} characters long; send at most {MAX_WORDS_CHARS}")
        tokens = tuple(dict.fromkeys(token.casefold() for token in _TOKEN.findall(raw)))
        if not tokens:
            raise WordsError(f"q holds no word to search for (letters or digits), only {raw[:40]!r}")
        return cls(tokens[:MAX_TOKENS])

    def fts5_query(self) -> str:
        """An FTS5 MATCH expression: each token as a quoted string (a token holds no quote), all required."""
        return " ".join(f'"{token}"' for token in self.tokens)

    def plain(self) -> str:
        """The tokens as plain text, for PostgreSQL's plainto_tsquery (which ANDs them)."""
        return " ".join(self.tokens)


_FTS = table(FTS_TABLE, column("rowid", Integer), column("rank", Float))


class ProductText:
    """The full-text index of one database's products (Store.text)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def search(
        self, words: Words, limit: int, filters: Filters | None = None, exclude_sku: str | None = None
    ) -> list[ShownProduct]:
        """The `limit` live products that hold every token, most relevant first, each once, with its relevance as
        its score (higher is better: -bm25 on SQLite, ts_rank_cd on PostgreSQL); the category and price filters
        apply in the same query."""
        if self.engine.dialect.name == "postgresql":
            query = func.plainto_tsquery(text(f"'{PG_CONFIG}'::regconfig"), bindparam("words", words.plain()))
            vector = column(TSVECTOR_COLUMN)
            relevance = func.ts_rank_cd(vector, query)
            statement = select(*_SHOWN, relevance.label("relevance")).where(vector.op("@@")(query))
        else:
            # bm25 is lower for better matches; FTS5 computes it as its `rank` column, which ORDER BY uses directly.
            statement = (
                select(*_SHOWN, (-_FTS.c.rank).label("relevance"))
                .join(_FTS, _FTS.c.rowid == Product.id)
                .where(text(f"{FTS_TABLE} MATCH :words").bindparams(words=words.fts5_query()))
            )
        statement = statement.where(HAS_LIVE_IMAGE, *_conditions(filters, self.engine.dialect.name))
        if exclude_sku is not None:
            statement = statement.where(Product.sku != exclude_sku)
        statement = statement.order_by(text("relevance DESC"), Product.id).limit(limit)
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        return [
            ShownProduct(row.sku, row.title, row.category, row.price, row.url, score=float(row.relevance))
            for row in rows
        ]


_SHOWN = (Product.id, Product.sku, Product.title, Product.category, Product.price, Product.url)


def _conditions(filters: Filters | None, dialect: str) -> list:
    """The filters as conditions on products, as the vector search applies them."""
    if filters is None:
        return []
    conditions = []
    if filters.category is not None:
        conditions.append(Product.category == filters.category)
    if filters.min_price is not None:
        conditions.append(Product.price >= filters.min_price)
    if filters.max_price is not None:
        conditions.append(Product.price <= filters.max_price)
    for name, values in filters.attributes:
        conditions.append(_attribute_in(name, values, dialect))
    return conditions


def _attribute_in(name: str, values: frozenset[str], dialect: str):
    """The product's attribute `name` is one of `values` (already case-folded), as the vector search matches it:
    str.casefold on SQLite (a function the engine registers), lower() on PostgreSQL (the same but for a few letters
    such as ß)."""
    values = sorted(values)
    if dialect == "postgresql":
        return func.lower(Product.attributes[name].as_string()).in_(values)
    entries = func.json_each(Product.attributes).table_valued("key", "value")
    return (
        select(literal(1))
        .select_from(entries)
        .where(entries.c.key == name, func.casefold(entries.c.value).in_(values))
        .exists()
    )
