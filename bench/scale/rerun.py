"""Re-running the indexer: a folder of tiny photos indexed once, again unchanged, and again after 10 photos
changed, until a running server finds those 10."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.scale import KEY, log
from bench.scale.commands import embedded_count, run_cli
from tests.support.http import Client, result_skus
from tests.support.server import running_server


def tiny_photo(seed: list[int]) -> bytes:
    """A distinct 32x32 JPEG: a 4x4 grid of random colours, smoothed, plus pixel noise."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    pixels = np.asarray(grid.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, size=pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_path(folder: Path, number: int) -> Path:
    return folder / f"d{number // 1000:03d}" / f"{number:06d}.jpg"


def write_photo_folder(folder: Path, count: int, seed: int) -> None:
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == f"{count} {seed}":
        return  # a kept --work-dir from an earlier run
    for number in tqdm(range(count), desc="Tiny catalog photos", unit="img", unit_scale=True):
        path = photo_path(folder, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_photo([seed, number]))
    marker.write_text(f"{count} {seed}")


def measure_rerun(work: Path, files: int, seed: int, args) -> dict:
    """`python -m indexer index` on a folder of `files` photos: once (embeds them all), again on the
    unchanged folder, and after 10 photos changed, until a running server finds those 10."""
    folder, data_dir = work / "rerun-catalog", work / "data-rerun"
    env = {**os.environ, "DATA_DIR": str(data_dir), "API_KEY": KEY}
    write_photo_folder(folder, files, seed)
    run_cli(["migrate"], env, timeout=600)
    index = ["index", "--catalog", str(folder), "--quiet"]
    log(f"re-run: first index of {files:,} photos (embeds them all)")
    first, first_output = run_cli(index, env, timeout=args.import_timeout)
    report: dict[str, object] = {
        "files": files,
        "first_run": {"seconds": round(first, 1), "output": first_output[-800:]},
    }
    with running_server(env, timeout=args.ready_timeout) as server:
        client = Client(server.url, key=KEY)
        log("re-run: the unchanged folder")
        second, output = run_cli(index, env, timeout=600)
        report["unchanged_run"] = {"seconds": round(second, 2), "output": output[-800:]}
        changed = np.random.default_rng([seed, 1]).choice(files, size=min(10, files), replace=False)
        # New content on every run: a folder kept by --work-dir holds the last run's changed photos, and
        # writing the same bytes again would change nothing (and measure nothing).
        run_nonce = time.time_ns() % 2**32
        photos = {}
        for number in changed:
            photos[f"d{number // 1000:03d}/{number:06d}"] = photo = tiny_photo([seed, int(number), run_nonce])
            path = photo_path(folder, int(number))
            partial = path.with_suffix(".partial")
            partial.write_bytes(photo)
            partial.replace(path)  # as rsync does: whole new files, renamed into place
        log(f"re-run: {len(photos)} photos changed, until searchable")
        started = time.perf_counter()
        run_seconds, output = run_cli(index, env, timeout=600)
        missing = dict(photos)
        deadline = time.perf_counter() + 60
        while missing and time.perf_counter() < deadline:
            for sku, photo in list(missing.items()):
                if sku in result_skus(client.search(photo)[1]):
                    del missing[sku]
            if missing:
                time.sleep(0.2)
        report["changed_run"] = {
            "changed": len(photos),
            "embedded": embedded_count(output),
            "index_seconds": round(run_seconds, 2),
            "visible_seconds": round(time.perf_counter() - started, 2) if not missing else None,
            "not_visible": sorted(missing),
            "output": output[-800:],
        }
        client.close()
    return report
