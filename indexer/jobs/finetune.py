"""Transfer learning: adapt MobileNet's last blocks to a catalog's own categories.

The network up to block 10 stays frozen; its feature maps of several augmented views of each
catalog photo are computed once and cached on disk. Blocks 11-13 are then trained on those
maps with a cosine classifier over the catalog's categories (CosFace margin) and a multi-similarity
loss on class-balanced batches, so that photos of one category end up close in cosine similarity:
what the index searches by. A stratified validation split of the catalog (never the shopper queries)
picks the best epoch. The recipe was chosen on grocery shop photos: eval/README.md#whitening.

Interrupting is safe: the cache fills in resumable chunks and training resumes from the last
finished epoch (Keras BackupAndRestore). The result is a new model version under
models/finetuned/. It is made the active one in models/active-model.json only when the held-out
photos say it serves better than the plain network (indexer/jobs/held_out.py); `make index` then
re-embeds everything with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.catalog import CatalogImage, scan_catalog
from indexer.config import ACTIVE_MODEL_FILE, Settings
from indexer.embedding.images import load_pixels, open_image
from indexer.jobs.held_out import TIE, Decision, decide, embed_photos, measure, score

# The last blocks of MobileNet v1 (blocks 1-13) that are trained; the layer before them is the last frozen one.
BLOCKS = 3


def split_layer(blocks: int) -> str:
    return f"conv_pw_{13 - blocks}_relu"


SPLIT_LAYER = split_layer(BLOCKS)
BACKBONE = "mobilenet_v1_features"


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 20
    views: int = 4
    batch_size: int = 64
    learning_rate: float = 2e-4
    scale: float = 24.0
    margin: float = 0.15
    val_fraction: float = 0.1
    seed: int = 0
    # "light": crops of 55-100 % of the photo, flips, brightness and contrast; "shop": also tighter crops,
    # colour, blur, a small tilt and a covered patch, like a shopper's photo of a product in a hand or a bag.
    augmentation: str = "light"
    # The last frozen layer: the blocks after it are trained.
    split_layer: str = SPLIT_LAYER
    # "multi_similarity" adds Wang et al.'s multi-similarity loss (CVPR 2019) on the batch's unit embeddings
    # to the CosFace loss: CosFace only pulls photos towards a learned class centre, this also pushes the
    # hardest photos of other categories away from each photo directly, which is what nearest-neighbour
    # search needs. Batches are then P categories x K photos (batch_size // photos_per_class categories), so
    # each photo has positives in its batch.
    metric_loss: str = "multi_similarity"
    metric_weight: float = 1.0
    photos_per_class: int = 4


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of training and validation items; each label keeps at least one training item."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = rng.permutation([i for i, item in enumerate(labels) if item == label])
        held = round(len(members) * fraction) if len(members) >= 4 else 0
        val += list(members[:held])
        train += list(members[held:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def augmented_pixels(image: CatalogImage, view: int, size: int, seed: int, augmentation: str = "light") -> np.ndarray:
    """View 0 is the photo as the indexer sees it; other views are random crops, flips and light changes
    (and with "shop" augmentation colour, blur, tilt and a covered patch)."""
    if view == 0:
        return load_pixels(image.path, size)
    from PIL import Image, ImageEnhance, ImageFilter

    rng = np.random.default_rng([seed, view, int(hashlib.sha1(image.rel_path.encode()).hexdigest()[:8], 16)])
    shop = augmentation == "shop"
    photo = open_image(image.path, target_size=size)
    if shop and rng.random() < 0.3:
        photo = photo.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    width, height = photo.size
    area = width * height * rng.uniform(0.3 if shop else 0.55, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * ratio))))
    crop_h = int(min(height, round(np.sqrt(area / ratio))))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    photo = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.8, 1.2))
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(0.8, 1.2))
    if shop:
        photo = ImageEnhance.Color(photo).enhance(rng.uniform(0.7, 1.3))
        if rng.random() < 0.3:
            photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    pixels = np.array(photo.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    if shop and rng.random() < 0.3:  # a hand, a price label or a bag edge over part of the product
        side_h, side_w = (int(size * rng.uniform(0.15, 0.4)) for _ in range(2))
        top, left = rng.integers(0, size - side_h), rng.integers(0, size - side_w)
        pixels[top : top + side_h, left : left + side_w] = rng.integers(0, 256, size=3)
    return pixels


def split_model(feature_model, split_layer: str = SPLIT_LAYER):
    """(lower, upper): the frozen network up to split_layer, and the trainable rest that shares
    its layers (and so its weights) with feature_model."""
    import keras

    backbone = feature_model.get_layer(BACKBONE)
    names = [layer.name for layer in backbone.layers]
    split = names.index(split_layer)
    scale = feature_model.layers[1]  # pixels -> [-1, 1]
    pixels = keras.Input(shape=feature_model.input_shape[1:])
    lower = keras.Model(pixels, keras.Model(backbone.input, backbone.get_layer(split_layer).output)(scale(pixels)))
    maps = keras.Input(shape=backbone.get_layer(split_layer).output.shape[1:])
    x = maps
    for layer in backbone.layers[split + 1 :]:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # small batches: keep the ImageNet statistics
        x = layer(x)
    return lower, keras.Model(maps, x)


def class_balanced_batches(labels: np.ndarray, train: np.ndarray, batches: int, batch_size: int, per_class: int,
                           rng: np.random.Generator) -> list[np.ndarray]:  # fmt: skip
    """Batches of batch_size // per_class training categories at random with per_class photos each
    (repeated when a category has fewer)."""
    members = [train[labels[train] == c] for c in np.unique(labels[train])]
    classes = min(len(members), max(2, batch_size // per_class))
    return [np.concatenate([rng.choice(members[c], size=per_class, replace=len(members[c]) < per_class)
                            for c in rng.choice(len(members), size=classes, replace=False)])
            for _ in range(batches)]  # fmt: skip


def multi_similarity_loss(labels, embeddings, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5):
    """Per photo: log(1 + sum over same-category photos of e^(-alpha(s - base))) / alpha
    + log(1 + sum over other-category photos of e^(beta(s - base))) / beta, s the cosine similarity
    (Wang et al. 2019, without their pair mining; the constants are theirs)."""
    from keras import ops

    unit = ops.normalize(embeddings, axis=-1)
    similarity = ops.matmul(unit, ops.transpose(unit))
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    same = ops.cast(ops.equal(labels[:, None], labels[None, :]), similarity.dtype)
    positive = same - ops.eye(ops.shape(similarity)[0], dtype=similarity.dtype)
    pull = ops.log1p(ops.sum(positive * ops.exp(-alpha * (similarity - base)), axis=1)) / alpha
    push = ops.log1p(ops.sum((1.0 - same) * ops.exp(beta * (similarity - base)), axis=1)) / beta
    return pull + push


def _cosine_classifier(classes: int, scale: float, margin: float):
    import keras
    from keras import ops

    class CosFace(keras.layers.Layer):
        """Logits s*(cos - m) for the true class and s*cos otherwise, on unit vectors."""

        def build(self, input_shape):
            self.centres = self.add_weight(shape=(input_shape[0][-1], classes), initializer="glorot_normal")

        def call(self, inputs):
            features, labels = inputs
            cosine = ops.matmul(ops.normalize(features, axis=-1), ops.normalize(self.centres, axis=0))
            return scale * (cosine - margin * ops.one_hot(ops.cast(labels, "int32"), classes))

    return CosFace()


def fill_cache(cache: Path, lower, images: list[CatalogImage], options: FinetuneOptions, progress: bool) -> np.ndarray:
    """float16 feature maps [views, images, H, W, C] on disk; rows already done are kept."""
    shape = (options.views, len(images), *lower.output_shape[1:])
    done_file = cache.with_suffix(".done.json")
    done = set(json.loads(done_file.read_text())) if done_file.exists() and cache.exists() else set()
    mode = "r+" if cache.exists() and done else "w+"
    maps = np.lib.format.open_memmap(cache, mode=mode, dtype=np.float16, shape=shape)
    chunk = 64
    work = [(v, s) for v in range(options.views) for s in range(0, len(images), chunk) if f"{v}:{s}" not in done]
    for view, start in tqdm(work, desc="Caching frozen features", unit="chunk", disable=not progress):
        photos = images[start : start + chunk]
        batch = np.stack([augmented_pixels(im, view, 224, options.seed, options.augmentation) for im in photos])
        maps[view, start : start + len(batch)] = lower.predict(batch.astype(np.float32), batch_size=32, verbose=0)
        maps.flush()
        done.add(f"{view}:{start}")
        done_file.write_text(json.dumps(sorted(done)))
    return maps


def validation_scores(vectors: np.ndarray, labels: np.ndarray, query: np.ndarray, catalog: np.ndarray) -> dict:
    """R@1 and mAP@10 of the query items against the catalog items (held_out.score); with no query items,
    leave-one-out R@1 within the catalog items (the training-split figure) and no mAP@10."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    if len(query) == 0:
        similarity = unit[catalog] @ unit[catalog].T
        np.fill_diagonal(similarity, -np.inf)
        return {"val_recall@1": float(np.mean(labels[catalog][similarity.argmax(axis=1)] == labels[catalog])),
                "val_map@10": 0.0}  # fmt: skip
    recall, average_precision = score(unit[:, None], labels, catalog, query)
    return {"val_recall@1": recall, "val_map@10": average_precision}


