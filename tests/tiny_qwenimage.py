"""A tiny Qwen-Image folder built from configs (no weights exist offline), diffusers layout.

Qwen-Image's parts in miniature: ``QwenImageTransformer2DModel`` (2 blocks), the video VAE
``AutoencoderKLQwenImage`` (frame axis, down-sampling by 8, 16 latent channels normalised by the published
``latents_mean``/``latents_std``), a Qwen2.5-VL text encoder (``Qwen2_5_VLForConditionalGeneration`` from a
``Qwen2_5_VLConfig`` with tiny text and vision configs) and a word-level tokenizer the test writes, which
splits the pipeline's prompt template as Qwen's own does: the system prefix the pipeline drops is 34 tokens.
"""

from __future__ import annotations

import string
from pathlib import Path

TEMPLATE_WORDS = ("system user assistant Describe the image by detailing color shape size texture quantity text "
                  "spatial relationships of objects and background").split()
CAPTION_WORDS = "a red green blue circle square on white black photo of".split()


def qwen_tokenizer():
    """A fast tokenizer with Qwen2's special tokens (``<|endoftext|>`` pads, ``<|im_start|>``/``<|im_end|>``)
    over words, punctuation and newlines: QwenImagePipeline's template prefix is 34 tokens, as with Qwen's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"]
    words = list(dict.fromkeys([*TEMPLATE_WORDS, *CAPTION_WORDS, *",.:", *string.ascii_lowercase, *string.digits]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    # spaces split and go; every other non-word character (newlines included) is a token of its own
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split(Regex(r"[^\w]"), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=1024)


def tiny_qwen_vl(vocab_size: int = 96):
    """Qwen2.5-VL with a 2-layer, 32-wide text model (the transformer's ``joint_attention_dim``) and a
    1-block vision tower the prompts never reach."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=vocab_size, max_position_embeddings=256,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=vocab_size, vision_start_token_id=vocab_size - 5,
        vision_end_token_id=vocab_size - 4, image_token_id=vocab_size - 3, video_token_id=vocab_size - 2))


def tiny_qwen_vae():
    """AutoencoderKLQwenImage in miniature: 3 down-samplings (x8, the published ``temperal_downsample``
    length), z_dim 16 with the class's default (published) latents_mean/latents_std."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def qwen_scheduler():
    """FlowMatchEulerDiscreteScheduler as Qwen/Qwen-Image's scheduler/scheduler_config.json sets it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                           base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


def write_tiny_qwenimage(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image folder: transformer (2 double-stream blocks, 2 heads of 16), video VAE, Qwen2.5-VL."""
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    tokenizer = qwen_tokenizer()
    pipe = QwenImagePipeline(transformer=transformer, scheduler=qwen_scheduler(), vae=tiny_qwen_vae(),
                             text_encoder=tiny_qwen_vl(len(tokenizer) + 8), tokenizer=tokenizer)
    pipe.save_pretrained(folder)
    return folder


def noisy_latents(base):
    """Noisy latents of 2 examples at 64 px, (B, C, h, w) as the adapter's ``predict`` takes them."""
    import torch

    return torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))


def plain_prediction(base, noisy, sigmas, hidden, added):
    """The base transformer without a ControlNet, called as QwenImageControlNetPipeline.__call__ calls it:
    latents packed by its ``_pack_latents``, timestep = t / 1000 (the sigma), ``img_shapes`` of the packed
    latents, the prompt mask."""
    from diffusers import QwenImageControlNetPipeline

    batch, channels, height, width = noisy.shape
    packed = QwenImageControlNetPipeline._pack_latents(noisy, batch, channels, height, width)
    return base.transformer(hidden_states=packed, timestep=sigmas, encoder_hidden_states=hidden,
                            encoder_hidden_states_mask=added["encoder_hidden_states_mask"],
                            img_shapes=[(1, height // 2, width // 2)] * batch, return_dict=False)[0]
