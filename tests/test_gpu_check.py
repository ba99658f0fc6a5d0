"""bench/gpu_check.py: its --tiny run measures every section with sane values; sections fail and skip alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import Context, Section, TINY

ROOT = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[dict, str]:
    """One ``--tiny`` run of the script as users run it (by path, its own local Ray): (JSON, markdown)."""
    out, work = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("gpu_check_work")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert list(work.iterdir()) == []  # models, images and runs are deleted
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_tiny_run_has_every_section_and_no_error_or_skip(tiny_report):
    report, md = tiny_report
    assert report["tiny"] is True and report["device"]["device"] == "cpu"
    assert list(report["sections"]) == list(gpu_check.sections())
    problems = [k for k, _ in gpu_check.flatten(report["sections"]) if k.endswith(("error", "skipped"))]
    assert problems == []
    assert not any(s["over_budget"] for s in report["sections"].values())
    first = md.splitlines()[0]
    assert first.startswith("Device: ") and report["device"]["torch"] in first and report["device"]["date"] in first
    for name in report["sections"]:
        assert f"| {name} | " in md


@pytest.mark.slow
def test_tiny_annotator_figures_are_rates_with_ratios_against_controlnet_aux(tiny_report):
    annotators = tiny_report[0]["sections"]["annotators"]
    small, large = TINY.batch_sizes
    for name in ("hed", "depth", "openpose", "segmentation", "blip"):
        figures = annotators[name]
        assert positive(figures[f"ours_b{small}_images_per_s"]) and positive(figures[f"ours_b{large}_images_per_s"])
        assert positive(figures[f"b{large}_vs_b{small}"])
    for name in ("hed", "depth", "openpose"):  # controlnet-aux's per-image loop, on the same images
        assert positive(annotators[name]["controlnet_aux_images_per_s"])
        expected = annotators[name][f"ours_b{large}_images_per_s"] / annotators[name]["controlnet_aux_images_per_s"]
        assert annotators[name][f"ours_b{large}_vs_controlnet_aux"] == pytest.approx(expected)
    assert "no" in annotators["segmentation"]["controlnet_aux"] and "no" in annotators["blip"]["controlnet_aux"]


@pytest.mark.slow
def test_tiny_annotation_job_writes_every_row_and_measures_the_model_busy_share(tiny_report):
    job = tiny_report[0]["sections"]["annotate_job"]
    assert job["rows_ok"] == job["images"] == TINY.job_images
    assert positive(job["images_per_s"]) and job["forward_calls"] >= TINY.job_images // TINY.job_shard_size
    assert 0 < job["model_busy"] <= job["model_busy_steady"] <= 1.0
    assert job["gpu_utilisation_sampled"] is None and job["gpu_utilisation_note"] == "no GPU"
    assert 0 < job["simulated_busy"] <= 1


@pytest.mark.slow
def test_tiny_training_figures_are_positive_and_resume_is_exact(tiny_report):
    sections = tiny_report[0]["sections"]
    sd15 = sections["train_sd15"]
    for kind in ("base_finetune", "controlnet"):
        assert positive(sd15[kind]["s_per_step"]) and positive(sd15[kind]["peak_gib"])
    assert positive(sd15["time_ratio"]) and positive(sd15["memory_ratio"])
    assert sd15["time_ratio"] == pytest.approx(sd15["controlnet"]["s_per_step"] / sd15["base_finetune"]["s_per_step"])
    assert (sd15["paper_time_ratio"], sd15["paper_memory_ratio"]) == (1.34, 1.23)

    runs = [sections["cache_latents"]["plain"], sections["cache_latents"]["cached"], sections["train_sdxl"],
            sections["train_flux"]["bf16"], sections["train_flux"]["fp8"]]
    for run in runs:
        assert run["steps"] == TINY.train_steps + 1 and run["mixed_precision"] == "bf16"
        assert positive(run["s_per_step"]) and positive(run["peak_gib"]) and math.isfinite(run["final_loss"])
    for run in runs[2:]:  # SDXL and Flux validate on the exported weights
        assert run["validation_images"] >= 1
    assert positive(sections["cache_latents"]["speedup"])
    assert positive(sections["train_flux"]["fp8_time_ratio"]) and positive(sections["train_flux"]["fp8_memory_ratio"])
    assert "AdamW" in sections["train_sdxl"]["optimizer"]  # no CUDA: says why 8-bit Adam did not run

    resume = sections["resume_exact"]
    assert resume["exact"] is True and resume["same_keys"] is True and resume["max_abs_diff"] == 0
    assert resume["step_3_changed_weights"] is True  # so equal weights are not a run that trained nothing


# --- the runner, on stand-in sections (fast) -------------------------------------------------------------


def fake_sections(monkeypatch, registry: dict[str, Section]) -> None:
    monkeypatch.setattr(gpu_check, "sections", lambda: registry)


def context(tmp_path) -> Context:
    return Context(tiny=True, sizes=TINY, device="cpu", work=tmp_path)


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(monkeypatch, tmp_path):
    def boom(ctx):
        raise RuntimeError("out of memory\nsecond line")

    fake_sections(monkeypatch, {"boom": Section(boom, 10, "fails"), "ok": Section(lambda ctx: {"x": 1.5}, 10, "works")})
    seen = []
    results = gpu_check.run_sections(context(tmp_path), ["boom", "ok"], 20, lambda r: seen.append(list(r)))
    assert results["boom"]["error"].startswith("RuntimeError: out of memory second line (test_gpu_check.py:")
    assert results["ok"]["x"] == 1.5 and "error" not in results["ok"]
    assert seen == [["boom"], ["boom", "ok"]]  # written after each section: a run cut short keeps its figures


def test_sections_past_the_runs_budget_are_skipped_with_the_reason(monkeypatch, tmp_path):
    ran = []

    def slow(ctx):
        ran.append("slow")
        time.sleep(0.35)
        return {}

    late = Section(lambda ctx: ran.append("late") or {}, 1, "b")
    fake_sections(monkeypatch, {"slow": Section(slow, 1, "a"), "late": late})
    results = gpu_check.run_sections(context(tmp_path), ["slow", "late"], 0.4)
    assert ran == ["slow"] and results["slow"]["over_budget"] is True
    assert "budget" in results["late"]["skipped"] and results["late"]["budget_s"] == pytest.approx(0.2)


def test_a_part_that_would_exceed_the_sections_budget_is_skipped_and_a_failing_part_is_recorded(tmp_path):
    ctx = context(tmp_path)
    ctx.deadline = time.monotonic() + 2
    called = []
    skipped = ctx.part("big", 30, lambda: called.append(1) or {})
    assert called == [] and "big: needs about 30 s" in skipped["skipped"]
    # A budget no loaded machine can run out of while the next two parts run (each part also collects
    # garbage, which took over a second in a full CI run): they are judged on what they do, not on the clock.
    ctx.deadline = time.monotonic() + 3600
    assert ctx.part("small", 1, lambda: {"v": 2}) == {"v": 2}
    failed = ctx.part("bad", 1, lambda: {}["missing"])
    assert failed["error"].startswith("KeyError: 'missing'")


def test_the_markdown_has_one_row_per_figure_and_survives_pipes():
    report = {"tiny": False, "device": {"card": "NVIDIA H100", "torch": "2.9", "cuda": "12.8", "date": "2026-12-07"},
              "sections": {"a": {"title": "t", "x": {"y": 0.123456}, "note": "a|b"}}}
    md = gpu_check.markdown(report).splitlines()
    assert md[0] == "Device: NVIDIA H100, torch 2.9, CUDA 12.8, 2026-12-07"
    assert "| a | x.y | 0.1235 |" in md and "| a | note | a/b |" in md


@pytest.mark.parametrize("argv, message", [(["--budget", "0"], "--budget must be positive"),
                                           (["--only", "nosuch"], "invalid choice: 'nosuch'")])
def test_bad_flags_fail_fast_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_asking_for_cuda_without_a_gpu_says_to_use_tiny(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda"])
    assert "use --tiny" in capsys.readouterr().err


# --- the full run's base writers, at shrunken configs (fast) ---------------------------------------------

CLIP_SMALL = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
VAE_SMALL = dict(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4)
SMALL_CONFIGS = {
    "CLIP_L": CLIP_SMALL, "CLIP_G": {**CLIP_SMALL, "hidden_act": "gelu"}, "SD_VAE": VAE_SMALL,
    "FLOW_VAE": {**VAE_SMALL, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False},
    "T5_XXL": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
    "SD15_UNET": dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "SDXL_UNET": dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=64,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                      norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 1)),
    "FLUX_DEV": dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                     pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
"""The published configs ``bench/train_family_memory.py`` holds, shrunk with their proportions between models kept
(text widths that the denoisers read), so the full run's writers can be checked in seconds."""


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_the_full_runs_base_writers_make_folders_the_trainer_loads(family, monkeypatch, tmp_path):
    import torch

    from bench import gpu_check_train, train_family_memory
    from train.models import load_base

    for name, config in SMALL_CONFIGS.items():
        monkeypatch.setattr(train_family_memory, name, config)
    writer = {"sd": gpu_check_train.write_sd15, "sdxl": gpu_check_train.write_sdxl, "flux": gpu_check_train.write_flux}
    folder = writer[family](tmp_path / family, "cpu")
    base = load_base(str(folder), 64)
    assert base.family.name == family
    hidden, _ = base.family.encode_prompts(base, ["a red circle"], torch.device("cpu"))
    assert hidden.shape[0] == 1 and torch.isfinite(hidden).all()
    if family == "flux":  # real width, reduced depth
        assert (base.denoiser.config.num_layers, base.denoiser.config.num_single_layers) == (2, 2)
