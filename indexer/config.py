"""Settings for the indexer and the service, read once from config.toml.

Environment variables override the paths so one checkout can serve several
catalogs: DATA_DIR, CATALOG, METADATA, MODELS_DIR, DATABASE_URL (PRECISION and WHITENING for the model), and
SEARCH_CONFIG to point at another config file (and API_KEY, MEMORY_BUDGET_MB,
FETCH_ALLOW_PRIVATE, CORS_ORIGINS for the service; VECTOR_STORE, MILVUS_URI, MILVUS_TOKEN and CATALOG_VIEWS
for the index).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.toml"

MODEL_NAMES = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
PRECISIONS = ("fp32", "int8")
# The genuine ImageNet MobileNet v1 that `make weights` converts from a PyPI file.
PYPI_WEIGHTS = "pypi-mobilenet-v1"
# Written by `make finetune` in models_dir: the fine-tuned model version in use.
ACTIVE_MODEL_FILE = "active-model.json"
BACKENDS = ("faiss", "milvus")
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
    catalog_dir: Path
    metadata_path: Path | None
    model_name: str = "mobilenet_v1"
    weights: str = PYPI_WEIGHTS
    batch_size: int = 32
    engine: str = "litert"
    # "int8": the LiteRT model quantised to 8-bit integers, calibrated on catalog photos (as good as fp32 on
    # every protocol measured, 2.3x as fast: docs/model.md "Precision"); or "fp32".
    precision: str = "int8"
    # Whitening learned on the catalog (indexer/embedding/whitening.py), fitted by the first `make index` of a catalog;
    # `whitening_dims` directions are kept. None ("auto"): the plain network's vectors are whitened, a fine-tuned
    # model's are not (it cost one category 0.11-0.15 R@1 on both fine-tune seeds measured: eval/README.md);
    # True or False forces it either way (`whitens` is the outcome). WHITENING overrides (auto/on/off).
    whitening: bool | None = None
    whitening_dims: int = 96
    # How the last feature map becomes one vector: "avg" (average pooling) or "gem" (generalised mean, with p).
    pooling: str = "avg"
    gem_p: float = 3.0
    # Weights of a fine-tuned version of this model (from models/active-model.json), if any.
    finetuned: Path | None = None
    # Inference threads per interpreter, and indexing threads (each decodes a batch and embeds it
    # with its own interpreter); 0 = automatic.
    model_threads: int = 0
    index_workers: int = 0
    data_dir: Path = REPO_ROOT / "data"
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
    models_dir: Path = REPO_ROOT / "models"
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 12
    max_k: int = 100
    max_upload_bytes: int = 10_000_000
    # Search by image_url: the whole fetch (every redirect, the body) must finish within this many seconds.
    fetch_timeout_s: float = 5.0
    # While off, image_url may only reach public addresses (no loopback, private, metadata...: request forgery).
    fetch_allow_private: bool = False
    # Server worker processes (0 = one per core) and request threads per process (0 = two per core, divided
    # among the processes).
    workers: int = 0
    threads: int = 0
    # Query photos (the `query` token of a search) are kept in <data_dir>/queries for this many seconds after
    # their last use, for every worker and host; 0 keeps them in the memory of the process that got them.
    query_ttl_s: float = 3600.0
    # The storefront write API (PUT/DELETE /api/products/<sku>) is off while this is empty.
    api_key: str = ""
    # A server refuses to load a base segment that would take its resident memory past this; 0 = no limit.
    memory_budget_mb: int = 0
    # Origins (scheme://host[:port]) whose pages may call the read API from a browser; empty = none.
    cors_origins: tuple[str, ...] = ()

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
        """Whether `make index` whitens this model's vectors: model.whitening, or with "auto" the plain network's."""
        return self.finetuned is None if self.whitening is None else self.whitening

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


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: object) -> Settings:
    """Read config.toml, apply environment overrides, then explicit keyword overrides."""
    config_path = Path(config_path or os.environ.get("SEARCH_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid TOML: {exc}") from None
    base = config_path.resolve().parent
    catalog = raw.get("catalog", {})
    model = raw.get("model", {})
    index = raw.get("index", {})
    service = raw.get("service", {})
    env = os.environ

    catalog_dir = _path(base, env.get("CATALOG") or catalog.get("path", "catalog"))
    metadata = env.get("METADATA") or catalog.get("metadata") or ""
    settings = Settings(
        catalog_dir=catalog_dir,
        metadata_path=_path(base, metadata) if metadata else None,
        model_name=model.get("name", "mobilenet_v1"),
        weights=str(model.get("weights", PYPI_WEIGHTS)),
        batch_size=int(model.get("batch_size", 32)),
        engine=env.get("ENGINE") or model.get("engine", "litert"),
        precision=env.get("PRECISION") or model.get("precision", Settings.precision),
        whitening=_flag_or_auto(
            "model.whitening (or WHITENING)", env.get("WHITENING") or model.get("whitening", "auto")
        ),
        whitening_dims=int(model.get("whitening_dims", Settings.whitening_dims)),
        pooling=model.get("pooling", Settings.pooling),
        gem_p=float(model.get("gem_p", Settings.gem_p)),
        model_threads=int(model.get("threads", 0)),
        index_workers=int(index.get("workers", 0)),
        data_dir=_path(base, env.get("DATA_DIR") or index.get("data_dir", "data")),
        database_url=env.get("DATABASE_URL") or index.get("database_url", ""),
        index_factory=index.get("factory", "auto"),
        index_backend=env.get("VECTOR_STORE") or index.get("backend", Settings.index_backend),
        milvus_uri=_uri(base, env.get("MILVUS_URI") or index.get("milvus_uri", Settings.milvus_uri)),
        milvus_token=env.get("MILVUS_TOKEN") or index.get("milvus_token", Settings.milvus_token),
        milvus_collection=index.get("milvus_collection", Settings.milvus_collection),
        catalog_views=catalog_views(env.get("CATALOG_VIEWS") or index.get("catalog_views", Settings.catalog_views)),
        compact_after=int(index.get("compact_after", 5_000)),
        models_dir=_path(base, env.get("MODELS_DIR") or index.get("models_dir", "models")),
        host=service.get("host", "127.0.0.1"),
        port=int(service.get("port", 8000)),
        default_k=int(service.get("default_k", 12)),
        max_k=int(service.get("max_k", 100)),
        max_upload_bytes=int(service.get("max_upload_bytes", 10_000_000)),
        fetch_timeout_s=float(service.get("fetch_timeout_s", Settings.fetch_timeout_s)),
        fetch_allow_private=_flag(
            "service.fetch_allow_private (or FETCH_ALLOW_PRIVATE)",
            env.get("FETCH_ALLOW_PRIVATE") or service.get("fetch_allow_private", Settings.fetch_allow_private),
        ),
        workers=int(service.get("workers", Settings.workers)),
        threads=int(service.get("threads", Settings.threads)),
        query_ttl_s=float(service.get("query_ttl_s", Settings.query_ttl_s)),
        api_key=env.get("API_KEY") or service.get("api_key", ""),
        memory_budget_mb=int(env.get("MEMORY_BUDGET_MB") or service.get("memory_budget_mb", 0)),
        cors_origins=_names(env.get("CORS_ORIGINS") or service.get("cors_origins", ())),
    )
    settings = replace(settings, **overrides) if overrides else settings
    if model.get("use_finetuned", True) and "finetuned" not in overrides:
        settings = replace(settings, finetuned=active_finetuned(settings))
    validate(settings)
    return settings


def _flag(name: str, value: object) -> bool:
    """A true/false setting from TOML (a boolean) or the environment (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} = {value!r}: use true or false")


