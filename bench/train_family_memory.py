"""What a ControlNet costs per model family: parameters at the real sizes, implied memory, measured ratios.

    python bench/train_family_memory.py                       # counts for every family + SD3.5-medium-width measurement
    python bench/train_family_memory.py --measure sd3,flux    # also Flux-width (about 8 GB of RAM more)
    python bench/train_family_memory.py --measure none --fp8 flux   # ControlNet step, base bf16 vs --fp8_base

1. Parameter counts of the base (denoiser, text encoders, VAE) and of the ControlNet the trainer builds
   (train/families/: unet.py, flow.py, qwenimage.py with their default sizes) for SD 1.5, SDXL,
   SD3.5-medium, SD3.5-large, Flux.1-dev and Qwen-Image, from their published configs, on the meta device
   (``accelerate.init_empty_weights``: nothing is allocated). Implied training memory: the base in bf16
   (2 bytes/parameter) + the ControlNet in fp32 with its gradients and AdamW's two moments (16
   bytes/parameter); activations are not counted (they scale with batch and resolution, and
   ``--gradient_checkpointing`` trades them for time). ``--fp8_base`` columns: the denoiser's and text
   encoders' Linear/Conv2d weights at 1 byte each plus a float32 scale per output channel
   (train/float8_base.py), everything else of the base still bf16.
2. Measured on this CPU, for a reduced-depth model at the real width (each kind in its own process):
   peak RSS growth and time per step of a ControlNet step (base locked, fp32) versus fine-tuning the
   base alone (all of its parameters trained with AdamW), at 256 px, batch 1. The peak is reset once the
   models are built (as in 3), so it is the steps' own.
3. ``--fp8``: the same ControlNet step (ControlNet fp32 with AdamW, under bf16 autocast as accelerate's bf16 runs
   it) with the locked base in bf16 versus stored as ``--fp8_base`` stores it (``store_in_float8`` after the
   ControlNet copied it), each in its own process: peak RSS growth from before the models were built, with the
   peak reset once they are in place (building the base in fp32 and converting it are load-time transients),
   and time per step. The denoiser only: the text encoders, converted too by ``--fp8_base``, are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import subprocess
import time

import torch

GIB = 2**30

# The fields of each published config that differ from the diffusers / transformers class defaults.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
FLOW_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
# Tongyi-MAI/Z-Image-Turbo transformer/config.json: all_patch_size [2], all_f_patch_size [1], in_channels 16,
# dim 3840, n_layers 30, n_refiner_layers 2, n_heads 30, n_kv_heads 30, norm_eps 1e-5, qk_norm true,
# cap_feat_dim 2560, rope_theta 256, t_scale 1000, axes_dims [32, 48, 48], axes_lens [1024, 512, 512]
# (ZImageTransformer2DModel's defaults in diffusers 0.42.1 are these values); its VAE is Flux's (FLOW_VAE).
Z_IMAGE = dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
               cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
# Its text_encoder/config.json (Qwen3-4B, loaded as Qwen3Model: no LM head): hidden_size 2560,
# intermediate_size 9728, num_hidden_layers 36, num_attention_heads 32, num_key_value_heads 8, head_dim 128,
# vocab_size 151936.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936)
# Qwen/Qwen-Image: transformer/config.json and vae/config.json (both equal to the diffusers class defaults, written
# out: a config built from defaults would let from_config ignore a changed num_layers) and text_encoder/config.json,
# Qwen2.5-VL-7B-Instruct's (the whole Qwen2_5_VLForConditionalGeneration the pipeline loads)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
QWEN_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False)
QWEN_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


FP8_SAVED: dict[str, int] = {}
"""Bytes ``--fp8_base`` saves on each model counted by ``fp8_saving`` (keyed by the caller's label)."""


def fp8_saving(module: torch.nn.Module) -> int:
    """Bytes saved by storing ``module``'s convertible layers in float8 instead of bf16: 1 byte per weight,
    less a float32 scale per output channel."""
    from train.float8_base import convertible

    layers = [m for m in module.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and convertible(m)]
    return sum(m.weight.numel() - 4 * m.weight.shape[0] for m in layers)


def text_encoders(*configs: tuple[str, dict], label: str = "") -> int:
    import transformers

    total = 0
    for cls, fields in configs:
        config_cls = transformers.T5Config if cls == "T5EncoderModel" else transformers.CLIPTextConfig
        model = getattr(transformers, cls)(config_cls(**fields))
        names = {n for n, _ in model.named_parameters()}
        tied = {"shared.weight", "encoder.embed_tokens.weight"} <= names  # one tensor in T5, two on the meta device
        total += count(model) - (model.shared.weight.numel() if tied else 0)
        FP8_SAVED[label] = FP8_SAVED.get(label, 0) + fp8_saving(model)
    return total


def zimage_row(vae: int) -> dict:
    """Z-Image-Turbo and the ControlNet the trainer builds for it by default (train/families/zimage.py: a control
    block at every 5th of its 30 layers, as alibaba-pai's Fun Union ControlNet), on the meta device. The
    ControlNet's count is its own weights only: it runs the base's embedders and refiners, lent, not copied."""
    import transformers
    from diffusers import ZImageTransformer2DModel

    from train.families.zimage import PLACE_EVERY, initial_controlnet

    transformer = ZImageTransformer2DModel(**Z_IMAGE)
    places = tuple(range(0, Z_IMAGE["n_layers"], PLACE_EVERY))
    controlnet = initial_controlnet(transformer, places)
    encoder = transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3_4B))
    return {"family": "Z-Image-Turbo", "denoiser": count(transformer), "text": count(encoder), "vae": vae,
            "controlnet": count(controlnet), "layers": f"{len(places)} of {Z_IMAGE['n_layers']} at every 5th",
            "fp8_saved": fp8_saving(transformer) + fp8_saving(encoder)}


