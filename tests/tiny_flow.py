"""Tiny SD3- and Flux-style folders built from configs (no weights exist offline), diffusers layout.

Both use a 16-channel VAE with SD3's shift/scaling factors, tiny CLIP encoders and a tiny T5 whose
tokenizer is a word-level ``tokenizers`` model the test writes (no sentencepiece file needed).
"""

from __future__ import annotations

import string
from pathlib import Path

from tests.tiny_sd import write_tokenizer

CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)


def t5_tokenizer():
    """A fast tokenizer over lowercase words and characters, with T5's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "red", "green", "blue", "circle", "square", "on", "the"]
    vocab = {w: i for i, w in enumerate(words + [c for c in string.ascii_lowercase + string.digits if c not in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=32)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def tiny_vae():
    """SD3/Flux's VAE shape in miniature: 16 latent channels, down-sampling by 8, shift and scale factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, sample_size=64,
                         shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(folder / "_tok")
    return CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"), model_max_length=77)


def write_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """A tiny SD3-style folder: MMDiT transformer (2 joint blocks), two CLIPs with projection, T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                                        pos_embed_max_size=32)
    tokenizer = clip_tokenizer(folder)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)), tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(), tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return folder


def write_tiny_flux(folder: Path, seed: int = 0) -> Path:
    """A tiny Flux.1-dev-style folder: 1 double + 1 single block, guidance embeds, CLIP pooled + T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(),
                        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)), tokenizer=clip_tokenizer(folder),
                        text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder
