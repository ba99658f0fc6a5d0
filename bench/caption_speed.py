"""Captions per second at different batch sizes: what batching buys the captioner's model actor.

    python bench/caption_speed.py                     # every tiny test model, CPU, batch 1 vs 8
    python bench/caption_speed.py --captioner blip --model-dir WEIGHTS/Salesforce/blip-image-captioning-large \
        --device cuda --batch-sizes 1,16,32,64 --images 128

Times ``forward`` only (the actor's work: processor, generate, decode) on images already through
``preprocess``; one warm-up batch first. The tiny models are random, so their captions always run
to ``--max-new-tokens``; a real model stops at its end token, so its figures depend on the images.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import time

import numpy as np

from captioners import registry


def photos(count: int) -> list[np.ndarray]:
    """scikit-image's photos at 512 px short side, cycled to ``count`` images."""
    import cv2
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry"):
        img = getattr(data, name)()
        scale = 512 / min(img.shape[:2])
        out.append(cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA))
    return [out[i % len(out)] for i in range(count)]


def speed(captioner, images: list[np.ndarray], batch: int) -> float:
    """Captions per second of ``forward`` over ``images`` in batches of ``batch``."""
    inputs = [captioner.preprocess(img, str(i)) for i, img in enumerate(images)]
    captioner.forward(inputs[:batch])  # warm-up: first-call allocations, kernel selection
    start = time.perf_counter()
    for i in range(0, len(inputs), batch):
        captioner.forward(inputs[i:i + batch])
    return len(inputs) / (time.perf_counter() - start)


def run(label: str, captioner, images: list[np.ndarray], batch_sizes: list[int]) -> None:
    rates = [speed(captioner, images, b) for b in batch_sizes]
    figures = "  ".join(f"b{b}: {r:7.1f}/s" for b, r in zip(batch_sizes, rates))
    print(f"{label:<44} {figures}  ratio b{batch_sizes[-1]}/b{batch_sizes[0]}: {rates[-1] / rates[0]:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioner", help="blip, florence2 or vlm (with --model-dir); default: every tiny model")
    parser.add_argument("--model-dir", help="a real model folder (saved with save_pretrained)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated, first is the baseline (default 1,8)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when there is one)")
    parser.add_argument("--images", type=int, default=32, help="images per batch size (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a captioner parameter (prompt, num_beams, dtype, ...), repeatable")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    images = photos(args.images)
    params = dict(p.split("=", 1) for p in args.param)
    params["max_new_tokens"] = args.max_new_tokens

    if args.model_dir:
        if not args.captioner:
            parser.error("--model-dir needs --captioner")
        cases = {f"{args.captioner} {Path(args.model_dir).name}": (args.captioner, {"model": args.model_dir}, None)}
    else:
        from tests.tiny_captioners import LAYOUT, write_tiny_captioners

        root = write_tiny_captioners(Path(tempfile.mkdtemp(prefix="tiny_captioners_")))
        cases = {f"tiny {key} ({name})": (name, {"model": LAYOUT[key]}, str(root))
                 for key, name in [("blip", "blip"), ("blip2", "blip"), ("florence2", "florence2"),
                                   ("vlm", "vlm"), ("llava", "vlm")]
                 if args.captioner in (None, name)}
    for label, (name, overrides, weights_dir) in cases.items():
        captioner = registry.create(name, {**overrides, **params}, weights_dir)
        captioner.requested_device = args.device
        captioner.setup()
        run(f"{label} [{captioner.device}]", captioner, images, batch_sizes)


if __name__ == "__main__":
    main()
