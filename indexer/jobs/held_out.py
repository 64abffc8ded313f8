"""What a shop serves after fine-tuning: every candidate configuration measured on the catalog's held-out photos.

The candidates are the plain network and the fine-tuned one, each without and with a whitening fitted on the
training photos' own vectors, embedded as the shop would serve them (the configured engine, precision and extra
catalog views, through the indexing pipeline). The held-out photos are the queries and the training photos the
catalog. R@1 decides, mAP@10 breaks near ties, and nothing but the plain default is activated unless it beats the
plain default by more than MARGIN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.catalog import CatalogImage
from indexer.config import Settings
from indexer.embedding.whitening import fit as fit_whitening
from indexer.retrieval_metrics import mean_average_precision, recall_at

# A candidate replaces the plain default only if its held-out R@1 is higher by more than this: on a held-out part
# of a few hundred photos one photo is 0.002-0.005, and a shop should not re-embed its catalog for a coin toss.
MARGIN = 0.005
# R@1 within this of the best counts as a tie, which mAP@10 (the whole top 10) breaks.
TIE = 0.002
K = 10
# Held-out photos ranked at a time: bounds the similarity matrix for any catalog size.
QUERY_CHUNK = 256


@dataclass(frozen=True)
class Candidate:
    """One configuration a shop could serve, and its held-out figures (None: it could not be measured, e.g. too
    few training photos to fit a whitening on)."""

    network: str  # "plain" or "finetuned"
    whitened: bool
    recall_at_1: float | None = None
    map_at_10: float | None = None

    @property
    def name(self) -> str:
        return self.network + ("+whitening" if self.whitened else "")

    @property
    def measured(self) -> bool:
        return self.recall_at_1 is not None

    def as_dict(self) -> dict:
        figures = {"recall@1": round(self.recall_at_1, 4), "map@10": round(self.map_at_10, 4)} if self.measured else {}
        return {"name": self.name, "network": self.network, "whitening": self.whitened, **figures}


@dataclass(frozen=True)
class Decision:
    """The candidates, the plain default they are held against, the best of them, and whether it is activated."""

    candidates: tuple[Candidate, ...]
    plain_default: Candidate
    best: Candidate
    activated: bool
    queries: int
    catalog: int

    def as_dict(self) -> dict:
        return {
            "protocol": "held-out photos of each category against the training photos",
            "queries": self.queries,
            "catalog": self.catalog,
            "margin": MARGIN,
            "candidates": [c.as_dict() for c in self.candidates],
            "plain_default": self.plain_default.name,
            "best": self.best.name,
            "activated": self.best.name if self.activated else None,
        }


def score(vectors: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray) -> tuple[float, float]:
    """R@1 and mAP@10 of the held-out photos' first vectors against the training photos, each ranked by its
    closest vector (its photo's or an extra view's). vectors: (photos, 1 + views, dim) unit vectors."""
    views = vectors.shape[1]
    catalog = vectors[train].reshape(len(train) * views, -1)
    hits = []
    for start in range(0, len(held), QUERY_CHUNK):
        queries = held[start : start + QUERY_CHUNK]
        similarity = (vectors[queries, 0] @ catalog.T).reshape(len(queries), len(train), views).max(axis=2)
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :K]
        hits.append(labels[train][top] == labels[queries][:, None])
    hits = np.concatenate(hits)
    return recall_at(hits, 1), mean_average_precision(hits, K)


def measure(network: str, vectors: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray,
            whitening_dims: int) -> list[Candidate]:  # fmt: skip
    """The network's two candidates: its vectors as they are, and whitened by a fit on the training photos alone
    (as `make index` fits on the photos, not their extra views)."""
    candidates = [Candidate(network, False, *score(vectors, labels, train, held))]
    names = [str(label) for label in labels[train]]
    whitening = fit_whitening([(vectors[train, 0], names)], whitening_dims)
    if whitening is None:
        return [*candidates, Candidate(network, True)]
    whitened = whitening.apply(vectors.reshape(-1, vectors.shape[2])).reshape(*vectors.shape[:2], -1)
    return [*candidates, Candidate(network, True, *score(whitened, labels, train, held))]


def best_of(candidates: Sequence[Candidate]) -> Candidate:
    """The highest R@1; among those within TIE of it, the highest mAP@10."""
    measured = [c for c in candidates if c.measured]
    top = max(c.recall_at_1 for c in measured)
    return max((c for c in measured if c.recall_at_1 >= top - TIE), key=lambda c: (c.map_at_10, c.recall_at_1))


def decide(candidates: Sequence[Candidate], forced_whitening: bool | None, queries: int, catalog: int) -> Decision:
    """The plain default is the plain network as `make index` would serve it without fine-tuning: whitened unless
    model.whitening says otherwise (or the training photos are too few to fit one). With model.whitening forced,
    only candidates with that whitening compete."""
    plain = {c.whitened: c for c in candidates if c.network == "plain"}
    if forced_whitening is not None:
        default = plain[forced_whitening]
        eligible = [c for c in candidates if c.whitened == forced_whitening]
    else:
        default = plain[True] if plain[True].measured else plain[False]
        eligible = list(candidates)
    best = best_of(eligible)
    activated = best != default and best.recall_at_1 > default.recall_at_1 + MARGIN
    return Decision(tuple(candidates), default, best, activated, queries, catalog)


def embed_photos(
    settings: Settings,
    images: Sequence[CatalogImage],
    label: str,
    progress: bool,
    catalog: Path | None = None,
    metadata: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(photos, 1 + views, dim) unit vectors of the configured model, unwhitened, through the indexing pipeline
    (the one preprocessing path, with settings.catalog_views), and which photos decoded (the others' rows are
    zeros). An int8 model not calibrated yet is calibrated on `catalog`, as `make index` would."""
    from indexer.embedding.model import load_embedder
    from indexer.jobs.indexing import distributor

    cores = settings.sharing_cores(settings.embed_workers)
    embedder = load_embedder(cores, concurrency=cores.embed_workers, catalog=catalog, metadata=metadata)
    views = 1 + len(settings.catalog_views)
    vectors = np.zeros((len(images), views, embedder.network.dim), np.float32)
    decoded = np.zeros(len(images), bool)
    position = {image.rel_path: i for i, image in enumerate(images)}
    with distributor(cores, embedder) as embedding:
        bar = tqdm(total=len(images), desc=f"Measuring {label}", unit="img", disable=not progress)
        for batch in embedding.embed(images, {}):
            rows = [position[image.rel_path] for image in batch.embedded]
            vectors[rows] = batch.vectors.reshape(len(rows), views, -1)
            decoded[rows] = True
            bar.update(len(batch.embedded) + len(batch.failures))
        bar.close()
    return vectors, decoded