def _flag_or_auto(name: str, value: object) -> bool | None:
    """_flag, or None for "auto" (the setting's default decides, by the model)."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        return _flag(name, value)
    except ConfigError:
        raise ConfigError(f'{name} = {value!r}: use "auto", true or false') from None


def active_finetuned(settings: Settings) -> Path | None:
    """The fine-tuned weights `make finetune` activated for this base model and weights, if any."""
    try:
        active = json.loads((settings.models_dir / ACTIVE_MODEL_FILE).read_text())
    except FileNotFoundError:
        return None
    if active.get("base_model") != settings.model_name or active.get("base_weights") != settings.weights:
        return None
    path = settings.models_dir / active["weights"]
    return path if path.exists() else None


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
    if settings.batch_size < 1:
        raise ConfigError("model.batch_size must be at least 1")
    if settings.workers < 0 or settings.threads < 0:
        raise ConfigError("service.workers and service.threads must be 0 (automatic) or more")
    if not settings.query_ttl_s >= 0:
        raise ConfigError("service.query_ttl_s must be 0 (memory only) or a positive number of seconds")
    if not settings.fetch_timeout_s > 0:
        raise ConfigError("service.fetch_timeout_s must be a positive number of seconds")
    for origin in settings.cors_origins:
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"service.cors_origins (or CORS_ORIGINS): {origin[:100]!r} is not an origin; write each as "
                "scheme://host[:port], as a browser sends it (e.g. https://shop.example), with no path or '*'"
            )
