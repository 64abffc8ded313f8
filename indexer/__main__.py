"""Command line: `python -m indexer COMMAND`, one command per job.

python -m indexer index --catalog ../shared/datasets/grocery-store --metadata catalog.csv
python -m indexer index --catalog ../shared/datasets/grocery-store --metadata catalog.csv --refit
python -m indexer compact
python -m indexer import-vectors --vectors vectors.npy --products products.csv
python -m indexer duplicates --threshold 0.95 --out duplicates.csv
python -m indexer match --photos supplier-photos --out matches.csv --k 5
python -m indexer weights
PRECISION=int8 python -m indexer weights --catalog ../shared/datasets/grocery-store --metadata catalog.csv
python -m indexer migrate
python -m indexer demo-catalog demo-catalog
python -m indexer backup --to backups/2026-12-07
python -m indexer backup --verify backups/2026-12-07
DATA_DIR=restored python -m indexer restore --from backups/2026-12-07
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from indexer.catalog import CatalogError, in_catalog
from indexer.config import ConfigError, Settings, load_settings
from indexer.embedding.weights import WeightsError
from indexer.errors import BackupError
from indexer.jobs.duplicates import add_duplicates_command
from indexer.jobs.finetune import BLOCKS, FinetuneOptions
from indexer.jobs.matching import add_match_command


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.embedding.model import load_embedder
    from indexer.jobs.indexing import PruneNeeded, index_catalog

    catalog = Path(args.catalog) if args.catalog else settings.catalog_dir
    metadata = in_catalog(catalog, args.metadata)
    if not catalog.is_dir():
        print(
            f"error: catalog folder {catalog} does not exist. Pass CATALOG=<folder of product photos>.", file=sys.stderr
        )
        return 2
    settings = settings.sharing_cores(settings.embed_workers)
    embedder = load_embedder(settings, concurrency=settings.embed_workers, catalog=catalog, metadata=metadata)
    try:
        report = index_catalog(
            settings,
            embedder,
            catalog,
            metadata,
            progress=not args.quiet,
            add_only=args.add,
            prune=args.prune,
            refit=args.refit,
        )
    except PruneNeeded as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    print(report.summary())
    if report.indexed == 0:
        print("warning: nothing is searchable: the catalog has no readable images.", file=sys.stderr)
    print(f"Index and database are in {settings.data_dir}. Next: make serve", file=sys.stderr)
    return 0


def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.embedding.model import load_embedder
    from indexer.index.compaction import compact, compaction_due, with_catalog_whitening
    from indexer.index.segments import read_manifest
    from indexer.storage.store import Store

    store = Store.open(settings)
    embedder = with_catalog_whitening(settings, store, load_embedder(settings))
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import sync_locked

        # Milvus compacts its own segments; this brings its collection up to the store's head (loading every
        # vector into a new one) and purges the database's old tombstones.
        print(sync_locked(settings, store, embedder.identity, purge=True).summary())
        return 0
    if_base = args.if_base
    if args.if_due:
        # The base it is due for: a compaction elsewhere (another server, another host) may replace it first.
        seen = (read_manifest(settings.index_dir) or {}).get("version", "")
        if (reason := compaction_due(settings, store, embedder)) is None:
            print("no compaction due: the delta is below index.compact_after")
            return 0
        if_base = seen if if_base is None else if_base
    conditional = args.if_due or if_base is not None
    report = compact(settings, store, embedder, progress=not args.quiet, wait=not conditional, if_base=if_base)
    if report is None:
        print("another compaction is running or has just replaced the base; it folds in these changes")
        return 0
    if args.if_due:
        print(f"compacting because {reason}")
    print(report.summary())
    return 0


def cmd_import_vectors(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.embedding.model import load_embedder
    from indexer.jobs.importing import import_vectors

    embedder = load_embedder(settings, create_export=False)
    report = import_vectors(settings, embedder, Path(args.vectors), Path(args.products), progress=not args.quiet)
    print(report.summary())
    print(f"Index and database are in {settings.data_dir}. Next: make serve", file=sys.stderr)
    return 0


def cmd_weights(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.embedding.model import ensure_litert_export, resolve_weights

    print(f"weights ready: {resolve_weights(settings)}")
    if settings.engine != "litert":
        return 0
    # The fp32 model always: the reference the int8 one is checked against, and PRECISION=fp32's model.
    print(f"LiteRT model ready (fp32): {ensure_litert_export(settings.with_overrides(precision='fp32')).model_path}")
    if settings.precision == "int8":
        catalog = Path(args.catalog) if args.catalog else None
        metadata = in_catalog(catalog, args.metadata) if catalog else None
        try:
            export = ensure_litert_export(settings, catalog=catalog, metadata=metadata, recalibrate=args.recalibrate)
        except ConfigError as exc:
            if catalog is not None or args.recalibrate:
                raise
            # Nothing to calibrate on yet: `make index CATALOG=...` calibrates on that catalog's photos.
            print(f"int8 model not made yet: {exc}")
            return 0
        print(f"LiteRT model ready (int8): {export.model_path}")
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.storage.database import migrate, shown_url

    migrate(settings.db_url)
    print(f"database schema is current: {shown_url(settings.db_url)}")
    return 0


def cmd_demo_catalog(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.jobs.demo_catalog import write_demo_catalog

    out = write_demo_catalog(Path(args.out), per_category=args.per_category)
    print(f"demo catalog written to {out} (queries to try in {out.name}-queries/)")
    return 0


def cmd_finetune(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.config import ACTIVE_MODEL_FILE

    active = settings.models_dir / ACTIVE_MODEL_FILE
    if args.reset:
        active.unlink(missing_ok=True)
        print("the plain ImageNet model is active again; run `make index` to re-embed the catalog")
        return 0
    from indexer.jobs.finetune import finetune, split_layer
    from indexer.jobs.held_out import describe, verdict

    catalog = Path(args.catalog) if args.catalog else settings.catalog_dir
    metadata = in_catalog(catalog, args.metadata)
    options = FinetuneOptions(
        epochs=args.epochs,
        views=args.views,
        split_layer=split_layer(args.blocks),
        metric_loss=args.metric_loss,
        metric_weight=args.metric_weight,
        seed=args.seed,
    )
    summary = finetune(settings, catalog, metadata, options, progress=not args.quiet)
    print(f"trained in {summary['seconds'] / 60:.1f} min: validation R@1 {summary['validation_recall@1']:.3f} "
          f"(epoch {summary['best_epoch']} of {options.epochs})")  # fmt: skip
    if summary["held_out"] is not None:
        print("\n".join(describe(summary["held_out"])))
    print(verdict(summary["held_out"]))
    if summary["activated"]:
        print("Next: make index CATALOG=... to re-embed the catalog with it.")
        return 0
    print(f"The trained version is kept in {settings.models_dir / summary['weights']}, not active.")
    if settings.finetuned is not None:
        print(
            f"The active model is still {settings.finetuned.name.removesuffix('.weights.h5')}; "
            "`python -m indexer finetune --reset` returns to the plain network."
        )
    return 0


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.backup import take_backup, verify_backup
    from indexer.storage.store import Store

    if args.verify:
        snapshot = verify_backup(Path(args.verify), progress=not args.quiet)
        print(f"Complete and intact: {snapshot.summary()}")
        return 0
    store = Store.open(settings, upgrade=False)
    snapshot = take_backup(settings, store, Path(args.to), progress=not args.quiet)
    print(f"Backed up {snapshot.summary()}")
    print(f"Next: python -m indexer backup --verify {snapshot.folder}; restore with "
          f"DATA_DIR=<empty folder> python -m indexer restore --from {snapshot.folder}", file=sys.stderr)  # fmt: skip
    return 0


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    from indexer.backup import restore_backup

    snapshot = restore_backup(settings, Path(args.source), progress=not args.quiet)
    print(f"Restored {snapshot.summary()} into {settings.data_dir}")
    print(f"Next: DATA_DIR={settings.data_dir} make serve", file=sys.stderr)
    return 0


def _add_finetune_command(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser("finetune", help="adapt the model to a catalog's categories (transfer learning)")
    tune.add_argument("--catalog", help="folder of product photos with a category for each")
    tune.add_argument("--metadata", help="products.csv or .jsonl (default: <catalog>/products.csv if present)")
    tune.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    tune.add_argument(
        "--views",
        type=int,
        default=FinetuneOptions.views,
        help="augmented views of each photo (the first is unaltered)",
    )
    tune.add_argument(
        "--blocks",
        type=int,
        default=BLOCKS,
        choices=range(1, 8),
        help="last blocks of the network trained (3: blocks 11-13; 2: blocks 12-13, the 12-epoch recipe "
        "measured in eval/README.md#whitening)",
    )
    tune.add_argument(
        "--metric-loss",
        choices=("none", "multi_similarity"),
        default=FinetuneOptions.metric_loss,
        help="a metric-learning loss next to the cosine classifier, on class-balanced batches (16 categories x 4 "
        "photos); none: the classifier alone, on shuffled batches",
    )
    tune.add_argument(
        "--metric-weight", type=float, default=FinetuneOptions.metric_weight, help="its weight against CosFace"
    )
    tune.add_argument(
        "--seed",
        type=int,
        default=FinetuneOptions.seed,
        help="the validation split, the augmentations and the classifier's start; another seed is another draw of "
        "the same recipe (eval/README.md compares two)",
    )
    tune.add_argument("--reset", action="store_true", help="go back to the plain ImageNet model")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(run=cmd_finetune)


def _add_backup_commands(commands: argparse._SubParsersAction) -> None:
    """backup (--to, --verify) and restore."""
    backup = commands.add_parser(
        "backup", help="a snapshot of the database, index, uploads and models, taken while servers serve and write"
    )
    chosen = backup.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--to", metavar="DIR", help="write the snapshot to this new folder")
    chosen.add_argument("--verify", metavar="DIR", help="check every file of the snapshot in DIR")
    backup.add_argument("--quiet", action="store_true", help="no progress bars")
    backup.set_defaults(run=cmd_backup)

    restore = commands.add_parser(
        "restore", help="a snapshot into an empty data folder (and, on PostgreSQL, an empty database)"
    )
    restore.add_argument("--from", dest="source", required=True, metavar="DIR", help="the snapshot's folder")
    restore.add_argument("--quiet", action="store_true", help="no progress bars")
    restore.set_defaults(run=cmd_restore)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m indexer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="config file (default: config.toml, or $SEARCH_CONFIG)")
    parser.add_argument("--data-dir", help="where the database and index live (default: $DATA_DIR or data/)")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="embed a catalog folder and publish its search index")
    index.add_argument("--catalog", help="folder of product photos (default: catalog.path in config)")
    index.add_argument("--metadata", help="products.csv or .jsonl (default: <catalog>/products.csv if present)")
    index.add_argument("--add", action="store_true", help="add and update only: remove nothing (new photos)")
    index.add_argument(
        "--prune", action="store_true", help="remove the folder's products whose photos are gone, however many"
    )
    index.add_argument(
        "--refit", action="store_true", help="fit the catalog's whitening again (every photo is embedded again)"
    )
    index.add_argument("--quiet", action="store_true", help="no progress bars")
    index.set_defaults(run=cmd_index)

    compact = commands.add_parser(
        "compact", help="fold the changes since the base segment into a new one (runs by itself when due)"
    )
    compact.add_argument("--if-due", action="store_true", help="only when the delta passed index.compact_after")
    compact.add_argument(
        "--if-base",
        metavar="VERSION",
        help="only while VERSION is the current base, and not waiting for a running compaction "
        "(what a server starts: one compaction, wherever several servers decide on it at once)",
    )
    compact.add_argument("--quiet", action="store_true", help="no progress bars")
    compact.set_defaults(run=cmd_compact)

    imports = commands.add_parser("import-vectors", help="load embeddings computed elsewhere, with their products")
    imports.add_argument("--vectors", required=True, help=".npy of shape (rows, model dimension), float32")
    imports.add_argument(
        "--products", required=True, help="csv with sku,title,category,price,url,image; row i = vector i"
    )
    imports.add_argument("--quiet", action="store_true", help="no progress bars")
    imports.set_defaults(run=cmd_import_vectors)

    weights = commands.add_parser(
        "weights", help="fetch and convert the configured model weights (and its LiteRT model)"
    )
    weights.add_argument("--catalog", help="int8 only: calibrate on this catalog's photos if none was used yet")
    weights.add_argument("--metadata", help="the catalog's products.csv or .jsonl (default: its own, if present)")
    weights.add_argument(
        "--recalibrate", action="store_true", help="int8 only: calibrate again (then `make index` re-embeds)"
    )
    weights.set_defaults(run=cmd_weights)

    _add_finetune_command(commands)
    _add_backup_commands(commands)
    add_match_command(commands)
    add_duplicates_command(commands)

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(run=cmd_migrate)

    demo = commands.add_parser("demo-catalog", help="write the Fashion-MNIST demo catalog")
    demo.add_argument("out", help="folder to write")
    demo.add_argument("--per-category", type=int, default=300)
    demo.set_defaults(run=cmd_demo_catalog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {"data_dir": Path(args.data_dir).resolve()} if args.data_dir else {}
        settings = load_settings(args.config, **overrides)
        return args.run(settings, args)
    except (ConfigError, CatalogError, WeightsError, BackupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in ("tensorflow", "keras"):
            raise
        # The serve-only install (requirements-serve.txt) runs the LiteRT models that TensorFlow made elsewhere.
        print(
            f"error: building or converting the model needs TensorFlow, which is not installed here ({exc}): "
            "pip install -r requirements.txt, or make the models folder on a host with the default install "
            "(make weights, then make index) and copy it here",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
