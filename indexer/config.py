"""Settings for the indexer and the service, read once from config.toml (SEARCH_CONFIG names another file).

Each default is a field default of Settings; KEYS maps each key of config.toml to its field, and to the environment
variable that overrides it (DATA_DIR, CATALOG, ... : one checkout can serve several catalogs).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.toml"

MODEL_NAMES = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
PRECISIONS = ("fp32", "int8")
# The genuine ImageNet MobileNet v1 that `make weights` converts from a PyPI file.
PYPI_WEIGHTS = "pypi-mobilenet-v1"
# Written by `make finetune` in models_dir: the fine-tuned model version in use.
ACTIVE_MODEL_FILE = "active-model.json"
BACKENDS = ("faiss", "milvus")
# How POST /api/recommend ranks the catalog from liked and unliked products (indexer.index.recommend).
RECOMMEND_RULES = ("average_vector", "best_score")
# Extra views of each catalog photo that index.catalog_views may add (indexer.embedding.images.load_views makes them).
CATALOG_VIEWS = ("flip", "crop")
MILVUS_URL = re.compile(r"(https?|tcp)://|unix:")
MILVUS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,200}")
# An origin as browsers send it: scheme://host[:port], the host a name or a bracketed IPv6 address, no path.
ORIGIN = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(:\d{1,5})?"
)


class ConfigError(ValueError):
    """The configuration cannot work; the message says what to change."""


def is_milvus_lite(uri: str) -> bool:
    """A Milvus URI that names a Milvus Lite file (embedded Milvus) rather than a server."""
    return uri.endswith(".db") and "://" not in uri


@dataclass(frozen=True)
class Settings:
    # Relative paths (these defaults, and the configured ones) are relative to the config file's folder:
    # load_settings resolves them.
    catalog_dir: Path = Path("catalog")
    # The catalog's products.csv or .jsonl; None: <catalog>/products.csv when it exists.
    metadata_path: Path | None = None
    model_name: str = "mobilenet_v1"
    weights: str = PYPI_WEIGHTS
    batch_size: int = 32
    engine: str = "litert"
    # "int8": the LiteRT model quantised to 8-bit integers, calibrated on catalog photos (as good as fp32 on
    # every protocol measured, 2.3x as fast: docs/model.md "Precision"); or "fp32".
    precision: str = "int8"
    # Whitening learned on the catalog (indexer/embedding/whitening.py), fitted by the first `make index` of a catalog;
    # `whitening_dims` directions are kept. None ("auto"): what `make finetune` measured best on the catalog's
    # held-out photos for the active model (indexer/jobs/held_out.py); without that measurement the plain network's
    # vectors are whitened and a fine-tuned model's are not. True or False forces it either way (`whitens` is the
    # outcome). WHITENING overrides (auto/on/off).
    whitening: bool | None = None
    whitening_dims: int = 96
    # How the last feature map becomes one vector: "avg" (average pooling) or "gem" (generalised mean, with p).
    pooling: str = "avg"
    gem_p: float = 3.0
    # Search with the version of this model that `make finetune` activated, if there is one.
    use_finetuned: bool = True
    # Weights of a fine-tuned version of this model (from models/active-model.json), if any.
    finetuned: Path | None = None
    # Whether to whiten the active model's vectors, as `make finetune` chose on the held-out photos (from
    # models/active-model.json); None where nothing was measured. Followed when model.whitening is "auto".
    held_out_whitening: bool | None = None
    # Inference threads per interpreter, and indexing threads (each decodes a batch and embeds it
    # with its own interpreter); 0 = automatic.
    model_threads: int = 0
    index_workers: int = 0
    # The memory one process's image decodings may hold at once, in MB (indexer.embedding.images.DecodeBudget): a
    # photo that alone would take more is refused, decodings that together would take more wait their turn.
    image_max_mb: int = 128
    data_dir: Path = Path("data")
    database_url: str = ""
    index_factory: str = "auto"
    # Where vectors are searched: "faiss" (base segments in <data_dir>/index plus a delta in each server) or
    # "milvus" (a Milvus collection holding the vectors, deletions, categories and prices). VECTOR_STORE overrides.
    index_backend: str = "faiss"
    # Milvus: a path ending in .db is Milvus Lite (embedded, one process at a time); http://host:19530 a Milvus
    # server or cluster. Empty: Milvus Lite in <data_dir>/milvus.db. MILVUS_URI / MILVUS_TOKEN override.
    milvus_uri: str = ""
    milvus_token: str = ""
    # Extra views of each catalog photo indexed beside it, as more vectors of the same product (CATALOG_VIEWS):
    # "flip" (its mirror image) and "crop" (its centre). They cost index time and index size, not query time.
    catalog_views: tuple[str, ...] = ()
    # Collections are named <milvus_collection>_<model>, one per model, so several catalogs can share a cluster.
    milvus_collection: str = "visual_search"
    # Changed images the delta may hold before a compaction folds them into a new base.
    compact_after: int = 5_000
    models_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 12
    max_k: int = 100
    # The most matches a preview grid draws (GET /api/search/preview.png): each panel costs tens of ms of CPU.
    # A larger k is drawn as this many.
    preview_max_k: int = 24
    max_upload_bytes: int = 10_000_000
    # POST /api/search/batch: the most items (photos and skus) and the most bytes of its body (service/front.py).
    max_batch: int = 32
    max_batch_bytes: int = 40_000_000
    # Search by image_url: the whole fetch (every redirect, the body) must finish within this many seconds.
    fetch_timeout_s: float = 5.0
    # While off, image_url may only reach public addresses (no loopback, private, metadata...: request forgery).
    fetch_allow_private: bool = False
    # The only ports image_url may name (after every redirect too).
    fetch_ports: tuple[int, ...] = (80, 443)
    # Server worker processes (0 = one per core) and request threads per process (0 = two per core, divided
    # among the processes).
    workers: int = 0
    threads: int = 0
    # Query photos (the `query` token of a search) are kept in <data_dir>/queries for this many seconds after
    # their last use, for every worker and host; 0 keeps them in the memory of the process that got them.
    query_ttl_s: float = 3600.0
    # The query photos kept in <data_dir>/queries take at most about this many MB (the least recently used go first).
    query_store_mb: int = 200
    # The storefront write API (PUT/DELETE /api/products/<sku>) is off while this is empty.
    api_key: str = ""
    # A server refuses to load a base segment that would take its resident memory past this; 0 = no limit.
    memory_budget_mb: int = 0
    # Origins (scheme://host[:port]) whose pages may call the read API from a browser; empty = none.
    cors_origins: tuple[str, ...] = ()
    # A request's headers, and each part of its body, must arrive within this many seconds (the body also at
    # 20 kB/s or faster past them), else the server answers 408 and closes the connection.
    read_timeout_s: float = 5.0
    # Words beside a photo (q): the weight of the words' ranking in the reciprocal rank fusion with the visual
    # ranking, score = 1/(60 + visual rank) + text_weight/(60 + text rank); 0 ranks by the photo alone among
    # the union of both rankings.
    text_weight: float = 0.25
    # Facets (facets=category,price,attr.<name>) count the best facet_depth matches of a search after its
    # filters, unless the request asks for another depth (facet_depth=), at most max_facet_depth: each match
    # counted is one more product searched for and read.
    facet_depth: int = 200
    max_facet_depth: int = 1000
    # POST /api/recommend: its rule (RECOMMEND_RULES), the weight of the unliked mean in "average_vector", and the
    # most items its like list, and its unlike list, may hold.
    recommend_rule: str = "average_vector"
    unlike_weight: float = 0.25
    recommend_max_items: int = 16
    duplicates_threshold: float = 0.7  # near-copies' cosine (indexer.jobs.duplicates checks it; eval/README.md)

    @property
    def pooling_name(self) -> str:
        """ "avg", or "gem3" for GeM with p = 3: part of the model's identity."""
        return "avg" if self.pooling == "avg" else f"gem{self.gem_p:g}"

    @property
    def network_name(self) -> str:
        """The model's name with its pooling, as its converted files are named."""
        return self.model_name if self.pooling == "avg" else f"{self.model_name}-{self.pooling_name}"

    @property
    def whitens(self) -> bool:
        """Whether `make index` whitens this model's vectors: model.whitening; with "auto", what the held-out
        measurement chose for the active model, or else the plain network's and not a fine-tuned model's."""
        if self.whitening is not None:
            return self.whitening
        return self.finetuned is None if self.held_out_whitening is None else self.held_out_whitening

    @property
    def embed_workers(self) -> int:
        return self.index_workers or cpu_count()

    @property
    def inference_threads(self) -> int:
        """Threads per interpreter: the configured number, or all cores for a lone interpreter."""
        return self.model_threads or cpu_count()

    def sharing_cores(self, interpreters: int) -> Settings:
        """These settings with the cores divided among `interpreters` running side by side."""
        if self.model_threads:
            return self
        return replace(self, model_threads=max(1, cpu_count() // interpreters))

    @property
    def milvus_lite(self) -> bool:
        """Vectors in a Milvus Lite file, which only one process at a time may open."""
        return self.index_backend == "milvus" and is_milvus_lite(self.milvus_target)

    @property
    def server_workers(self) -> int:
        """Server processes: the configured number, or one per core; one alone where a second would break
        things: on a Milvus Lite file (one process may open it), or with query photos kept in memory only (a
        token made by one process would be unknown to the others)."""
        if self.workers:
            return self.workers
        return 1 if self.milvus_lite or self.query_ttl_s <= 0 else cpu_count()

    @property
    def server_threads(self) -> int:
        """Request threads per server process: the configured number, or two per core divided among the processes
        (while one waits on the network or SQLite, the other runs its interpreter)."""
        return self.threads or max(1, 2 * cpu_count() // self.server_workers)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.sqlite3'}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def milvus_target(self) -> str:
        """The Milvus URI to connect to: index.milvus_uri, or Milvus Lite in the data folder."""
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    def with_overrides(self, **changes: object) -> Settings:
        # The held-out choice belongs to the model it was measured on: another model starts without one.
        if changes.get("finetuned", self.finetuned) != self.finetuned:
            changes.setdefault("held_out_whitening", None)
        return replace(self, **changes)


def cpu_count() -> int:
    """CPUs this process may use (respects affinity and container limits where the OS reports them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def process_memory_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from Linux's /proc; elsewhere the
    peak from getrusage."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _path(base: Path, value: str | os.PathLike[str]) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _uri(base: Path, value: str) -> str:
    """index.milvus_uri: a URL as it is; a file path (Milvus Lite) relative to the config file's folder."""
    if not value or "://" in value or value.startswith("unix:"):
        return value
    return str(_path(base, value))


def _names(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A list setting as a tuple: a TOML list, or a comma-separated string (from the environment)."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def catalog_views(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """index.catalog_views in CATALOG_VIEWS' order, once each; "none" (from the environment) is none."""
    names = () if value == "none" else _names(value)
    unknown = [name for name in names if name not in CATALOG_VIEWS]
    if unknown:
        raise ConfigError(
            f"index.catalog_views (or CATALOG_VIEWS): unknown view {unknown[0][:40]!r}; "
            f"choose from {', '.join(CATALOG_VIEWS)} (or none)"
        )
    return tuple(view for view in CATALOG_VIEWS if view in names)


# How a value, from TOML or an environment variable's text, becomes a field's: (value, the key's name in messages).
Parse = Callable[[Any, str], Any]


def _text(value: Any, name: str) -> str:
    return str(value)


def _whole(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {value!r}: use a whole number") from None


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {value!r}: use a number") from None


def _folder(value: Any, name: str) -> Path:
    """A path as given; load_settings takes a relative one from the config file's folder (_in_folder)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {value!r}: use a path, as a string")
    return Path(value)


def _optional_folder(value: Any, name: str) -> Path | None:
    return _folder(value, name) if value else None


def _flag(value: Any, name: str) -> bool:
    """A true/false setting from TOML (a boolean) or the environment (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} = {value!r}: use true or false")


def _flag_or_auto(value: Any, name: str) -> bool | None:
    """_flag, or None for "auto" (the setting's default decides, by the model)."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        return _flag(value, name)
    except ConfigError:
        raise ConfigError(f'{name} = {value!r}: use "auto", true or false') from None


def _views(value: Any, name: str) -> tuple[str, ...]:
    return catalog_views(value)


def _list(value: Any, name: str) -> tuple[str, ...]:
    return _names(value)


def _ports(value: Any, name: str) -> tuple[int, ...]:
    """TCP ports: a TOML list of whole numbers, or a comma-separated string (from the environment)."""
    items = _names(value) if isinstance(value, str) else value
    try:
        ports = tuple(int(item) for item in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {value!r}: use a list of port numbers, e.g. [80, 443]") from None
    if not ports or not all(0 < port < 65536 for port in ports):
        raise ConfigError(f"{name} = {value!r}: use one or more port numbers from 1 to 65535, e.g. [80, 443]")
    return ports


@dataclass(frozen=True)
class Key:
    """A key of config.toml: the Settings field it sets (whose default is the key's), how a value becomes that
    field's, and the environment variable that overrides it, if any (an empty variable counts as unset)."""

    field: str
    parse: Parse
    env: str = ""

    def shown(self, key: str) -> str:
        """The key as messages name it: "model.whitening (or WHITENING)"."""
        return f"{key} (or {self.env})" if self.env else key


# Every key config.toml may hold, in its order.
KEYS: dict[str, Key] = {
    "catalog.path": Key("catalog_dir", _folder, "CATALOG"),
    "catalog.metadata": Key("metadata_path", _optional_folder, "METADATA"),
    "model.name": Key("model_name", _text),
    "model.weights": Key("weights", _text),
    "model.use_finetuned": Key("use_finetuned", _flag),
    "model.batch_size": Key("batch_size", _whole),
    "model.engine": Key("engine", _text, "ENGINE"),
    "model.precision": Key("precision", _text, "PRECISION"),
    "model.whitening": Key("whitening", _flag_or_auto, "WHITENING"),
    "model.whitening_dims": Key("whitening_dims", _whole),
    "model.pooling": Key("pooling", _text),
    "model.gem_p": Key("gem_p", _number),
    "model.threads": Key("model_threads", _whole),
    "model.image_max_mb": Key("image_max_mb", _whole),
    "index.data_dir": Key("data_dir", _folder, "DATA_DIR"),
    "index.database_url": Key("database_url", _text, "DATABASE_URL"),
    "index.factory": Key("index_factory", _text),
    "index.compact_after": Key("compact_after", _whole),
    "index.catalog_views": Key("catalog_views", _views, "CATALOG_VIEWS"),
    "index.backend": Key("index_backend", _text, "VECTOR_STORE"),
    "index.milvus_uri": Key("milvus_uri", _text, "MILVUS_URI"),
    "index.milvus_token": Key("milvus_token", _text, "MILVUS_TOKEN"),
    "index.milvus_collection": Key("milvus_collection", _text),
    "index.models_dir": Key("models_dir", _folder, "MODELS_DIR"),
    "index.workers": Key("index_workers", _whole),
    "index.duplicates_threshold": Key("duplicates_threshold", _number),
    "service.host": Key("host", _text),
    "service.port": Key("port", _whole),
    "service.default_k": Key("default_k", _whole),
    "service.max_k": Key("max_k", _whole),
    "service.preview_max_k": Key("preview_max_k", _whole),
    "service.max_upload_bytes": Key("max_upload_bytes", _whole),
    "service.max_batch": Key("max_batch", _whole),
    "service.max_batch_bytes": Key("max_batch_bytes", _whole),
    "service.fetch_timeout_s": Key("fetch_timeout_s", _number),
    "service.fetch_allow_private": Key("fetch_allow_private", _flag, "FETCH_ALLOW_PRIVATE"),
    "service.fetch_ports": Key("fetch_ports", _ports),
    "service.workers": Key("workers", _whole),
    "service.threads": Key("threads", _whole),
    "service.query_ttl_s": Key("query_ttl_s", _number),
    "service.query_store_mb": Key("query_store_mb", _whole),
    "service.api_key": Key("api_key", _text, "API_KEY"),
    "service.memory_budget_mb": Key("memory_budget_mb", _whole, "MEMORY_BUDGET_MB"),
    "service.cors_origins": Key("cors_origins", _list, "CORS_ORIGINS"),
    "service.read_timeout_s": Key("read_timeout_s", _number),
    "service.text_weight": Key("text_weight", _number, "TEXT_WEIGHT"),
    "service.facet_depth": Key("facet_depth", _whole),
    "service.max_facet_depth": Key("max_facet_depth", _whole),
    "service.recommend_rule": Key("recommend_rule", _text),
    "service.unlike_weight": Key("unlike_weight", _number),
    "service.recommend_max_items": Key("recommend_max_items", _whole),
}


def read_config(config_path: Path) -> dict[str, dict[str, Any]]:
    """config.toml's sections, every one and every key in them known: an unknown one is a ConfigError that names
    it and the nearest known one."""
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid TOML: {exc}") from None
    sections = {key.split(".")[0] for key in KEYS}
    for section, table in raw.items():
        if section in sections and not isinstance(table, dict):
            raise ConfigError(f"{config_path}: {section} is a section: write its keys under [{section}]")
        if not isinstance(table, dict):
            # A key above every [section] header: the key of that name in whichever section has it.
            meant = _meant(section)
            hint = f"; did you mean {meant}?" if meant else ""
            raise ConfigError(f"{config_path}: unknown key {section} outside any [section]{hint}")
        if section not in sections:
            near = difflib.get_close_matches(section, sections, n=1)
            hint = f"; did you mean [{near[0]}]?" if near else f"; the sections are {', '.join(sorted(sections))}"
            raise ConfigError(f"{config_path}: unknown section [{section}]{hint}")
        for name in table:
            if f"{section}.{name}" not in KEYS:
                own = ", ".join(key.split(".")[1] for key in KEYS if key.startswith(f"{section}."))
                meant = _meant(name, section)
                hint = f"; did you mean {meant}?" if meant else f"; [{section}] holds {own}"
                raise ConfigError(f"{config_path}: unknown key {section}.{name}{hint}")
    return raw


def _meant(name: str, section: str = "") -> str:
    """The key(s) whose name is nearest to `name`: the one in `section` if it has one, else each that has it."""
    near = difflib.get_close_matches(name, {key.split(".")[1] for key in KEYS}, n=1)
    if not near:
        return ""
    if f"{section}.{near[0]}" in KEYS:
        return f"{section}.{near[0]}"
    return " or ".join(key for key in KEYS if key.endswith(f".{near[0]}"))


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: object) -> Settings:
    """Read config.toml, apply environment overrides, then explicit keyword overrides. What a key leaves unset is
    Settings' default; a relative path, configured or default, is taken from the config file's folder."""
    config_path = Path(config_path or os.environ.get("SEARCH_CONFIG") or DEFAULT_CONFIG)
    raw = read_config(config_path)
    values = {}
    for key, spec in KEYS.items():
        section, name = key.split(".")
        table = raw.get(section, {})
        if spec.env and (value := os.environ.get(spec.env)):
            values[spec.field] = spec.parse(value, spec.shown(key))
        elif name in table:
            values[spec.field] = spec.parse(table[name], spec.shown(key))
    settings = _in_folder(Settings(**values), config_path.resolve().parent)
    settings = replace(settings, **overrides) if overrides else settings
    if "finetuned" not in overrides:
        finetuned, whitening = active_model(settings)
        settings = replace(settings, finetuned=finetuned, held_out_whitening=whitening)
    validate(settings)
    return settings


def run_with_config(main: Callable[[], int]) -> int:
    """A command line's exit status: main's, once config.toml has been read. A configuration that cannot work (a
    misspelt key, a value out of range) ends the command at start, as it does later, with its message and status 2,
    not a traceback."""
    try:
        load_settings()
        return main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _in_folder(settings: Settings, folder: Path) -> Settings:
    """The settings with their relative paths, the defaults' and the configured ones, taken from `folder`."""
    metadata = settings.metadata_path
    return replace(
        settings,
        catalog_dir=_path(folder, settings.catalog_dir),
        metadata_path=None if metadata is None else _path(folder, metadata),
        data_dir=_path(folder, settings.data_dir),
        models_dir=_path(folder, settings.models_dir),
        milvus_uri=_uri(folder, settings.milvus_uri),
    )


def active_model(settings: Settings) -> tuple[Path | None, bool | None]:
    """What `make finetune` activated for this base model and weights: the fine-tuned weights (None: the plain
    network), and whether the held-out measurement chose to whiten them (None: not measured). A fine-tuned version
    is followed only with model.use_finetuned; a missing weights file is the plain network."""
    try:
        active = json.loads((settings.models_dir / ACTIVE_MODEL_FILE).read_text())
    except FileNotFoundError:
        return None, None
    if active.get("base_model") != settings.model_name or active.get("base_weights") != settings.weights:
        return None, None
    whitening = active.get("whitening")
    if active.get("weights") is None:  # the plain network, measured best with or without its whitening
        return None, whitening
    path = settings.models_dir / active["weights"]
    if not settings.use_finetuned or not path.exists():
        return None, None
    return path, whitening


def validate(settings: Settings) -> None:
    if settings.model_name not in MODEL_NAMES:
        raise ConfigError(
            f"model.name = {settings.model_name!r} is not supported; choose one of {', '.join(MODEL_NAMES)}"
        )
    if settings.weights == PYPI_WEIGHTS and settings.model_name != "mobilenet_v1":
        raise ConfigError(
            f"weights = {PYPI_WEIGHTS!r} exists only for mobilenet_v1; "
            f'use weights = "imagenet" or a .weights.h5 path with {settings.model_name}'
        )
    if settings.engine not in ("litert", "keras"):
        raise ConfigError(f'model.engine = {settings.engine!r}: choose "litert" or "keras"')
    if settings.precision not in PRECISIONS:
        raise ConfigError(f'model.precision (or PRECISION) = {settings.precision!r}: choose "fp32" or "int8"')
    if settings.precision == "int8" and settings.engine != "litert":
        raise ConfigError('model.precision = "int8" needs model.engine = "litert" (Keras runs the fp32 network)')
    if settings.pooling not in ("avg", "gem"):
        raise ConfigError(f'model.pooling = {settings.pooling!r}: choose "avg" or "gem"')
    if not 1.0 <= settings.gem_p <= 16.0:
        raise ConfigError("model.gem_p must be between 1 and 16")
    if settings.whitening_dims < 8:
        raise ConfigError("model.whitening_dims must be at least 8")
    if not 1 <= settings.default_k <= settings.max_k:
        raise ConfigError("service.default_k must be between 1 and service.max_k")
    if settings.preview_max_k < 1:
        raise ConfigError("service.preview_max_k must be at least 1")
    if settings.max_batch < 1 or not (upload := settings.max_upload_bytes) <= settings.max_batch_bytes <= 8 * upload:
        raise ConfigError("service.max_batch must be at least 1, max_batch_bytes from max_upload_bytes to 8 times it")
    if not 0.0 <= settings.text_weight <= 100.0:
        raise ConfigError("service.text_weight must be a number from 0 to 100")
    if not 1 <= settings.facet_depth <= settings.max_facet_depth:
        raise ConfigError("service.facet_depth must be between 1 and service.max_facet_depth")
    if settings.recommend_rule not in RECOMMEND_RULES:
        raise ConfigError(f"service.recommend_rule = {settings.recommend_rule!r}: choose one of {RECOMMEND_RULES}")
    if not 0.0 <= settings.unlike_weight <= 10.0 or settings.recommend_max_items < 1:
        raise ConfigError("service.unlike_weight must be from 0 to 10, and service.recommend_max_items at least 1")
    if settings.index_backend not in BACKENDS:
        raise ConfigError(f'index.backend (or VECTOR_STORE) = {settings.index_backend!r}: choose "faiss" or "milvus"')
    uri = settings.milvus_target
    if settings.index_backend == "milvus" and not (MILVUS_URL.match(uri) or uri.endswith(".db")):
        raise ConfigError(
            f"index.milvus_uri (or MILVUS_URI) = {uri!r}: give a Milvus Lite file ending in .db, "
            "or a server's address such as http://milvus-host:19530"
        )
    if not MILVUS_NAME.fullmatch(settings.milvus_collection):
        raise ConfigError("index.milvus_collection: letters, digits and underscores, starting with a letter")
    if settings.compact_after < 1:
        raise ConfigError("index.compact_after must be at least 1")
    if settings.image_max_mb < 16:
        raise ConfigError("model.image_max_mb must be at least 16 (MB)")
    if settings.batch_size < 1:
        raise ConfigError("model.batch_size must be at least 1")
    if settings.workers < 0 or settings.threads < 0:
        raise ConfigError("service.workers and service.threads must be 0 (automatic) or more")
    if not settings.query_ttl_s >= 0:
        raise ConfigError("service.query_ttl_s must be 0 (memory only) or a positive number of seconds")
    if settings.query_store_mb < 1:
        raise ConfigError("service.query_store_mb must be at least 1 (MB)")
    if not settings.fetch_timeout_s > 0:
        raise ConfigError("service.fetch_timeout_s must be a positive number of seconds")
    if not 1 <= settings.read_timeout_s <= 600:
        raise ConfigError("service.read_timeout_s must be a number of seconds from 1 to 600")
    for origin in settings.cors_origins:
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"service.cors_origins (or CORS_ORIGINS): {origin[:100]!r} is not an origin; write each as "
                "scheme://host[:port], as a browser sends it (e.g. https://shop.example), with no path or '*'"
            )
