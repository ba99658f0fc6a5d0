"""Per annotator: ms per image of a per-image loop calling controlnet-aux directly versus our
batched path, on the same images in the same run (CPU; GPU too when one is present).

    python bench/annotator_speed.py [--images 8] [--batch-size 8] [--annotators hed,depth,...]

Weights: CONTROLFORGE_WEIGHTS when set (real files), else random weights in the real layouts
(speed does not depend on the values, except OpenPose's part grouping, which random weights
leave idle; its figure is then the CNN only).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np

from annotators import registry
from annotators.weights import WEIGHTS_ENV

# annotator name -> controlnet-aux per-image call, built from (weights folder, device)
BASELINES: dict[str, Callable[[str, str], Callable[[np.ndarray], Any]]] = {}


def baseline(name: str):
    def register(fn):
        BASELINES[name] = fn
        return fn
    return register


@baseline("canny")
def _canny(_: str, device: str):
    from controlnet_aux import CannyDetector

    det = CannyDetector()
    return lambda img: det(img, low_threshold=100, high_threshold=200, detect_resolution=img.shape[0],
                           image_resolution=img.shape[0], output_type="np")


@baseline("hed")
def _hed(weights: str, device: str):
    from controlnet_aux import HEDdetector

    det = HEDdetector.from_pretrained(weights).to(device)
    return lambda img: det(img, detect_resolution=img.shape[0], image_resolution=img.shape[0], output_type="np")


@baseline("depth")
def _depth(weights: str, device: str):
    from controlnet_aux import MidasDetector

    det = MidasDetector.from_pretrained(weights).to(device)
    return lambda img: det(img, detect_resolution=384, image_resolution=img.shape[0], output_type="np")


@baseline("openpose")
def _openpose(weights: str, device: str):
    from controlnet_aux import OpenposeDetector

    det = OpenposeDetector.from_pretrained(weights).to(device)
    return lambda img: det(img, detect_resolution=img.shape[0], image_resolution=img.shape[0], output_type="np")


@baseline("mediapipe_face")
def _face(_: str, device: str):
    from controlnet_aux import MediapipeFaceDetector

    det = MediapipeFaceDetector()
    return lambda img: det(img, detect_resolution=img.shape[0], image_resolution=img.shape[0], output_type="np")


def photos(count: int, size: int = 512) -> list[np.ndarray]:
    """``count`` size x size crops of scikit-image's photos."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for i in range(count):
        im = Image.fromarray(sources[i % len(sources)]).convert("RGB").resize((size, size))
        arr = np.asarray(im)
        out.append(np.ascontiguousarray(arr[:, ::-1] if i // len(sources) % 2 else arr))
    return out


def time_per_image(fns: list[Callable[[], Any]], count: int, repeats: int = 3) -> list[float]:
    """ms per image of each function: best of ``repeats`` passes, the functions interleaved so
    that machine noise hits both alike, after a warm-up (first calls pay for set-up)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return [b / count * 1000 for b in best]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--annotators", default="canny,hed,depth,openpose,mediapipe_face,mediapipe_pose,person_mask")
    args = p.parse_args()
    import torch

    weights = os.environ.get(WEIGHTS_ENV)
    if not weights:
        from tests.fake_weights import write_random_weights

        weights = str(write_random_weights(Path(tempfile.mkdtemp(prefix="bench_weights"))))
        print(f"random weights in {weights} ({WEIGHTS_ENV} not set)")
    images = photos(args.images)
    ids = [f"img{i}" for i in range(len(images))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{len(images)} images of 512x512, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"{'annotator':16} {'device':6} {'controlnet-aux ms/img':>22} {'ours ms/img':>12} {'ratio':>7}")
    for name in args.annotators.split(","):
        for device in devices:
            ours = registry.create(name, {}, weights)
            ours.requested_device = device  # torch annotators honour it; MediaPipe runs on CPU
            ours.setup()
            batched = lambda: [ours.annotate(images[i:i + args.batch_size], ids[i:i + args.batch_size])
                               for i in range(0, len(images), args.batch_size)]
            base_ms = None
            if name in BASELINES:
                call = BASELINES[name](weights, device)
                ours_ms, base_ms = time_per_image([batched, lambda: [call(img) for img in images]], len(images))
            else:
                (ours_ms,) = time_per_image([batched], len(images))
            ratio = f"{base_ms / ours_ms:6.2f}x" if base_ms else "      -"
            base = f"{base_ms:22.1f}" if base_ms else f"{'(none)':>22}"
            print(f"{name:16} {device:6} {base} {ours_ms:12.1f} {ratio}")
    print("ratio = controlnet-aux time / ours (above 1: the batched path is faster)")


if __name__ == "__main__":
    main()