def better_epoch(scores: dict, best: dict) -> bool:
    """The rule that picks among candidates (held_out.best_of) picks the epoch too: a higher R@1, or within TIE of
    it a higher mAP@10. R@1 alone kept the first of several epochs that tie on a few hundred photos."""
    if scores["val_recall@1"] > best["val_recall@1"] + TIE:
        return True
    return scores["val_recall@1"] >= best["val_recall@1"] - TIE and scores["val_map@10"] > best.get("val_map@10", 0.0)


@dataclass
class _TrainingSet:
    """The catalog's labelled photos and their stratified train / validation split."""

    root: Path
    images: list[CatalogImage]
    categories: list[str]
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray


def _training_set(catalog_dir: Path, metadata: Path | None, options: FinetuneOptions) -> _TrainingSet:
    scan = scan_catalog(catalog_dir, metadata)
    images = [image for image in scan.photos if image.category]
    categories = sorted({image.category for image in images})
    if len(categories) < 2:
        raise ValueError("fine-tuning needs a catalog with at least two categories")
    labels = np.array([categories.index(image.category) for image in images])
    train, val = stratified_split([image.category for image in images], options.val_fraction, options.seed)
    return _TrainingSet(Path(scan.root), images, categories, labels, train, val)


def _work_dir(settings: Settings, plain: Settings, options: FinetuneOptions, images: list[CatalogImage]) -> Path:
    """The folder of this run's feature cache and checkpoints, named by what they depend on (so a run resumes)."""
    cache_key = [
        plain.model_name,
        plain.weights,
        options.views,
        options.seed,
        options.augmentation,
        options.split_layer,
        [(i.rel_path, i.category) for i in images],
    ]
    fingerprint = hashlib.sha256(json.dumps(cache_key).encode()).hexdigest()[:16]
    work_dir = settings.models_dir / "finetune-work" / fingerprint
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def _compile_trainer(upper, classes: int, options: FinetuneOptions, steps: int):
    """The trainable top of the network with a cosine classifier head (and the metric loss when configured)."""
    import keras

    features = keras.Input(shape=upper.input_shape[1:])
    label_input = keras.Input(shape=(), dtype="int32")
    classifier = _cosine_classifier(classes, options.scale, options.margin)
    if options.metric_loss not in ("none", "multi_similarity"):
        raise ValueError(f"unknown metric loss {options.metric_loss!r}")
    metric = options.metric_loss != "none"
    embeddings = upper(features)
    logits = classifier([embeddings, label_input])
    trainer = keras.Model([features, label_input], [logits, embeddings] if metric else logits)
    schedule = keras.optimizers.schedules.CosineDecay(options.learning_rate, decay_steps=steps * options.epochs)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule),
                    loss=[cross_entropy, multi_similarity_loss] if metric else cross_entropy,
                    loss_weights=[1.0, options.metric_weight] if metric else None)  # fmt: skip
    return trainer, classifier, metric