def describe(held_out: dict) -> list[str]:
    """The table of a decision (Decision.as_dict), as `make finetune` prints it."""
    lines = [f"Held-out photos: {held_out['queries']} queries against {held_out['catalog']} training photos",
             f"  {'candidate':<22} {'R@1':>6} {'mAP@10':>7}"]  # fmt: skip
    for candidate in held_out["candidates"]:
        figures = (f"{candidate['recall@1']:>6.3f} {candidate['map@10']:>7.3f}" if "recall@1" in candidate
                   else f"{'-':>6} {'-':>7}  (too few training photos to fit a whitening)")  # fmt: skip
        notes = [note for note, name in (("plain default", held_out["plain_default"]), ("best", held_out["best"]))
                 if name == candidate["name"]]  # fmt: skip
        lines.append(f"  {candidate['name']:<22} {figures}" + (f"  <- {', '.join(notes)}" if notes else ""))
    return lines


def verdict(held_out: dict | None) -> str:
    """What was activated and why, with its figures, from a decision (Decision.as_dict; None: nothing held out)."""
    if held_out is None:
        return ("Nothing new is active: no photo could be held out to measure the new version against the plain "
                "network (a category needs 4 or more photos for one to be held out).")  # fmt: skip
    by_name = {candidate["name"]: candidate for candidate in held_out["candidates"]}
    default, best = by_name[held_out["plain_default"]], by_name[held_out["best"]]
    if held_out["activated"]:
        return (f"{best['name']} is active: held-out R@1 {best['recall@1']:.3f} against the plain default's "
                f"{default['recall@1']:.3f} ({default['name']}).")  # fmt: skip
    tuned = max((c for c in held_out["candidates"] if c["network"] == "finetuned" and "recall@1" in c),
                key=lambda c: (c["recall@1"], c["map@10"]))  # fmt: skip
    return (f"Nothing new is active: no candidate beat the plain default ({default['name']}, held-out R@1 "
            f"{default['recall@1']:.3f}) by more than {held_out['margin']}; the fine-tuned model reached "
            f"{tuned['recall@1']:.3f} ({tuned['name']}).")  # fmt: skip
