"""Captions are cut before tokenizing: a caption that is really a 50 MB log file must not be tokenized whole
(tokenizers truncate only after tokenizing everything), while every normal caption reaches the tokenizer as
it is, and a cut caption still gives the tokens the whole one would."""

from __future__ import annotations

import json

import pytest

from tests.test_train_unreadable_rows import ok_ids
from train.data import (CHARS_PER_TOKEN, PROMPT_TOKENS, ManifestDataset, cap_caption, caption_char_limit,
                        load_rows)

HUGE = 2_000_000


def tokenizer(tiny_sd):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer", use_fast=False)


def test_the_limit_follows_every_tokenizer_of_the_base(tiny_sd):
    clip = tokenizer(tiny_sd)
    assert caption_char_limit([clip]) == 77 * CHARS_PER_TOKEN
    t5 = type("T5", (), {"model_max_length": 512})()
    assert caption_char_limit([clip, t5]) == 512 * CHARS_PER_TOKEN  # the longest reader decides
    unset = type("NoMax", (), {"model_max_length": int(1e30)})()  # transformers' "no limit" placeholder
    assert caption_char_limit([clip, unset]) == PROMPT_TOKENS * CHARS_PER_TOKEN
    assert caption_char_limit([clip], max_sequence_length=1024) == 1024 * CHARS_PER_TOKEN


def test_a_cut_caption_tokenizes_as_the_whole_one_and_normal_ones_are_untouched(manifest_copy, tiny_sd):
    clip = tokenizer(tiny_sd)
    limit = caption_char_limit([clip])
    ids = ok_ids(manifest_copy)
    long_caption = "a red circle on a grey background, " * 4000  # 140k characters
    rows, _ = load_rows(str(manifest_copy), ["canny"], 0, keep_duplicates=True)
    rows = [dict(r) for r in rows]
    normal = rows[0]["caption"] or "a photo"
    rows[0]["caption"], rows[1]["caption"] = normal, long_caption
    dataset = ManifestDataset(rows, ["canny"], 64, seed=0, proportion_empty_prompts=0.0, max_caption_chars=limit)
    assert dataset[0]["caption"] == normal
    cut = dataset[1]["caption"]
    assert limit <= len(cut) < 2 * limit and long_caption.startswith(cut)
    assert dataset.captions()[1] == cut  # what --cache_latents encodes is what examples give

    def tokens(text):
        return clip(text, padding="max_length", max_length=clip.model_max_length, truncation=True).input_ids

    assert tokens(cut) == tokens(long_caption)


@pytest.mark.slow
def test_training_never_tokenizes_a_huge_caption_whole(manifest_copy, tiny_sd, tmp_path, monkeypatch):
    import transformers

    from tests.test_train import train_args
    from train.train import main

    ids = ok_ids(manifest_copy)
    huge = "log line: nothing to see here\n" * (HUGE // 30)
    for shard in sorted(manifest_copy.glob("part-*.parquet")):  # every caption huge, one normal
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(shard)
        captions = ["a normal caption" if i == ids[5] else huge for i in table["id"].to_pylist()]
        at = table.schema.get_field_index("caption")
        pq.write_table(table.set_column(at, table.schema.field("caption"), pa.array(captions, pa.string())), shard)

    seen: list[int] = []
    real_call = transformers.PreTrainedTokenizerBase.__call__

    def recording(self, text=None, *args, **kwargs):
        for t in [text] if isinstance(text, str) else (text or []):
            seen.append(len(t))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", recording)
    out = tmp_path / "run"
    steps = str((len(ids) - 4) // 2)
    assert main(train_args(manifest_copy, tiny_sd, out, "--max_train_steps", steps, "--proportion_empty_prompts", "0",
                           "--validation_steps", "0")) == 0
    limit = 77 * CHARS_PER_TOKEN
    assert seen and limit <= max(seen) < 2 * limit  # huge captions were cut, never tokenized whole
    assert len("a normal caption") in seen  # a normal caption reaches the tokenizer as it is
    assert json.loads((out / "train_summary.json").read_text())["figures"]["global_step"] == int(steps)


PADDED = [
    "a" + " " * 40_000 + "red circle on a grey background",  # a field padded with spaces
    "a\n\n" * 20_000 + "red circle",  # a list of short lines
    "\t" * 50_000 + "a red circle" + "\r\n" * 10_000 + "on a grey background",
    "a red circle " + " ".join(["word"] * 30_000),  # many words: the tokenizer truncates them anyway
]


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_whitespace_never_makes_the_cut_change_the_tokens(tiny_sd, which):
    from tests.tiny_flow import t5_tokenizer

    if which == "clip":
        tok, length = tokenizer(tiny_sd), 77
        limit = caption_char_limit([tok])
    else:
        tok, length = t5_tokenizer(), 256
        limit = caption_char_limit([tok], max_sequence_length=length)

    def tokens(text):
        return tok(text, padding="max_length", max_length=length, truncation=True).input_ids

    for caption in PADDED:
        assert len(caption) > limit
        cut = cap_caption(caption, limit)
        assert len(cut) < 2 * limit  # what is tokenized stays small
        assert tokens(cut) == tokens(caption), caption[:40]


def test_a_long_caption_keeps_exactly_the_limit_of_characters_that_are_not_separators():
    import re

    limit = 50
    caption = "  red\tcircle \n\n on   a grey background " * 20 + "tail"
    cut = cap_caption(caption, limit)
    words = re.findall(r"[^ \t\n\r]+", caption)
    kept = re.findall(r"[^ \t\n\r]+", cut)
    assert sum(map(len, kept)) == limit  # separators are free; every other character counts
    assert kept[:-1] == words[:len(kept) - 1] and words[len(kept) - 1].startswith(kept[-1])
    assert cut == " ".join(kept)  # each run of separators is one space
    assert cap_caption("short\n\ncaption", limit) == "short\n\ncaption"  # one that fits is left exactly as it is
