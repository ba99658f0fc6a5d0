"""Tiny captioning models, random weights, built from configs and saved with ``save_pretrained``.

No hub is reachable here, so each captioner's tests load a folder made by one of these builders
through the same ``from_pretrained(folder)`` path users take with real checkpoints. Tokenizers are
built from a small vocabulary (no download either); the models are the real transformers classes
at a few thousand parameters, so a caption takes milliseconds and is word salad, but it is
deterministic and depends on the image.

Random weights are drawn a little larger than transformers' defaults (``initializer_range``): at
the default 0.02 the image barely moves the logits, every image gets the same caption, and a test
could not tell a batch returned in the wrong order.
"""

from __future__ import annotations

import string
from pathlib import Path

# A few caption-like sentences: the byte-level BPE tokenizers learn their merges from these, so
# the tiny models' outputs decode to word fragments rather than single bytes.
CORPUS = [
    "a photo of a man riding a horse on the beach",
    "a woman in a red dress standing in a field of flowers",
    "two cats sleeping on a couch next to a remote",
    "a close up of a cup of coffee on a wooden table",
    "an astronaut in a white suit holding a helmet",
    "Describe the image in one sentence.",
    "What does the image describe?",
]
INIT_RANGE = 0.1

# Where write_tiny_captioners puts each model under its weights folder: the default model of
# each captioner, in the ``<weights_dir>/<hub id>`` layout for blip and vlm and the
# ``<weights_dir>/<last part of the hub id>`` layout for florence2, so both lookups are used.
LAYOUT = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip2": "blip2-tiny",
    "florence2": "Florence-2-large",
    "vlm": "qwen2-vl-tiny",
    "llava": "llava-tiny",
}

# A Qwen2-style chat template, enough for a user turn with images and text.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def byte_bpe(special_tokens: list[str], vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE learned from ``CORPUS``; special tokens get ids 0, 1, ..."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _bert_tokenizer():
    """A lower-case WordPiece tokenizer like BLIP's, with BLIP's ``[DEC]`` start token."""
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted({w for line in CORPUS for w in line.lower().strip(".?").split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = BertTokenizer(vocab=vocab, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _seeded():
    import torch

    torch.manual_seed(0)


def _save(model, folder: Path, tokenizer) -> None:
    """Save ``model`` with the output rows of special tokens and of tokens that are not printable
    ASCII text zeroed. Their logits are then 0 while a random head gives some other token a higher
    one, so a tiny model neither ends a caption early (random weights often pick the end token
    first, and every caption would be "") nor writes stray bytes of UTF-8 characters. Where the
    head is tied to the input embeddings those rows become zero inputs; a random model does not
    mind."""
    import torch

    def readable(token_id: int) -> bool:
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
        return text.isascii() and text.isprintable() and bool(text.strip())

    head = model.get_output_embeddings() or model.text_decoder.get_output_embeddings()  # BLIP keeps it inside
    silent = set(tokenizer.all_special_ids) | {i for i in range(len(tokenizer)) if not readable(i)}
    with torch.no_grad():
        head.weight[sorted(silent)] = 0
    model.eval().save_pretrained(folder)


def write_tiny_blip(folder: Path) -> Path:
    """BLIP (``BlipForConditionalGeneration``: ViT encoder + BERT decoder), 32 px input."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _bert_tokenizer()
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, initializer_range=INIT_RANGE),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=INIT_RANGE),
        projection_dim=32,
    )
    _seeded()
    _save(BlipForConditionalGeneration(config), folder, tok)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(folder)
    return folder


def write_tiny_blip2(folder: Path) -> Path:
    """BLIP-2 (``Blip2ForConditionalGeneration``: ViT + Q-Former + OPT decoder), 32 px input."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, GPT2Tokenizer

    vocab, merges = byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<image>"])
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    queries = 4
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=INIT_RANGE),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, initializer_range=INIT_RANGE),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         init_std=INIT_RANGE),
        num_query_tokens=queries,
        image_token_index=tok.image_token_id,
        initializer_range=INIT_RANGE,
    )
    _seeded()
    _save(Blip2ForConditionalGeneration(config), folder, tok)
    Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, num_query_tokens=queries).save_pretrained(folder)
    return folder


def write_tiny_florence2(folder: Path) -> Path:
    """Florence-2 (native ``Florence2ForConditionalGeneration``: DaViT + BART), 32 px input."""
    from transformers import BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    vocab, merges = byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<image>"])
    tok = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    d_model = 32
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tok), d_model=d_model, max_position_embeddings=128,
                         encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id,
                         init_std=INIT_RANGE),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=4, projection_dim=d_model,
                           drop_path_rate=0.0, initializer_range=INIT_RANGE),
        image_token_id=tok.image_token_id,
        initializer_range=INIT_RANGE,
    )
    _seeded()
    _save(Florence2ForConditionalGeneration(config), folder, tok)
    # 32 px through one stride-4 stage: 8x8 spatial tokens plus one pooled token.
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=65,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    Florence2Processor(images, tok).save_pretrained(folder)
    return folder


def write_tiny_qwen2_vl(folder: Path) -> Path:
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``), dynamic resolution: images of different
    sizes get different numbers of image tokens, so a mixed batch is left-padded."""
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab, merges = byte_bpe(specials)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=INIT_RANGE),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT_RANGE),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    _seeded()
    _save(Qwen2VLForConditionalGeneration(config), folder, tok)
    # 8 px patch units (patch 4 x merge 2): a 32x48 image is 4x6 units, 24 image tokens.
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=48 * 48)
    processor = Qwen2VLProcessor(Qwen2VLImageProcessor(**pixels), tok, Qwen2VLVideoProcessor(**pixels),
                                 chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def write_tiny_llava(folder: Path) -> Path:
    """LLaVA (CLIP vision tower + Llama), a fixed 16 image tokens per image, 32 px input."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = byte_bpe(["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
                           initializer_range=INIT_RANGE),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=INIT_RANGE),
        image_token_index=tok.image_token_id, image_seq_length=16, vision_feature_layer=-1,
    )
    _seeded()
    _save(LlavaForConditionalGeneration(config), folder, tok)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


BUILDERS = {
    "blip": write_tiny_blip,
    "blip2": write_tiny_blip2,
    "florence2": write_tiny_florence2,
    "vlm": write_tiny_qwen2_vl,
    "llava": write_tiny_llava,
}


def write_tiny_captioners(root: Path, which: tuple[str, ...] = tuple(BUILDERS)) -> Path:
    """A weights folder holding each tiny model at ``root/LAYOUT[key]``; returns ``root``."""
    for key in which:
        BUILDERS[key](Path(root) / LAYOUT[key])
    return Path(root)
