"""Write small raw image collections: the demo's, the benchmark's and the tests'.

    python -m demo.samples data/demo/photos                        # photos, scenes, edge cases (or: demo DIR)
    python -m demo.samples circles data/circles --count 1000       # the fill task's raw circles (demo/circles.py)

Real photos come from scikit-image (installed with the dev extra); scenes are drawn here; the
``edge_cases/`` folder holds what real collections contain and a pipeline must survive.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.circles import write_circles
from manifests.flags import DefaultsHelpFormatter

PHOTOS = {  # scikit-image sample -> caption
    "astronaut": "an astronaut in an orange suit in front of a flag and a space shuttle",
    "chelsea": "a close-up of a tabby cat",
    "coffee": "a cup of coffee on a saucer on a wooden table",
    "rocket": "a rocket on its launch pad at dusk",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "hubble_deep_field": "a deep field of galaxies seen by the Hubble telescope",
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40)}


def scene(seed: int, size: tuple[int, int] = (640, 480)) -> tuple[Image.Image, str]:
    """A drawn scene (gradient sky, shapes) and a caption that describes it."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    sky = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1).astype(np.uint8)
    im = Image.fromarray(sky)
    draw = ImageDraw.Draw(im)
    names = list(COLOURS)
    parts = []
    for k in range(int(rng.integers(2, 4))):
        colour = names[int(rng.integers(len(names)))]
        x, y = int(rng.integers(0, w - 160)), int(rng.integers(0, h - 160))
        s = int(rng.integers(60, 160))
        if k % 2:
            draw.ellipse((x, y, x + s, y + s), fill=COLOURS[colour], outline=(0, 0, 0), width=3)
            parts.append(f"a {colour} circle")
        else:
            draw.rectangle((x, y, x + s, y + s), fill=COLOURS[colour], outline=(0, 0, 0), width=3)
            parts.append(f"a {colour} square")
    return im, " and ".join(parts) + " on a gradient background"


def write_photos(folder: Path) -> list[Path]:
    """scikit-image's real photos as JPEGs, captions in ``.txt`` sidecars (one in ``.json``)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, caption) in enumerate(PHOTOS.items()):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=92)
        if i % 3 == 2:
            (folder / f"{name}.json").write_text(json.dumps({"caption": caption}))
        else:
            (folder / f"{name}.txt").write_text(caption + "\n")
        paths.append(path)
    return paths


def write_scenes(folder: Path, count: int = 6) -> list[Path]:
    """Drawn scenes as PNGs, captions in a Hugging Face ``metadata.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    records, paths = [], []
    for i in range(count):
        im, caption = scene(i)
        path = folder / f"scene_{i:02d}.png"
        im.save(path)
        records.append({"file_name": path.name, "text": caption})
        paths.append(path)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def write_edge_cases(folder: Path) -> dict[str, str]:
    """Files real collections hold; returns {file name: what the pipeline must do with it}."""
    folder.mkdir(parents=True, exist_ok=True)
    base, _ = scene(100, (320, 240))
    expect = {}
    # A phone photo stored landscape with EXIF orientation 6 (rotate 90 degrees to view).
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(folder / "rotated_exif.jpg", exif=exif.tobytes())
    expect["rotated_exif.jpg"] = "ok, portrait"
    base.convert("CMYK").save(folder / "cmyk.jpg")
    expect["cmyk.jpg"] = "ok"
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", base.size, 128))
    rgba.save(folder / "alpha.png")
    expect["alpha.png"] = "ok, composited on white"
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif", transparency=0)
    expect["palette.gif"] = "ok"
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / "gray16.png")
    expect["gray16.png"] = "ok"
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    expect["animated.gif"] = "ok, first frame"
    buf = io.BytesIO()
    base.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    expect["truncated.jpg"] = "error: decode"
    (folder / "not_an_image.png").write_text("this is text with an image's name\n")
    expect["not_an_image.png"] = "error: decode"
    (folder / "notes.md").write_text("not an image: ignored, not a row\n")
    return expect


def write_demo_collection(root: Path) -> Path:
    """The demo collection: real photos, drawn scenes, and edge cases, in sub-folders."""
    write_photos(root / "photos")
    write_scenes(root / "scenes")
    write_edge_cases(root / "edge_cases")
    return root


DEMO_FOLDER = "data/demo/photos"
COMMANDS = ("demo", "circles")


def build_parser() -> argparse.ArgumentParser:
    """``demo [OUT]`` and ``circles OUT --count N``; ``python -m demo.samples OUT`` means ``demo OUT``."""
    p = argparse.ArgumentParser(prog="python -m demo.samples", description=__doc__.split("\n\n")[0],
                                epilog="A folder given without a command gets the demo collection (demo OUT).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,circles}")
    demo = sub.add_parser("demo", help="real photos, drawn scenes and edge cases, in sub-folders",
                          formatter_class=DefaultsHelpFormatter)
    demo.add_argument("out", nargs="?", default=DEMO_FOLDER, help="folder to write the collection into")
    circles = sub.add_parser("circles", help="raw images of one filled circle each, with colour captions",
                             formatter_class=DefaultsHelpFormatter)
    circles.add_argument("out", help="folder to write circle_NNNNN.png and .txt captions into")
    circles.add_argument("--count", type=int, required=True, help="number of images")
    circles.add_argument("--size", type=int, default=64, help="side of the square images in pixels (>= 16)")
    circles.add_argument("--seed", type=int, default=0, help="seed of the drawn colours, sizes and places")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the demo collection or the circles; ``--help`` (or a bad flag) writes nothing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")):
        argv = ["demo", *argv]  # the Makefile's and older command lines: a bare folder is the demo's
    p = build_parser()
    args = p.parse_args(argv)
    if args.out.startswith("-"):  # reached only through "--": most likely a flag typed in the wrong place
        p.error(f"folder {args.out!r} starts with '-'; write ./{args.out} if that is really its name")
    if args.command == "circles":
        if args.count < 1 or args.size < 16:
            p.error("--count must be at least 1 and --size at least 16")
        write_circles(Path(args.out), args.count, args.size, args.seed)
        print(f"circle collection: {args.out} ({args.count} images, {args.size}x{args.size})")
        return 0
    write_demo_collection(Path(args.out))
    print(f"sample collection: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
