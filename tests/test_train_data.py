"""Training data by content: conditions stay on their image through crop and flip, in order, per row.

Images here are asymmetric (off-centre shapes), so a map flipped or cropped differently from its
image lands off the image's edges; the checks recover each sample's crop and flip from its pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.annotate import run
from pipeline.config import AnnotateConfig
from train.data import ManifestDataset, RankSampler, collate, load_rows

WIDTH, HEIGHT = 192, 128  # prepared at 128: the short side is already the training resolution


def asymmetric_image(k: int) -> Image.Image:
    """Flat background, a right triangle and a bar off to the left, a small square top right."""
    im = Image.new("RGB", (WIDTH, HEIGHT), (30 + 10 * k, 40, 50))
    draw = ImageDraw.Draw(im)
    x = 12 + 9 * k
    draw.polygon([(x, 20), (x, 110), (x + 70, 110)], fill=(230, 230, 230))
    draw.rectangle((x + 30, 16, x + 44, 60), fill=(200, 60, 40))
    draw.rectangle((150 - 4 * k, 12, 172 - 4 * k, 30), fill=(60, 200, 90))
    return im


@pytest.fixture(scope="module")
def shapes_manifest(local_ray, tmp_path_factory):
    """Four asymmetric 192x128 PNGs (captions "shapes k") annotated with canny, PNG images."""
    root = tmp_path_factory.mktemp("asymmetric")
    folder = root / "images"
    folder.mkdir()
    for k in range(4):
        asymmetric_image(k).save(folder / f"shapes_{k}.png")
        (folder / f"shapes_{k}.txt").write_text(f"shapes {k}")
    out = root / "manifest"
    run(AnnotateConfig(input=str(folder), output=str(out), resolution=128, image_format="png"))
    return out


def decode(cell: dict) -> np.ndarray:
    """A manifest image cell as float HxWx3 in [0, 1] (maps become 3 equal channels)."""
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"), np.float32) / 255.0


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def image_of(pixel_values: torch.Tensor) -> np.ndarray:
    """De-normalised training image, HxWx3 in [0, 1]."""
    return (hwc(pixel_values) + 1.0) / 2.0


def view(source: np.ndarray, left: int, top: int, size: int, flip: bool) -> np.ndarray:
    out = source[top:top + size, left:left + size]
    return out[:, ::-1] if flip else out


def recover_transform(image: np.ndarray, source: np.ndarray) -> tuple[int, int, bool, float]:
    """(left, top, flip, error): the crop and flip of ``source`` that best match ``image``."""
    size = image.shape[0]
    best = (0, 0, False, np.inf)
    for flip in (False, True):
        for top in range(source.shape[0] - size + 1):
            for left in range(source.shape[1] - size + 1):
                err = float(np.abs(view(source, left, top, size, flip) - image).mean())
                if err < best[3]:
                    best = (left, top, flip, err)
    return best


def edge_f1(cond: np.ndarray, image: np.ndarray, tolerance: int = 1) -> float:
    """F1 of condition edge pixels against Canny edges of the image, within ``tolerance`` pixels."""
    import cv2

    ours = cond.max(axis=2) > 0.5
    theirs = cv2.Canny((image * 255).round().astype(np.uint8), 100, 200) > 0
    kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
    near_theirs = cv2.dilate(theirs.astype(np.uint8), kernel) > 0
    near_ours = cv2.dilate(ours.astype(np.uint8), kernel) > 0
    precision = (ours & near_theirs).sum() / max(1, ours.sum())
    recall = (theirs & near_ours).sum() / max(1, theirs.sum())
    return float(2 * precision * recall / max(1e-9, precision + recall))


def edge_correlation(cond: np.ndarray, image: np.ndarray) -> float:
    """Pearson correlation of a HxW map with the image's Sobel gradient magnitude."""
    import cv2

    gray = cv2.cvtColor((image * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    return float(np.corrcoef(cond.ravel(), magnitude.ravel())[0, 1])


def assert_on_its_image(example_pixels: torch.Tensor, example_cond: torch.Tensor, row: dict,
                        conditions: tuple[str, ...] = ("canny",)) -> tuple[int, bool]:
    """The condition is the row's maps under the crop and flip recovered from the image; returns them."""
    image = image_of(example_pixels)
    left, top, flip, err = recover_transform(image, decode(row["image"]))
    assert err < 0.02, f"the training image is no crop of its row's image (error {err:.3f})"
    for k, name in enumerate(conditions):
        expected = view(decode(row[f"cond_{name}"]), left, top, image.shape[0], flip)
        got = hwc(example_cond[3 * k:3 * k + 3])
        assert np.abs(got - expected).max() < 1e-6, f"cond_{name} is not cropped/flipped like its image"
    return left, flip


def test_condition_lies_on_its_image_edges_through_random_crop_and_flip(shapes_manifest):
    """Over several epochs, each map equals its row's map under the image's own crop and flip."""
    rows, _ = load_rows(str(shapes_manifest), ["canny"], holdout=0)
    dataset = ManifestDataset(rows, ["canny"], 128, seed=11, random_flip=True, proportion_empty_prompts=0.0)
    seen = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            ex = dataset[i]
            seen.add(assert_on_its_image(ex["pixel_values"], ex["conditioning_pixel_values"], rows[i]))
            image, cond = image_of(ex["pixel_values"]), hwc(ex["conditioning_pixel_values"])
            aligned, mirrored = edge_f1(cond, image), edge_f1(cond[:, ::-1], image)
            assert aligned > 0.9 and mirrored < 0.6, (aligned, mirrored)
    assert {flip for _, flip in seen} == {False, True} and len({left for left, _ in seen}) >= 4


def test_condition_stays_on_its_image_edges_when_resized(shapes_manifest):
    """Training below the manifest's size (128 -> 96): each map follows its image's gradients."""
    rows, _ = load_rows(str(shapes_manifest), ["canny"], holdout=0)
    dataset = ManifestDataset(rows, ["canny"], 96, seed=5)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            ex = dataset[i]
            image, cond = image_of(ex["pixel_values"]), hwc(ex["conditioning_pixel_values"]).max(axis=2)
            aligned, mirrored = edge_correlation(cond, image), edge_correlation(cond[:, ::-1], image)
            assert aligned > 0.6 and mirrored < 0.4, (aligned, mirrored)


def test_a_collated_loader_batch_keeps_each_condition_on_its_image(shapes_manifest):
    """DataLoader + RankSampler + collate: every (image, condition, index) triple in a batch lines up."""
    rows, _ = load_rows(str(shapes_manifest), ["canny"], holdout=0)
    dataset = ManifestDataset(rows, ["canny"], 128, seed=3, random_flip=True)
    sampler = RankSampler(len(dataset), rank=0, world=1, seed=3, batch_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate)
    flips = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in loader:
            assert batch["pixel_values"].shape == (2, 3, 128, 128)
            assert batch["conditioning_pixel_values"].shape == (2, 3, 128, 128)
            for k, index in enumerate(batch["indices"]):
                row = rows[index]
                assert batch["captions"][k] in ("", row["caption"])
                _, flip = assert_on_its_image(batch["pixel_values"][k], batch["conditioning_pixel_values"][k], row)
                flips.add(flip)
    assert flips == {False, True}


def test_stacked_conditions_keep_the_order_given_by_content(stacked_manifest):
    """--condition canny,invert: channels 0:3 are the canny map, 3:6 are 1 - the image's red channel."""
    from train.train import parse_args

    config = parse_args(["--manifest", str(stacked_manifest), "--condition", "canny,invert",
                         "--pretrained_model_name_or_path", "unused", "--resolution", "64"])
    assert config.condition == ("canny", "invert")
    rows, _ = load_rows(config.manifest, config.condition, holdout=0)
    dataset = ManifestDataset(rows, config.condition, config.resolution, seed=1)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            ex = dataset[i]
            image, cond = image_of(ex["pixel_values"]), hwc(ex["conditioning_pixel_values"])
            assert cond.shape[2] == 6
            inverted = 1.0 - image[:, :, :1]
            assert np.abs(cond[:, :, 3:6] - inverted).mean() < 0.03  # JPEG image vs exact map
            assert np.abs(cond[:, :, 0:3] - inverted).mean() > 0.2
            assert set(np.unique(cond[:, :, 0:3])) <= {0.0, 1.0} and cond[:, :, 0:3].mean() < 0.3
            assert_on_its_image(ex["pixel_values"], ex["conditioning_pixel_values"], rows[i], config.condition)


def repeated_rows(shapes_manifest, count: int) -> list[dict]:
    """One manifest row repeated under ``count`` ids (same image, same caption)."""
    rows, _ = load_rows(str(shapes_manifest), ["canny"], holdout=0)
    return [dict(rows[0], id=f"copy-{i:03d}") for i in range(count)]


def transforms(dataset: ManifestDataset, rows: list[dict], order=None) -> list[tuple[int, bool]]:
    order = range(len(dataset)) if order is None else order
    found = {}
    for i in order:
        ex = dataset[i]
        found[i] = assert_on_its_image(ex["pixel_values"], ex["conditioning_pixel_values"], rows[i])
    return [found[i] for i in sorted(found)]


def test_each_row_draws_its_own_crop_and_flip(shapes_manifest):
    """The same image under 16 rows gets varied crops and flips within one epoch."""
    rows = repeated_rows(shapes_manifest, 16)
    dataset = ManifestDataset(rows, ["canny"], 128, seed=0, random_flip=True)
    drawn = transforms(dataset, rows)
    assert len(set(drawn)) >= 8 and {flip for _, flip in drawn} == {False, True}
    captions = {dataset[i]["caption"] for i in range(len(dataset))}
    assert captions == {"", rows[0]["caption"]}  # empty-prompt draws differ between rows too


def test_seed_epoch_and_row_fix_the_sample(shapes_manifest):
    """Same (seed, epoch, row) gives the same sample in any order; another seed or epoch differs."""
    rows = repeated_rows(shapes_manifest, 12)

    def dataset(seed, epoch):
        d = ManifestDataset(rows, ["canny"], 128, seed=seed, random_flip=True)
        d.set_epoch(epoch)
        return d

    first = transforms(dataset(4, 1), rows)
    assert transforms(dataset(4, 1), rows, order=reversed(range(len(rows)))) == first
    a, b = dataset(4, 1), dataset(4, 1)
    for i in (0, 5, 11):
        ea, eb = a[i], b[i]
        assert torch.equal(ea["pixel_values"], eb["pixel_values"]) and ea["caption"] == eb["caption"]
        assert torch.equal(ea["conditioning_pixel_values"], eb["conditioning_pixel_values"])
    assert transforms(dataset(5, 1), rows) != first
    assert transforms(dataset(4, 2), rows) != first


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_proportion_empty_prompts_empties_that_share_of_captions(shapes_manifest, share):
    """About ``share`` of 300 non-empty captions come out empty; 0 and 1 give none and all."""
    rows = repeated_rows(shapes_manifest, 300)
    dataset = ManifestDataset(rows, ["canny"], 128, seed=2, proportion_empty_prompts=share)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    empty = sum(c == "" for c in captions) / len(captions)
    assert set(captions) <= {"", rows[0]["caption"]}
    assert empty == pytest.approx(share, abs=0.06)
