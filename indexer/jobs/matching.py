"""`python -m indexer match`: a folder of photos (a supplier's, say) matched against the catalog by the service's own
search (CatalogSearch), into a CSV with a row per match: photo,rank,sku,score,title,category. A photo that cannot
be read gets one row with its error instead (and is listed on stderr); the job goes on.

The folder is walked as a catalog folder is (indexer.catalog), and its photos read, decoded and embedded as `make
index` embeds catalog photos (indexer.jobs.pipeline: batches on every core), so a catalog photo's best match is its
own product, at a score of 1.0.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from indexer.config import Settings
from indexer.index.live_index import Filters

COLUMNS = ("photo", "rank", "sku", "score", "title", "category", "error")
# Unreadable photos listed on stderr, at most (all of them are in the CSV's error column).
LISTED = 20


class FilterError(ValueError):
    """A filter the command line gives that the catalog cannot apply."""


@dataclass
class MatchReport:
    folder: Path
    out: Path
    photos: int = 0
    matched: int = 0
    rows: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.photos / self.seconds if self.seconds else 0.0
        lines = [
            f"Matched {self.matched} of {self.photos} photos of {self.folder}: {self.rows} matches in {self.out}, "
            f"in {self.seconds:.1f} s ({rate:.1f} photos/s)."
        ]
        if self.failures:
            lines.append(f"  {len(self.failures)} could not be read (a row with its error each in {self.out}):")
            lines += [f"  - {failure}" for failure in self.failures[:LISTED]]
            if len(self.failures) > LISTED:
                lines.append(f"  ... and {len(self.failures) - LISTED} more")
        return "\n".join(lines)


def match_folder(
    settings: Settings, folder: Path, out: Path, k: int, filters: Filters, progress: bool = True
) -> MatchReport:
    """Every photo of `folder` searched in the catalog (its k best products that pass the filters), written to `out`
    in the folder's order. Raises CatalogError for a folder that cannot be read, NotReady without an index, and
    FilterError for a category or attribute the catalog does not have."""
    from tqdm import tqdm

    from indexer.catalog import scan_catalog
    from indexer.embedding.model import load_embedder, load_network_for
    from indexer.index.search import CatalogSearch
    from indexer.jobs.pipeline import thread_distributor
    from indexer.storage.store import Store

    started = time.perf_counter()
    photos = scan_catalog(folder).photos
    report = MatchReport(folder, out, photos=len(photos))
    workers = settings.embed_workers
    cores = settings.sharing_cores(workers)  # one single-threaded interpreter per embedding thread, as make index
    search = CatalogSearch(
        settings,
        load_embedder(cores, create_export=False, concurrency=workers),
        Store.open(settings, upgrade=False),
        load_network=lambda identity: load_network_for(cores, identity, concurrency=workers),
    )
    view = search.current()
    _check_filters(filters, search.categories(view), view.live.attribute_names())
    order = {image.rel_path: position for position, image in enumerate(photos)}
    # The photo alone, never the catalog's extra views: a query is one photo, as the service's are.
    one_view = settings.with_overrides(catalog_views=())
    with open(out, "w", newline="") as handle, thread_distributor(one_view, view.embedder) as embedding:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        bar = tqdm(total=len(photos), desc="Matching", unit="photo", disable=not progress)
        for batch in embedding.embed(photos, {}):
            rows: list[tuple[int, list[object]]] = []
            for image, vector in zip(batch.embedded, batch.vectors, strict=True):
                matches = search.search(view, vector, k, filters)
                for rank, m in enumerate(matches, start=1):
                    row = [image.rel_path, rank, m.sku, f"{m.score:.6f}", m.title, m.category or "", ""]
                    rows.append((order[image.rel_path], row))
                report.matched += 1
                report.rows += len(matches)
            for image, problem in batch.failures:
                rows.append((order[image.rel_path], [image.rel_path, "", "", "", "", "", problem]))
                report.failures.append(f"{image.rel_path}: {problem}")
            writer.writerows(row for _, row in sorted(rows, key=lambda pair: pair[0]))  # stable: ranks stay in order
            bar.update(len(batch.embedded) + len(batch.failures))
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _check_filters(filters: Filters, categories: list[str], attributes: list[str]) -> None:
    if filters.category is not None and filters.category not in categories:
        raise FilterError(f"unknown category {filters.category!r}; the catalog's are {', '.join(categories[:30])}")
    for name, _ in filters.attributes:
        if name not in attributes:
            raise FilterError(f"unknown attribute {name!r}; the catalog's are {', '.join(attributes[:30]) or 'none'}")


def filters_of(args: argparse.Namespace) -> Filters:
    """The command line's filters, as a search's: attribute values case-folded, a repeated name any of its values."""
    wanted: dict[str, set[str]] = {}
    for given in args.attr or []:
        name, equals, value = given.partition("=")
        if not equals or not name.strip():
            raise FilterError(f"--attr takes NAME=VALUE (e.g. --attr size=M), not {given!r}")
        wanted.setdefault(name, set()).add(value.strip().casefold())
    if args.min_price is not None and args.max_price is not None and args.min_price > args.max_price:
        raise FilterError("--min-price is above --max-price")
    attributes = tuple((name, frozenset(values)) for name, values in sorted(wanted.items()))
    return Filters(args.category, args.min_price, args.max_price, attributes)


def cmd_match(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.errors import NotReady

    folder, out = Path(args.photos), Path(args.out)
    k = args.k or settings.default_k
    if not 1 <= k <= settings.max_k:
        print(f"error: --k must be from 1 to {settings.max_k} (service.max_k)", file=sys.stderr)
        return 2
    try:
        report = match_folder(settings, folder, out, k, filters_of(args), progress=not args.quiet)
    except NotReady as exc:
        print(f"error: the catalog cannot be searched yet ({exc}); run `make index CATALOG=...` first", file=sys.stderr)
        return 2
    except FilterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.photos == 0:
        print(f"warning: {folder} holds no JPEG, PNG or WebP photo", file=sys.stderr)
        return 1
    return 0


def add_match_command(commands: argparse._SubParsersAction) -> None:
    match = commands.add_parser("match", help="match a folder of photos against the catalog, into a CSV")
    match.add_argument("--photos", required=True, metavar="DIR", help="folder of photos (searched recursively)")
    match.add_argument("--out", required=True, metavar="FILE", help="the CSV to write: photo,rank,sku,score,...")
    match.add_argument("--k", type=int, help="matches per photo (default: service.default_k)")
    match.add_argument("--category", help="only products of this category")
    match.add_argument("--min-price", type=float, help="only products at this price or above")
    match.add_argument("--max-price", type=float, help="only products at this price or below")
    match.add_argument("--attr", action="append", metavar="NAME=VALUE", help="attribute filter (repeatable)")
    match.add_argument("--quiet", action="store_true", help="no progress bar")
    match.set_defaults(run=cmd_match)
