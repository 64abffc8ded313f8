"""Hostile uploads against the production server: forty searches at once with a small PNG of many deep pixels (a
16-bit grey one and an RGBA one, 6300x6300 each), the statuses they get and how far the server's memory rises.

    python -m bench.hostile_uploads [--catalog <folder>]   # this step alone: indexes a few photos first

`make bench` runs it on the index it built and adds it to bench/results.json ("hostile_uploads").
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.record import emit, provenance
from bench.synthetic import index_photos, real_photos
from indexer.config import REPO_ROOT, load_settings, run_with_config
from tests.support.procfs import process_tree, process_tree_memory_mb
from tests.support.server import running_server

UPLOADS = 40
SIDE = 6300


def deep_pngs(side: int = SIDE) -> dict[str, bytes]:
    """The two PNGs: a few hundred KB each, side x side pixels of 16-bit grey or of RGBA once decoded."""
    grey = Image.fromarray(np.repeat((np.arange(side, dtype=np.uint16) * 10)[:, None], side, axis=1))
    rgba = Image.new("RGBA", (side, side), (10, 200, 30, 128))
    pngs = {}
    for name, image in (("16-bit grey PNG", grey), ("RGBA PNG", rgba)):
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=9)
        pngs[name] = buffer.getvalue()
    return pngs


def _reset_peaks(pid: int) -> float:
    """Start each server process's peak resident memory (VmHWM) again from its resident memory; their sum now."""
    for each in process_tree(pid):
        Path(f"/proc/{each}/clear_refs").write_text("5")
    return process_tree_memory_mb(pid, proportional=False)["rss_mb"]


def _upload(url: str, photo: bytes) -> int:
    try:
        return requests.post(f"{url}/api/search", files={"image": ("upload.png", photo)}, timeout=120).status_code
    except requests.RequestException as exc:
        return -1 if "timed out" not in str(exc) else -2


def measure_hostile_uploads(
    data_dir: Path, warm_photo: bytes, uploads: int = UPLOADS, image_max_mb: int | None = None
) -> dict:
    """Start the server on an indexed data folder (with model.image_max_mb changed, if given); for each PNG,
    `uploads` searches with it at once, the statuses they got and the rise of the server processes' summed peak
    memory above their resident memory before."""
    settings = load_settings()
    results: dict = {"uploads_at_once": uploads, "image_max_mb": image_max_mb or settings.image_max_mb}
    env = {"DATA_DIR": str(data_dir)}
    if image_max_mb is not None:
        config = data_dir / "config.toml"
        text = (REPO_ROOT / "config.toml").read_text()
        text = text.replace('models_dir = "models"', f'models_dir = "{settings.models_dir}"')
        config.write_text(text.replace(f"image_max_mb = {settings.image_max_mb}", f"image_max_mb = {image_max_mb}"))
        env["SEARCH_CONFIG"] = str(config)
    with running_server(env) as server:
        for _ in range(8):  # every worker's first searches allocate what it keeps: not counted below
            requests.post(f"{server.url}/api/search", files={"image": ("a.jpg", warm_photo)}, timeout=120)
        results["server_processes"] = len(process_tree(server.process.pid))
        for name, photo in deep_pngs().items():
            before = _reset_peaks(server.process.pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=uploads) as pool:
                # Each a different file (bytes after the PNG's end, which decoders ignore): none is answered from
                # the server's memory of recent query photos, each is decoded.
                distinct = [photo + b"%d" % number for number in range(uploads)]
                statuses = list(pool.map(_upload, [server.url] * uploads, distinct))
            seconds = time.perf_counter() - started
            memory = process_tree_memory_mb(server.process.pid, proportional=False)
            message = requests.post(f"{server.url}/api/search", files={"image": ("a.png", photo)}, timeout=120)
            results[name] = {
                "bytes": len(photo),
                "pixels": f"{SIDE}x{SIDE}",
                "statuses": dict(Counter(str(status) for status in statuses)),
                "server_errors": sum(1 for status in statuses if status >= 500 or status < 0),
                "rss_before_mb": before,
                "peak_rss_rise_mb": round(memory["peak_rss_mb"] - before, 1),
                "seconds": round(seconds, 2),
                "message": message.json().get("message", "") if message.status_code != 200 else "",
            }
    results["worst_peak_rss_rise_mb"] = max(results[name]["peak_rss_rise_mb"] for name in deep_pngs())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_uploads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", help="photos to index first (default: the demo catalog or scikit-image's)")
    parser.add_argument("--out", help="write the figures here as JSON too")
    parser.add_argument("--image-max-mb", type=int, help="the server's model.image_max_mb (default: config.toml's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        _, photos = real_photos(24, Path(args.catalog) if args.catalog else None, seed=0)
        settings = index_photos(photos, Path(tmp))
        measured = measure_hostile_uploads(settings.data_dir, photos[0].data, image_max_mb=args.image_max_mb)
        results = {**provenance(), **measured}
    emit(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