def _views_dataset(maps: np.ndarray, data: _TrainingSet, options: FinetuneOptions, steps: int, metric: bool):
    """Each epoch, every training photo once (or as many class-balanced batches), as one of its cached views at
    random."""
    import keras

    rng = np.random.default_rng(options.seed)
    labels, train = data.labels, data.train

    class Views(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            chosen = self.batches[index]
            view = rng.integers(0, options.views, size=len(chosen))
            batch = np.stack([maps[v, i] for v, i in zip(view, chosen, strict=True)]).astype(np.float32)
            return (batch, labels[chosen]), ((labels[chosen], labels[chosen]) if metric else labels[chosen])

        def on_epoch_end(self):
            if metric:
                self.batches = class_balanced_batches(labels, train, steps, options.batch_size,
                                                      options.photos_per_class, rng)  # fmt: skip
            else:
                order = rng.permutation(train)
                self.batches = [order[s : s + options.batch_size] for s in range(0, len(order), options.batch_size)]

    views = Views()
    views.on_epoch_end()
    return views


def _train(trainer, upper, classifier, maps: np.ndarray, data: _TrainingSet, dataset, work_dir: Path,
           options: FinetuneOptions, progress: bool) -> tuple[dict, list[dict]]:  # fmt: skip
    """Fit, keeping the weights of the epoch with the best validation figures (better_epoch; epoch 0: the plain
    network); resumable.
    Returns the best epoch and the history."""
    import keras

    labels, train, val = data.labels, data.train, data.val

    def embed_view0() -> np.ndarray:
        return np.concatenate([upper.predict(maps[0, s : s + 128].astype(np.float32), verbose=0)
                               for s in range(0, len(data.images), 128)])  # fmt: skip

    plain_vectors = embed_view0()
    # Start each class centre at its photos' mean direction: the untrained head then already
    # agrees with the pretrained features, and its first gradients do not scramble them.
    unit = plain_vectors / np.linalg.norm(plain_vectors, axis=1, keepdims=True)
    centres = np.stack([unit[train][labels[train] == c].mean(axis=0) for c in range(len(data.categories))], axis=1)
    classifier.centres.assign(centres / np.linalg.norm(centres, axis=0, keepdims=True))
    best_weights = work_dir / "best.weights.h5"
    progress_file = work_dir / "progress.json"
    if progress_file.exists() and (work_dir / "backup").exists():  # resuming an interrupted run
        state = json.loads(progress_file.read_text())
        history, best = state["history"], state["best"]
    else:
        best = {**validation_scores(plain_vectors, labels, val, train), "epoch": 0}
        history = [{"epoch": 0, **{key: round(value, 4) for key, value in best.items() if key != "epoch"}}]
        upper.save_weights(best_weights)
        progress_file.write_text(json.dumps({"history": history, "best": best}))

    class Validate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scores = validation_scores(embed_view0(), labels, val, train)
            history.append({"epoch": epoch + 1, "loss": round(float(logs["loss"]), 4),
                            **{key: round(value, 4) for key, value in scores.items()}})  # fmt: skip
            print(f"\nepoch {epoch + 1}: loss {logs['loss']:.3f}, validation R@1 {scores['val_recall@1']:.3f}, "
                  f"mAP@10 {scores['val_map@10']:.3f}", flush=True)  # fmt: skip
            if better_epoch(scores, best):
                best.update({**scores, "epoch": epoch + 1})
                upper.save_weights(best_weights)
            progress_file.write_text(json.dumps({"history": history, "best": best}))

    trainer.fit(dataset, epochs=options.epochs, verbose=1 if progress else 0,
                callbacks=[keras.callbacks.BackupAndRestore(str(work_dir / "backup")), Validate()])  # fmt: skip
    upper.load_weights(best_weights)
    return best, history


def _save_version(settings: Settings, plain: Settings, feature_model, data: _TrainingSet, trained: dict):
    """Write the new version's weights under models/finetuned/, named by base model, catalog and time; nothing is
    activated yet. Returns the weights' path and the summary (what `trained` says of the run)."""
    out_dir = settings.models_dir / "finetuned"
    out_dir.mkdir(parents=True, exist_ok=True)
    version = f"{settings.model_name}-{data.root.name}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    weights_path = out_dir / f"{version}.weights.h5"
    feature_model.save_weights(weights_path)
    summary = {
        "version": version,
        "weights": str(weights_path.relative_to(settings.models_dir)),
        "base_model": plain.model_name,
        "base_weights": plain.weights,
        "catalog": str(data.root),
        **trained,
    }
    return weights_path, summary


def activate(settings: Settings, record: dict) -> None:
    """Make `record` the active model (models/active-model.json), with an atomic rename: a fine-tuned version (it
    names its weights) or the plain network, each with the whitening the held-out photos chose."""
    partial = settings.models_dir / (ACTIVE_MODEL_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(settings.models_dir / ACTIVE_MODEL_FILE)


def held_out_decision(plain: Settings, tuned: Settings, data: _TrainingSet, catalog_dir: Path, metadata: Path | None,
                      progress: bool) -> Decision | None:  # fmt: skip
    """Every candidate of the plain and the fine-tuned network measured on the held-out photos (None when none
    could be held out); photos that do not decode are left out of both."""
    embedded = {network: embed_photos(settings, data.images, network, progress, catalog_dir, metadata)
                for network, settings in (("plain", plain), ("finetuned", tuned))}  # fmt: skip
    decoded = embedded["plain"][1] & embedded["finetuned"][1]
    train, held = data.train[decoded[data.train]], data.val[decoded[data.val]]
    if len(held) == 0:
        return None
    dims = plain.whitening_dims
    candidates = [candidate for network, (vectors, _) in embedded.items()
                  for candidate in measure(network, vectors, data.labels, train, held, dims)]  # fmt: skip
    return decide(candidates, plain.whitening, len(held), len(train))


def finetune(settings: Settings, catalog_dir: Path, metadata: Path | None, options: FinetuneOptions | None = None,
             *, progress: bool = True) -> dict:  # fmt: skip
    """Train and pick the best epoch on the validation split; save the new version; then measure every candidate
    configuration on the held-out photos and activate the best when it beats the plain default (held_out.py).
    Returns the version's summary, which says what was activated, if anything."""
    import keras

    from indexer.embedding.model import build_feature_model, ensure_litert_export

    options = options or FinetuneOptions()
    started = time.perf_counter()
    keras.utils.set_random_seed(options.seed)
    data = _training_set(catalog_dir, metadata, options)

    plain = settings.with_overrides(finetuned=None)
    feature_model = build_feature_model(plain)
    lower, upper = split_model(feature_model, options.split_layer)
    work_dir = _work_dir(settings, plain, options, data.images)
    maps = fill_cache(work_dir / "maps.npy", lower, data.images, options, progress)

    steps = int(np.ceil(len(data.train) / options.batch_size))
    trainer, classifier, metric = _compile_trainer(upper, len(data.categories), options, steps)
    dataset = _views_dataset(maps, data, options, steps, metric)
    best, history = _train(trainer, upper, classifier, maps, data, dataset, work_dir, options, progress)

    trained = {
        "categories": len(data.categories),
        "train_images": len(data.train),
        "validation_images": len(data.val),
        "options": options.__dict__,
        "best_epoch": best["epoch"],
        "validation_recall@1": round(best["val_recall@1"], 4),
        "validation_map@10": round(best["val_map@10"], 4),
        "history": history,
    }
    weights_path, summary = _save_version(settings, plain, feature_model, data, trained)
    tuned = settings.with_overrides(finetuned=weights_path)
    if settings.engine == "litert":
        ensure_litert_export(tuned, catalog=catalog_dir, metadata=metadata)
    decision = held_out_decision(plain, tuned, data, catalog_dir, metadata, progress)
    summary["held_out"] = None if decision is None else decision.as_dict()
    summary["activated"] = decision is not None and decision.activated
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    if summary["activated"]:
        chosen = decision.best
        if chosen.network == "finetuned":
            activate(settings, {**summary, "whitening": chosen.whitened})
        else:
            plain_record = {
                key: summary[key] for key in ("base_model", "base_weights", "catalog", "held_out", "created")
            }
            activate(settings, {"version": "plain", **plain_record, "whitening": chosen.whitened})
    weights_path.with_suffix("").with_suffix(".json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work_dir / "backup", ignore_errors=True)
    (work_dir / "progress.json").unlink(missing_ok=True)
    return summary
