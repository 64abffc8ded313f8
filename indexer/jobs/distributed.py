"""The indexing job's decoding and embedding on a Ray cluster (RAY_ADDRESS set; `local` starts one here): the
pipeline's Distributor on Ray actors.

The driver (`make index`) still stats, reads and hashes the photos, since it has the files, and writes the
store; it ships the bytes of the photos that need embedding to a pool of Ray actors, each holding one LiteRT
interpreter (one thread) made from the model bytes put once into the object store, so the cluster's machines
need the Python environment but neither the photos nor the models folder. Actors decode with the project's
one preprocessing path (indexer.embedding.images.load_pixels), so rows and vectors are those of a plain run.
Imported only when RAY_ADDRESS is set: a plain run never imports Ray, and an install without it is told how to add it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np

from indexer.catalog import CatalogImage
from indexer.config import REPO_ROOT, ConfigError, Settings
from indexer.embedding.engines import LiteRTEngine
from indexer.embedding.images import limit_decoding
from indexer.embedding.model import Embedder
from indexer.jobs.pipeline import CheckedBatch, CheckedFiles, Known, check_files, decode_photos, in_batches

try:
    import ray
except ModuleNotFoundError as missing:  # Ray is an optional install: only a run on a cluster needs it
    if missing.name != "ray":
        raise
    raise ConfigError(
        "RAY_ADDRESS is set, so the indexing runs on Ray, which this install lacks: pip install -r "
        "requirements-ray.txt (make does when RAY_ADDRESS is set), or unset RAY_ADDRESS"
    ) from None

# A local cluster's object store: enough for a few batches of photo bytes in flight, small enough for a laptop.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20


class EmbedActor:
    """One LiteRT interpreter (one thread) on a cluster CPU: photo bytes -> the network's features (the driver's
    Embedder.finish makes them the index's vectors)."""

    def __init__(self, model: bytes, input_size: int, image_max_mb: int):
        self.engine = LiteRTEngine(Path("ray-shipped.tflite"), threads=1, model_content=model)
        self.input_size = input_size
        limit_decoding(image_max_mb)

    def embed(self, photos: list[bytes], views: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[int, str]]:
        """The features of the photos that decode (each followed by its extra views'), in order, and
        {position: problem} for those that do not."""
        pixels, problems = decode_photos(photos, self.input_size, views)
        if not len(pixels):
            return np.zeros((0, 0), np.float32), problems
        return self.engine.features(pixels), problems


def _init(address: str) -> None:
    if address == "local":
        # A cluster in this process's care, its workers importing this checkout; ray.shutdown() ends it.
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address=None,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    else:
        ray.init(address=address, log_to_driver=False)


class RayDistributor:
    """The pipeline's Distributor on Ray actors: batches are checked on the driver's threads, then sent to the
    actors in turn; results come back in order; at most 2 batches per actor are being embedded and as many more
    being checked, so memory stays bounded for any catalog size."""

    def __init__(
        self, embedder: Embedder, pool: ThreadPoolExecutor, actors: list, batch_size: int, views: tuple[str, ...] = ()
    ):
        self.embedder, self.pool, self.actors = embedder, pool, actors
        self.batch_size, self.views = batch_size, views

    def embed(self, images: Sequence[CatalogImage], known: Known) -> Iterator[CheckedBatch]:
        embedder, pool, actors, views = self.embedder, self.pool, self.actors, self.views
        model_key, ahead = embedder.identity.key, 2 * len(actors)
        batches = in_batches(images, self.batch_size)
        checking = deque(pool.submit(check_files, batch, known, model_key, views) for batch in islice(batches, ahead))
        embedding: deque[tuple[CheckedFiles, object]] = deque()
        sent = 0

        def send_next() -> None:
            nonlocal sent
            checked = checking.popleft().result()
            if (batch := next(batches, None)) is not None:
                checking.append(pool.submit(check_files, batch, known, model_key, views))
            photos = [data for _, data in checked.to_embed]
            ref = actors[sent % len(actors)].embed.remote(photos, views) if photos else None
            sent += 1 if photos else 0
            embedding.append((checked, ref))

        while checking and len(embedding) < ahead:
            send_next()

        def in_order() -> Iterator[CheckedBatch]:
            while embedding:
                checked, ref = embedding.popleft()
                if checking:
                    send_next()
                yield _assemble(checked, ref, embedder)

        return in_order()


@contextmanager
def ray_distributor(settings: Settings, embedder: Embedder) -> Iterator[RayDistributor]:
    """Connect to RAY_ADDRESS (or start a local cluster), start the actors, and yield a RayDistributor whose checks
    run on settings.embed_workers threads; disconnect (and stop a local cluster) at the end."""
    if not isinstance(embedder.engine, LiteRTEngine):
        raise ConfigError('indexing on Ray (RAY_ADDRESS) needs the LiteRT engine (model.engine = "litert")')
    with ThreadPoolExecutor(max_workers=settings.embed_workers, thread_name_prefix="embed") as pool:
        _init(os.environ["RAY_ADDRESS"])
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1))
            count = settings.index_workers or max(1, int(cpus))
            # More actors than CPUs (index.workers) share them, rather than waiting for CPUs that never come.
            remote = ray.remote(num_cpus=min(1.0, cpus / count))(EmbedActor)
            model = ray.put(embedder.engine.model_content)
            actors = [remote.remote(model, embedder.input_size, settings.image_max_mb) for _ in range(count)]
            yield RayDistributor(embedder, pool, actors, settings.batch_size, settings.catalog_views)
        finally:
            ray.shutdown()


def _assemble(checked: CheckedFiles, ref, embedder: Embedder) -> CheckedBatch:
    features, problems = ray.get(ref) if ref is not None else (np.zeros((0, 0), np.float32), {})
    empty = np.zeros((0, embedder.identity.dim), np.float32)
    return checked.decoded(problems, embedder.finish(features) if len(features) else empty)
