"""A tiny Sana folder built from configs (no weights exist offline), diffusers layout, and the reference call.

Sana's parts in miniature: ``SanaTransformer2DModel`` (3 blocks, patch 1), a DC-AE (``AutoencoderDC``) that
down-samples by 32 as the real one does (6 stages, deterministic ``.latent``, a scaling factor), a tiny
Gemma2 text encoder with a word-level tokenizer the test writes (Gemma's special tokens, BOS prepended),
and Sana's flow DPM-Solver scheduler (``use_flow_sigmas``, ``flow_shift``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
             bos_token_id=2)


def gemma_tokenizer():
    """A fast word-level tokenizer with Gemma's special tokens that prepends ``<bos>`` as Gemma's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "red", "green", "blue", "circle", "square", "on", "the",
             "prompt", "user", ":"]
    vocab = {w: i for i, w in enumerate(words + [c for c in string.ascii_lowercase + string.digits if c not in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", model_max_length=512)


def tiny_dc_ae():
    """DC-AE's shape in miniature: 6 stages (32x down-sampling), 4 latent channels, a scaling factor."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4,
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=(8,) * 6, decoder_block_out_channels=(8,) * 6,
                         encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
                         encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
                         scaling_factor=0.41407)


def write_tiny_sana(folder: Path, seed: int = 0) -> Path:
    """A tiny Sana folder: transformer with 3 blocks over 4-channel latents, DC-AE, Gemma2, flow DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=1)
    # Sana's published scheduler: DPM-Solver++ on flow sigmas, predicting the velocity, shifted by flow_shift
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=Gemma2Model(Gemma2Config(**GEMMA)),
                        vae=tiny_dc_ae(), transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def plain(base, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor, added: dict) -> torch.Tensor:
    """The base transformer without a ControlNet, called as SanaControlNetPipeline.__call__ calls it: the
    scheduler's timestep (sigma x num_train_timesteps), the prompt embeddings and their attention mask."""
    timestep = sigmas * base.scheduler.config.num_train_timesteps
    return base.transformer(noisy, encoder_hidden_states=hidden, encoder_attention_mask=added["encoder_attention_mask"],
                            timestep=timestep, return_dict=False)[0]


def noisy(base) -> torch.Tensor:
    """Noisy latents of 2 examples at 64 px (2x2 latents of DC-AE's 32x down-sampling)."""
    channels = base.transformer.config.in_channels
    return torch.randn(2, channels, 2, 2, generator=torch.Generator().manual_seed(3))
