"""The shipped demo base (models/tiny-circles) and the script that reproduces it (demo/tiny_base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from demo import tiny_base
from demo.circles import circle
from train.metrics import CIRCLE_PALETTE, circle_caption

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tiny-circles"
ALL_CAPTIONS = [circle_caption(c, b) for c in CIRCLE_PALETTE for b in CIRCLE_PALETTE if c != b]


@pytest.fixture
def offline(monkeypatch):
    """No hub: any attempt to reach one fails instead of waiting."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_shipped_base_generates_offline_with_stable_diffusion_pipeline(offline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32  # stored fp16, loaded fp32
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    out = pipe("a red circle on a light blue background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_shipped_base_loads_through_the_trainer(offline):
    from train.families.unet import condition_encoder_channels, vae_scale_factor
    from train.models import load_base

    base = load_base(str(SHIPPED), resolution=32)
    assert vae_scale_factor(base) == 2
    assert condition_encoder_channels(base) == (16, 32)
    assert base.scheduler.config.prediction_type == "v_prediction"
    hidden, _ = base.family.encode_prompts(base, ALL_CAPTIONS[:2], torch.device("cpu"))
    assert hidden.shape == (2, base.tokenizers[0].model_max_length, base.text_encoders[0].config.hidden_size)


@pytest.mark.parametrize("use_fast", [False, True])
def test_every_generator_caption_fits_one_token_per_word(use_fast):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED, subfolder="tokenizer", use_fast=use_fast)
    unk = tokenizer.unk_token_id
    drawn = {circle(0, i, 16)[1] for i in range(300)}
    assert drawn <= set(ALL_CAPTIONS)  # the generator writes no other caption form
    for caption in ALL_CAPTIONS + [caption.replace("a ", "an ", 1) for caption in ALL_CAPTIONS[:3]]:
        ids = tokenizer(caption).input_ids
        words = caption.split()
        assert len(ids) == len(words) + 2 <= tokenizer.model_max_length, caption  # start, words, end
        assert unk not in ids[1:-1]
        assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]


def test_written_tokenizer_matches_the_shipped_one(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    written = tiny_base.write_tokenizer(tmp_path, tiny_base.caption_words(), 16)
    shipped = AutoTokenizer.from_pretrained(SHIPPED, subfolder="tokenizer", use_fast=False)
    # the vocab.json + merges.txt form (what transformers 4.x's slow tokenizer reads) is shipped too
    for name in ("vocab.json", "merges.txt"):
        assert (SHIPPED / "tokenizer" / name).read_text() == (tmp_path / name).read_text()
    from_files = CLIPTokenizer(str(SHIPPED / "tokenizer" / "vocab.json"), str(SHIPPED / "tokenizer" / "merges.txt"))
    assert written.get_vocab() == shipped.get_vocab()
    for text in ALL_CAPTIONS + ["a dog on the moon", ""]:
        assert written(text).input_ids == shipped(text).input_ids == from_files(text).input_ids
    # unknown words still encode, one token per character (no unknown-token collapse)
    assert written.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]


def test_merges_never_split_an_earlier_word():
    words = ["ab", "b", "abc", "bc", "cab", "a"]
    ranks = {m: r for r, m in enumerate(tiny_base.bpe_merges(words))}
    assert all(tiny_base.bpe(w, ranks) == (w + "</w>",) for w in words)


def test_circle_drawn_tells_a_circle_from_noise_and_from_nothing():
    image, _ = circle(0, 3, 32)
    assert tiny_base.circle_drawn(np.asarray(image))
    assert not tiny_base.circle_drawn(np.full((32, 32, 3), 200, np.uint8))
    bar = Image.new("RGB", (32, 32), (20, 20, 20))
    ImageDraw.Draw(bar).rectangle((2, 14, 29, 17), fill=(245, 245, 245))  # long thin: not a circle
    assert not tiny_base.circle_drawn(np.asarray(bar))


TINY_RUN = ["--vae_steps", "2", "--unet_steps", "3", "--pool_size", "16", "--batch_size", "4", "--vae_batch_size", "4",
            "--warmup_steps", "1", "--eval_samples", "4", "--num_inference_steps", "2", "--threads", "1"]


def test_reproduction_script_writes_a_loadable_measured_folder(tmp_path, offline):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "base"
    assert tiny_base.main(["--output", str(out), *TINY_RUN]) == 0
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    report = json.loads((out / "tiny_base.json").read_text())
    assert report["config"]["unet_steps"] == 3 and report["metrics"]["samples"] == 4
    assert 0.0 <= report["metrics"]["colour_accuracy"] <= 1.0
    assert Image.open(out / "samples.png").size[0] > 8 * 32 and (out / "README.md").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a green circle on a black background", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_pretraining_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    def run(name: str) -> dict[str, torch.Tensor]:
        config = tiny_base.TinyBaseConfig(output=str(tmp_path / name), vae_steps=2, unet_steps=2, pool_size=16,
                                          batch_size=4, vae_batch_size=4, warmup_steps=1, threads=1)
        tiny_base.pretrain(config)
        return load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")

    first, second = run("a"), run("b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_shipped_folder_is_small_and_measured():
    assert tiny_base.folder_size(SHIPPED) < 6_000_000
    report = json.loads((SHIPPED / "tiny_base.json").read_text())
    assert report["metrics"]["colour_accuracy"] >= 0.8, report["metrics"]
    assert report["config"]["output"] == "models/tiny-circles"


def test_the_shipped_card_is_the_scripts_own_and_its_reproduction_command_runs(tmp_path):
    """models/tiny-circles/README.md is what write_model_card writes from the shipped tiny_base.json, and the
    command it names to rebuild the base starts the script (checked with --help: nothing is trained)."""
    import re
    import subprocess
    import sys

    report = json.loads((SHIPPED / "tiny_base.json").read_text())
    tiny_base.write_model_card(tmp_path, report)
    card = (SHIPPED / "README.md").read_text()
    assert (tmp_path / "README.md").read_text() == card
    command = re.search(r"`(python -m \S+ --output \S+)`", card)
    assert command is not None, card
    argv = command[1].split()
    assert argv[argv.index("--output") + 1] == report["config"]["output"]
    done = subprocess.run([sys.executable, *argv[1:], "--help"], cwd=SHIPPED.parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--measure_only" in done.stdout, done.stderr