def qwen_image_row() -> dict:
    """Qwen-Image (Qwen/Qwen-Image) and the ControlNet train/families/qwenimage.py builds by default."""
    from diffusers import AutoencoderKLQwenImage, QwenImageControlNetModel, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from train.families.qwenimage import QwenImageAdapter

    transformer = QwenImageTransformer2DModel(**QWEN_IMAGE)
    layers = QwenImageAdapter.default_layers
    controlnet = QwenImageControlNetModel.from_config({**QWEN_IMAGE, "num_layers": layers})
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=QWEN_VL_7B_TEXT, vision_config=QWEN_VL_7B_VISION, vocab_size=QWEN_VL_7B_TEXT["vocab_size"],
        tie_word_embeddings=False))
    return {"family": "Qwen-Image", "denoiser": count(transformer), "text": count(text),
            "vae": count(AutoencoderKLQwenImage(**QWEN_VAE)), "controlnet": count(controlnet),
            "layers": f"{layers} of {QWEN_IMAGE['num_layers']} double-stream",
            "fp8_saved": fp8_saving(transformer) + fp8_saving(text)}


def family_counts() -> list[dict]:
    """Base and ControlNet parameters of each family, built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import (AutoencoderKL, ControlNetModel, FluxControlNetModel, FluxTransformer2DModel,
                           SD3ControlNetModel, SD3Transformer2DModel, UNet2DConditionModel)

    from train.families.flow import FluxAdapter, SD3Adapter
    from train.families.unet import union_from_unet

    rows = []
    with init_empty_weights():
        sd_vae, flow_vae = count(AutoencoderKL(**SD_VAE)), count(AutoencoderKL(**FLOW_VAE))
        for name, unet_config, encoders in (
                ("SD 1.5", SD15_UNET, [("CLIPTextModel", CLIP_L)]),
                ("SDXL", SDXL_UNET, [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G)])):
            unet = UNet2DConditionModel(**unet_config)
            controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
            rows.append({"family": name, "denoiser": count(unet), "text": text_encoders(*encoders, label=name),
                         "vae": sd_vae, "controlnet": count(controlnet), "layers": "whole encoder",
                         "fp8_saved": fp8_saving(unet) + FP8_SAVED[name]})
            if name == "SDXL":
                union = union_from_unet(unet, (16, 32, 96, 256))
                rows.append({**rows[-1], "family": "SDXL union", "controlnet": count(union),
                             "layers": "whole encoder + control-type transformer"})
        sd3_text = text_encoders(("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G),
                                 ("T5EncoderModel", T5_XXL), label="sd3")
        for name, config in (("SD3.5-medium", SD35_MEDIUM), ("SD3.5-large", SD35_LARGE)):
            transformer = SD3Transformer2DModel(**config)
            layers = min(SD3Adapter.default_layers, config["num_layers"])
            controlnet = SD3ControlNetModel.from_config({**config, "num_layers": layers,
                                                         "extra_conditioning_channels": 0})
            rows.append({"family": name, "denoiser": count(transformer), "text": sd3_text, "vae": flow_vae,
                         "controlnet": count(controlnet), "layers": f"{layers} of {config['num_layers']} joint",
                         "fp8_saved": fp8_saving(transformer) + FP8_SAVED["sd3"]})
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        controlnet = FluxControlNetModel.from_config({**FLUX_DEV, "num_layers": FluxAdapter.default_layers,
                                                      "num_single_layers": FluxAdapter.default_single_layers})
        rows.append({"family": "Flux.1-dev", "denoiser": count(transformer),
                     "text": text_encoders(("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL), label="flux"),
                     "vae": flow_vae, "controlnet": count(controlnet),
                     "layers": f"{FluxAdapter.default_layers}+{FluxAdapter.default_single_layers} of 19+38",
                     "fp8_saved": fp8_saving(transformer) + FP8_SAVED["flux"]})
        rows.append(zimage_row(flow_vae))
        rows.append(qwen_image_row())
        rows.append(hunyuandit_row(sd_vae))
    for row in rows:
        row["base"] = row["denoiser"] + row["text"] + row["vae"]
        row["base_bf16_gib"] = 2 * row["base"] / GIB
        row["controlnet_train_gib"] = 16 * row["controlnet"] / GIB
        row["total_gib"] = row["base_bf16_gib"] + row["controlnet_train_gib"]
        row["base_fp8_gib"] = row["base_bf16_gib"] - row["fp8_saved"] / GIB  # --fp8_base
        row["total_fp8_gib"] = row["base_fp8_gib"] + row["controlnet_train_gib"]
        row["base_finetune_gib"] = 16 * row["denoiser"] + 2 * (row["text"] + row["vae"])
        row["base_finetune_gib"] /= GIB
    return rows


# Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers (its config.json files, as recalled: no hub here to check): transformer/
# hidden_size 1408, num_layers 40, num_attention_heads 16, attention_head_dim 88, mlp_ratio 4.3637, in_channels 4,
# patch_size 2, learn_sigma true, cross_attention_dim 1024, cross_attention_dim_t5 2048, pooled_projection_dim 1024,
# text_len 77, text_len_t5 256, use_style_cond_and_image_meta_size false; text_encoder/config.json a BertModel
# (hidden_size 1024, 24 layers, 16 heads, intermediate_size 4096, vocab_size 47020); text_encoder_2/config.json
# mT5-XL's encoder (d_model 2048, d_ff 5120, d_kv 64, num_heads 32, num_layers 24, vocab_size 250112, gated-gelu);
# vae/ the SDXL-style 4-channel VAE (SD_VAE's shape).
HUNYUANDIT_V12 = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, hidden_size=1408,
                      num_layers=40, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024,
                      cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                      use_style_cond_and_image_meta_size=False, sample_size=128)
HUNYUAN_BERT = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    vocab_size=47020)
MT5_XL = dict(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def hunyuandit_row(vae: int) -> dict:
    """HunyuanDiT v1.2 on the meta device: its ControlNet is the trainer's copy (train/families/hunyuandit.py),
    one block per skip connection (num_layers // 2 - 1 = 19 of 40)."""
    import transformers
    from diffusers import HunyuanDiT2DModel

    from train.families.hunyuandit import controlnet_from_transformer

    transformer = HunyuanDiT2DModel(**HUNYUANDIT_V12)
    controlnet = controlnet_from_transformer(transformer, 3)
    bert = transformers.BertModel(transformers.BertConfig(**HUNYUAN_BERT))
    text = count(bert) + text_encoders(("T5EncoderModel", MT5_XL), label="hunyuandit")
    layers = HUNYUANDIT_V12["num_layers"]
    return {"family": "HunyuanDiT-v1.2", "denoiser": count(transformer), "text": text, "vae": vae,
            "controlnet": count(controlnet), "layers": f"{layers // 2 - 1} of {layers} (one per skip)",
            "fp8_saved": fp8_saving(transformer) + fp8_saving(bert) + FP8_SAVED["hunyuandit"]}


# --- measured: reduced depth, real width ---------------------------------------------------------

MEASURED = {
    "sd3": ({**SD35_MEDIUM, "num_layers": 2, "dual_attention_layers": (0,)}, {"num_layers": 1}),
    "flux": ({**FLUX_DEV, "num_layers": 1, "num_single_layers": 1}, {"num_layers": 1, "num_single_layers": 0}),
}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5) to its current RSS, after freeing what can be."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Bytes: the peak RSS since the last ``reset_peak_rss`` (``VmHWM``), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_kind(family: str, kind: str, steps: int, resolution: int) -> dict:
    """Peak RSS growth and seconds per step of ``kind`` (base fine-tune, ControlNet, or ``controlnet_bf16`` /
    ``controlnet_fp8``: the ControlNet step with the base stored in bf16 / float8) in this process."""
    import contextlib

    import psutil
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxTransformer2DModel,
                           SD3ControlNetModel, SD3Transformer2DModel)

    from train.adapter import BaseModels, FamilyOptions
    from train.families import FAMILIES
    from train.families.flow import TransformerView

    torch.manual_seed(0)
    start = psutil.Process().memory_info().rss
    config, sizes = MEASURED[family]
    adapter = FAMILIES[family](resolution)
    if family == "sd3":
        transformer = SD3Transformer2DModel(**config)
        hidden, pooled = torch.randn(1, 333, 4096), torch.randn(1, 2048)
    else:
        transformer = FluxTransformer2DModel(**config)
        hidden, pooled = torch.randn(1, 512, 4096), torch.randn(1, 768)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=family == "flux")
    base = BaseModels([], [], None, None, scheduler, adapter, transformer=transformer, options=FamilyOptions(("c",)))
    latent = resolution // 8
    latents = torch.randn(1, 16, latent, latent)
    if kind.startswith("controlnet"):
        transformer.requires_grad_(False)
        if family == "sd3":
            trained = SD3ControlNetModel.from_transformer(TransformerView(transformer, {}),
                                                          num_extra_conditioning_channels=0, **sizes)
            control = {"controlnet_cond": torch.randn(1, 16, latent, latent)}
        else:
            trained = FluxControlNetModel.from_transformer(
                TransformerView(transformer, {}), attention_head_dim=128, num_attention_heads=24, **sizes)
            control = {"controlnet_cond": torch.randn(1, (latent // 2) ** 2, 64)}
    else:
        trained, control = transformer, None
    stored = None
    if kind in ("controlnet_bf16", "controlnet_fp8"):  # as train/loop.py: after the ControlNet copied the base
        transformer.to(torch.bfloat16)
        if kind == "controlnet_fp8":
            from train.float8_base import store_in_float8

            stored = store_in_float8(transformer, torch.bfloat16).to_dict()
        pooled, hidden = pooled.to(torch.bfloat16), hidden.to(torch.bfloat16)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (accelerate's bf16)
    else:
        autocast = contextlib.nullcontext
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = torch.rand(1, generator=generator)
        noisy = (1 - sigmas) * latents + sigmas * noise
        added = {"pooled_projections": pooled}
        with autocast():
            if control is None:  # the base alone, trained: the same forward without residuals
                prediction = plain_prediction(family, transformer, noisy, sigmas, hidden, pooled)
            else:
                prediction = adapter.predict(trained, base, noisy, sigmas, hidden, added, control)
            loss = torch.nn.functional.mse_loss(prediction.float(), adapter.layout(noise - latents))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # every kind: the step's own peak, not building the fp32 model (which set the whole-process peak before)
    reset = reset_peak_rss()
    step()  # warm-up: optimiser state allocated
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak = peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"s_per_step": seconds, "peak_gib": (peak - start) / GIB, "trained_params": count(trained),
           "base_params": count(transformer)}
    if kind in ("controlnet_bf16", "controlnet_fp8"):
        from train.float8_base import stored_bytes

        out.update(base_gib=stored_bytes(transformer) / GIB, peak_reset=reset, fp8=stored)
    return out


def plain_prediction(family, transformer, noisy, sigmas, hidden, pooled) -> torch.Tensor:
    from diffusers import FluxPipeline

    from train.families.flow import pack

    if family == "sd3":
        return transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
    h = noisy.shape[-1] // 2
    return transformer(hidden_states=pack(noisy), timestep=sigmas, guidance=torch.full((1,), 3.5),
                       pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3),
                       img_ids=FluxPipeline._prepare_latent_image_ids(1, h, h, "cpu", torch.float32),
                       return_dict=False)[0]


def measure(family: str, steps: int, resolution: int, kinds=("base", "controlnet")) -> dict[str, dict]:
    out = {}
    for kind in kinds:
        done = subprocess.run([sys.executable, __file__, "--one", f"{family}:{kind}", "--steps", str(steps),
                               "--resolution", str(resolution)], capture_output=True, text=True, check=True)
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", default="sd3", help="families to measure on this CPU: sd3, flux, both or none")
    p.add_argument("--fp8", default="none", help="families whose ControlNet step is measured with the base in bf16 "
                   "and in float8 (--fp8_base): sd3, flux, both or none")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        family, kind = args.one.split(":")
        print(json.dumps(one_kind(family, kind, args.steps, args.resolution)))
        return

    print("1. Parameters at the real sizes (meta device) and implied training memory "
          "(bf16 base + fp32 ControlNet with grads and AdamW, activations not counted)")
    print(f"{'family':<14}{'denoiser':>10}{'text+vae':>10}{'ControlNet':>12}{'CN/denoiser':>12}"
          f"{'base bf16':>11}{'CN train':>10}{'total':>9}{'vs fine-tune':>13}{'base fp8':>10}{'total fp8':>11}"
          "  ControlNet depth")
    for r in family_counts():
        print(f"{r['family']:<14}{r['denoiser'] / 1e9:>9.2f}B{(r['text'] + r['vae']) / 1e9:>9.2f}B"
              f"{r['controlnet'] / 1e9:>11.2f}B{r['controlnet'] / r['denoiser']:>12.2f}"
              f"{r['base_bf16_gib']:>8.1f}GiB{r['controlnet_train_gib']:>7.1f}GiB{r['total_gib']:>6.1f}GiB"
              f"{r['total_gib'] / r['base_finetune_gib']:>12.2f}x"
              f"{r['base_fp8_gib']:>7.1f}GiB{r['total_fp8_gib']:>8.1f}GiB  {r['layers']}")
    families = {"none": [], "both": ["sd3", "flux"]}.get(args.measure, args.measure.split(","))
    if families:
        measure_families(families, args)
    fp8_families = {"none": [], "both": ["sd3", "flux"]}.get(args.fp8, args.fp8.split(","))
    if fp8_families:
        measure_fp8(fp8_families, args)


LABELS = {"sd3": "SD3.5-medium width (2 joint blocks; ControlNet 1)",
          "flux": "Flux.1 width (1 double + 1 single; ControlNet 1 double)"}


def measure_fp8(families: list[str], args) -> None:
    print(f"\n3. Measured on this CPU: the ControlNet step (fp32 + AdamW, bf16 autocast, {args.resolution} px, batch 1, "
          f"{args.steps} steps after a warm-up) with the locked denoiser stored in bf16 vs in float8 (--fp8_base)")
    for family in families:
        m = measure(family, args.steps, args.resolution, ("controlnet_bf16", "controlnet_fp8"))
        b, f = m["controlnet_bf16"], m["controlnet_fp8"]
        print(f"{LABELS[family]}: base {b['base_params'] / 1e6:.0f}M, ControlNet {b['trained_params'] / 1e6:.0f}M; "
              f"fp8: {f['fp8']['layers']} layers, {f['fp8']['bytes_before'] / GIB:.2f} -> "
              f"{f['fp8']['bytes_after'] / GIB:.2f} GiB")
        for name, r in (("base bf16", b), ("base fp8 ", f)):
            print(f"  {name}: stored {r['base_gib']:.2f} GiB, {r['s_per_step']:.2f} s/step, "
                  f"peak RSS +{r['peak_gib']:.2f} GiB{'' if r['peak_reset'] else ' (peak not reset: load included)'}")
        print(f"  ratio fp8/bf16: stored base {f['base_gib'] / b['base_gib']:.2f}x, time {f['s_per_step'] / b['s_per_step']:.2f}x, "
              f"peak RSS growth {f['peak_gib'] / b['peak_gib']:.2f}x (saved {b['peak_gib'] - f['peak_gib']:.2f} GiB)")


def measure_families(families: list[str], args) -> None:
    print(f"\n2. Measured on this CPU (fp32, {args.resolution} px, batch 1, {args.steps} steps after a warm-up), "
          "reduced depth at the real width; base = fine-tuning the base alone")
    for family in families:
        m = measure(family, args.steps, args.resolution)
        b, c = m["base"], m["controlnet"]
        label = LABELS[family]
        print(f"{label}: base {b['base_params'] / 1e6:.0f}M, ControlNet {c['trained_params'] / 1e6:.0f}M")
        print(f"  base fine-tune: {b['s_per_step']:.2f} s/step, peak RSS +{b['peak_gib']:.2f} GiB")
        print(f"  ControlNet:     {c['s_per_step']:.2f} s/step, peak RSS +{c['peak_gib']:.2f} GiB")
        print(f"  ratio ControlNet/base: time {c['s_per_step'] / b['s_per_step']:.2f}x, "
              f"memory {c['peak_gib'] / b['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
