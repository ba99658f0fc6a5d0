"""Throughput of the annotation job against a plain single-process loop, in the same run.

    python bench/annotate_throughput.py [--images 400] [--workdir /tmp/bench_annotate]

Both sides do the same work per image (read, decode, resize, Canny, JPEG + PNG encode) with the
same functions; the pipeline adds Ray, sharding and Parquet. Ray start-up is timed separately.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import shutil
import time

import numpy as np
from PIL import Image

from annotators.canny import CannyAnnotator
from pipeline import ray_runtime
from pipeline.annotate import run
from pipeline.config import AnnotateConfig
from pipeline.decode import PrepareSettings, prepare
from pipeline.encode import encode_image, encode_map


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 768x1024 JPEGs cut from scikit-image's real photos (flips, crops, noise)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    paths = []
    for i in range(count):
        src = Image.fromarray(sources[i % len(sources)]).resize((1200, 1400), Image.Resampling.BICUBIC)
        x, y = rng.integers(0, 1200 - 768), rng.integers(0, 1400 - 1024)
        arr = np.asarray(src.crop((x, y, x + 768, y + 1024))).astype(np.int16)
        arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
        if i % 2:
            arr = arr[:, ::-1]
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], resolution: int) -> float:
    """Images/s of one process doing decode, resize, Canny and encode image by image."""
    settings = PrepareSettings(resolution=resolution)
    canny = CannyAnnotator()
    start = time.perf_counter()
    for path in paths:
        prepared = prepare(path.read_bytes(), settings)
        edges = canny.annotate([prepared.image], [path.name])[0]
        encode_image(prepared.image, "jpeg", 95)
        encode_map(edges)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workdir", default="/tmp/bench_annotate")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    paths = make_photos(work / "photos", args.images)
    print(f"{len(paths)} JPEGs of 768x1024, resolution {args.resolution}, {os.cpu_count()} CPUs")

    plain_loop(paths[:10], args.resolution)  # warm caches and imports
    plain = plain_loop(paths, args.resolution)
    print(f"plain single-process loop: {plain:7.1f} images/s")

    start = time.perf_counter()
    ray_runtime.connect(None)
    ray_start = time.perf_counter() - start
    config = AnnotateConfig(input=str(work / "photos"), output=str(work / "manifest"),
                            resolution=args.resolution, shard_size=args.shard_size, overwrite=True)
    summary = run(config)
    ray_runtime.shutdown()
    rows = summary["counts"]["rows"]
    job = summary["run"]["annotate_s"]
    wall = summary["run"]["wall_s"]
    print(f"Ray start-up: {ray_start:.1f} s (not counted below)")
    print(f"pipeline (Ray, shards, Parquet): {rows / job:7.1f} images/s over the shards "
          f"({job:.1f} s), {rows / wall:.1f} images/s including listing and summary ({wall:.1f} s)")
    print(f"ratio pipeline / plain loop: {rows / job / plain:.2f}x "
          f"(target on 2 cores: >= 1.6x; including listing and summary: {rows / wall / plain:.2f}x)")


if __name__ == "__main__":
    main()
