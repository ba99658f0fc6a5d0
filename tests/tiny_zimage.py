"""A tiny Z-Image-style folder built from configs (no weights exist offline), diffusers layout, and the plain
reference call of its transformer.

Z-Image (Tongyi-MAI/Z-Image-Turbo): a single-stream ``ZImageTransformer2DModel``, the Flux-like 16-channel
VAE (shift and scale factors), and a Qwen3 text encoder read at its second-to-last hidden layer over a chat
template; here a 2-layer ``Qwen3Model`` and a word-level tokenizer the test writes, with a small chat template
in Qwen3's format (no download).
"""

from __future__ import annotations

import string
from pathlib import Path

from tests.tiny_flow import tiny_vae

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen3's chat format (the pipeline asks for ``enable_thinking=True``: no empty think block is added)."""


def qwen_tokenizer():
    """A fast word-level tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["<unk>", "user", "assistant", "a", "red", "green", "blue", "circle", "square", "on", "the"]
    letters = [c for c in string.ascii_lowercase + string.digits if c not in words]
    vocab = {w: i for i, w in enumerate(specials + words + letters)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", model_max_length=512, chat_template=CHAT_TEMPLATE)


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=1024, pad_token_id=0))


def write_tiny_zimage(folder: Path, seed: int = 0) -> Path:
    """A tiny Z-Image-style folder: 6 main layers (so the default control places, every 5th layer, are 0 and 5),
    one refiner layer each for image and text tokens, Qwen3 caption features, a fixed scheduler shift of 3."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=6, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                           axes_lens=[1024, 64, 64])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(), text_encoder=tiny_qwen3(),
                          tokenizer=qwen_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def plain_prediction(base, noisy, sigmas, hidden, added):
    """The base transformer's velocity with no ControlNet, called as ZImagePipeline's denoising loop calls it
    (diffusers/pipelines/z_image/pipeline_z_image.py, ``__call__``): one (C, 1, H, W) latent per example, the
    timestep (1000 - t) / 1000 = 1 - sigma, each prompt's unpadded embeddings; the output negated."""
    import torch

    embeds = [h[m] for h, m in zip(hidden, added["prompt_mask"])]
    out = base.transformer(list(noisy.unsqueeze(2).unbind(0)), 1 - sigmas, embeds, return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)
