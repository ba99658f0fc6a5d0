"""A tiny HunyuanDiT folder built from configs (no weights exist offline), diffusers layout, and the plain
transformer call the family's tests compare against.

HunyuanDiT2DModel with 6 layers (2 skip connections, so a 2-block ControlNet), learn_sigma, v1.1's style and
image-size embedding; a 4-channel VAE down-sampling by 8 (the pipeline hard-codes 8 in its rotary grid); a tiny
BERT whose WordPiece vocabulary the test writes, and the tiny T5 of tests/tiny_flow.py as its mT5; the DDPM
v-prediction scheduler HunyuanDiT ships. The text lengths stay 77 and 256: the pipeline pads to them and the
transformer's text padding has that many rows.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tests.tiny_flow import t5_tokenizer, tiny_t5

WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "the", "photo", "of"]


def bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over a few words and every lowercase letter and digit, from a vocab file written here."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
             *(c for c in string.ascii_lowercase + string.digits if c not in WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)


def tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=80))


def write_tiny_hunyuandit(folder: Path, seed: int = 0, use_style_cond_and_image_meta_size: bool = True) -> Path:
    """A tiny HunyuanDiT-style folder (v1.1-like; ``use_style_cond_and_image_meta_size=False``: v1.2-like)."""
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=16, num_layers=6, mlp_ratio=2.0, learn_sigma=True,
                                    cross_attention_dim=16, cross_attention_dim_t5=32, pooled_projection_dim=16,
                                    text_len=77, text_len_t5=256,
                                    use_style_cond_and_image_meta_size=use_style_cond_and_image_meta_size)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, sample_size=64,
                        scaling_factor=5.0)  # HunyuanDiT's 0.13025 brings its VAE's latents to unit variance;
    # this random VAE's latents have a standard deviation of about 0.2
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.018,
                              prediction_type="v_prediction", steps_offset=1, clip_sample=False)
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=tiny_bert(), tokenizer=bert_tokenizer(folder / "_tok"),
                              transformer=transformer, scheduler=scheduler, safety_checker=None,
                              feature_extractor=None, requires_safety_checker=False, text_encoder_2=tiny_t5(),
                              tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def noisy(base) -> torch.Tensor:
    """Noisy latents of 2 examples at 64 px (8x8 latents, 4 channels)."""
    return torch.randn(2, base.transformer.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))


def plain(base, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, added: dict) -> torch.Tensor:
    """HunyuanDiT2DModel without a ControlNet, called as HunyuanDiTControlNetPipeline's step 9 calls it (rotary
    embedding of step 8), its output's first half of channels kept as the pipeline keeps it."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.controlnet_hunyuandit.pipeline_hunyuandit_controlnet import \
        get_resize_crop_region_for_grid

    transformer = base.transformer
    patch = transformer.config.patch_size
    grid_height, grid_width = 64 // 8 // patch, 64 // 8 // patch
    rotary = get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads,
                                     get_resize_crop_region_for_grid((grid_height, grid_width), 512 // 8 // patch),
                                     (grid_height, grid_width), output_type="pt")
    output = transformer(noisy, timesteps.to(noisy.dtype), encoder_hidden_states=hidden,
                         text_embedding_mask=added["text_embedding_mask"],
                         encoder_hidden_states_t5=added["encoder_hidden_states_t5"],
                         text_embedding_mask_t5=added["text_embedding_mask_t5"],
                         image_meta_size=added["image_meta_size"], style=added["style"], image_rotary_emb=rotary,
                         return_dict=False)[0]
    noise_pred, _ = output.chunk(2, dim=1)
    return noise_pred
