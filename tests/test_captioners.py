"""Captioners load tiny random models from a weights folder and caption batches deterministically.

The models are the real transformers classes at toy sizes (tests/tiny_captioners.py): BLIP,
BLIP-2 (OPT), Florence-2 (native), Qwen2-VL (dynamic resolution: a mixed-size batch is
left-padded) and LLaVA, loaded through the same ``from_pretrained(folder)`` path as real weights.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from annotators.base import sha256_file
from annotators.weights import MissingWeightsError
from captioners import registry
from captioners.base import Captioner, TransformersCaptioner
from tests.tiny_captioners import LAYOUT, write_tiny_captioners

# (captioner name, overrides): the tiny model each case loads. blip and florence2 use their
# default model, found as <weights>/<hub id> and <weights>/<last part of the hub id>.
CASES = {
    "blip": ("blip", {}),
    "blip2": ("blip", {"model": LAYOUT["blip2"]}),
    "florence2": ("florence2", {}),
    "qwen2_vl": ("vlm", {"model": LAYOUT["vlm"]}),
    "llava": ("vlm", {"model": LAYOUT["llava"]}),
}
SHORT = {"max_new_tokens": 8}  # tiny models write word salad; 8 tokens tell captions apart


@pytest.fixture(scope="session")
def caption_weights(tmp_path_factory) -> Path:
    """A weights folder with every tiny captioning model (built once per session)."""
    return write_tiny_captioners(tmp_path_factory.mktemp("caption_weights"))


@pytest.fixture(scope="session")
def loaded(caption_weights):
    """Set-up captioners by case, loaded once each."""
    cache: dict[str, Captioner] = {}

    def get(case: str) -> Captioner:
        if case not in cache:
            name, overrides = CASES[case]
            cache[case] = registry.create(name, {**overrides, **SHORT}, str(caption_weights))
            cache[case].setup()
        return cache[case]

    return get


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub here: a folder that is not found must fail at once, never try the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def mixed_batch() -> tuple[list[np.ndarray], list[str]]:
    """Small images of different sizes and content (noise, flat, dark, gradient, a large one)."""
    rng = np.random.default_rng(0)
    gradient = np.tile((np.arange(64, dtype=np.uint8) * 4)[None, :, None], (30, 1, 3))
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), np.full((32, 32, 3), 200, np.uint8),
              np.zeros((50, 20, 3), np.uint8), gradient, rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)]
    return images, [f"img{i}" for i in range(len(images))]


@pytest.mark.parametrize("case", list(CASES))
def test_captions_batched_deterministic_and_batch_independent(loaded, case):
    captioner = loaded(case)
    images, ids = mixed_batch()
    captions = captioner.caption(images, ids)
    assert len(captions) == len(images)
    assert all(isinstance(c, str) and c and c == c.strip() for c in captions), captions
    assert len(set(captions)) > 1, f"every image got the same caption: {captions}"  # order is checked below
    assert captioner.caption(images, ids) == captions
    assert [captioner.caption([img], [i])[0] for img, i in zip(images, ids)] == captions
    assert captioner.caption(images[::-1], ids[::-1]) == captions[::-1]


def test_forward_takes_read_only_arrays(loaded):
    """Arrays out of Ray's object store are read-only: same captions, no torch warning."""
    import warnings

    captioner = loaded("blip")
    inputs = [captioner.preprocess(img, i) for img, i in zip(*mixed_batch())]
    expected = captioner.forward(inputs)
    for x in inputs:
        x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert captioner.forward(inputs) == expected


def test_vlm_mixed_sizes_are_left_padded(loaded):
    """Qwen2-VL gives images of different sizes different numbers of image tokens: the batch
    is padded, on the left, so every row's prompt ends where generation starts."""
    captioner = loaded("qwen2_vl")
    images, _ = mixed_batch()
    batch = captioner.encode([captioner.preprocess(img, "x") for img in images[:3]])
    mask = batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1
    assert mask[:, -1].all() and not mask[:, 0].all()


@pytest.mark.parametrize("name", ["blip", "florence2", "vlm"])
def test_preprocess_needs_no_setup_and_is_compact(caption_weights, name):
    captioner = registry.create(name, {}, str(caption_weights))
    captioner = pickle.loads(pickle.dumps(captioner))  # what a pipeline ships to its CPU tasks
    size = captioner.params.image_size
    for image in mixed_batch()[0] + [np.zeros((size * 2, size * 3, 3), np.uint8)]:
        out = captioner.preprocess(image, "x")
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert out.nbytes <= image.nbytes
        assert min(out.shape[:2]) == min(size, *image.shape[:2])
        assert np.array_equal(pickle.loads(pickle.dumps(out)), out)
    assert not hasattr(captioner, "model")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        captioner.preprocess(np.zeros((8, 8), np.uint8), "x")


def test_missing_model_folder_names_folder_and_hub_id(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTROLFORGE_WEIGHTS", raising=False)
    captioner = registry.create("blip", {}, str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        captioner.locate_weights()
    message = str(err.value)
    assert str(tmp_path / "Salesforce/blip-image-captioning-large") in message
    assert "https://huggingface.co/Salesforce/blip-image-captioning-large" in message
    with pytest.raises(MissingWeightsError, match="huggingface.co/florence-community/Florence-2-large"):
        registry.create("florence2", {}, None).locate_weights()
    with pytest.raises(MissingWeightsError, match=re.escape(str(tmp_path / "nowhere"))):
        registry.create("vlm", {"model": str(tmp_path / "nowhere")}, None).setup()


def test_provenance_lists_weight_hashes(caption_weights):
    captioner = registry.create("blip", {"prompt": "a photo of"}, str(caption_weights))
    folder = caption_weights / LAYOUT["blip"]
    provenance = captioner.provenance()
    assert provenance["weights"] == {"model.safetensors": sha256_file(str(folder / "model.safetensors"))}
    assert provenance["name"] == "blip"
    assert provenance["class"] == "captioners.blip.BlipCaptioner"
    assert provenance["params"]["prompt"] == "a photo of"
    assert provenance["params"]["model"] == "Salesforce/blip-image-captioning-large"
    assert provenance["versions"]["transformers"] and provenance["versions"]["torch"]
    json.dumps(provenance)


def test_parameters_parse_and_fail_clearly():
    params = registry.parse_params(registry.get("vlm"), {"max_new_tokens": "12", "num_beams": "2", "dtype": "float32"})
    assert (params.max_new_tokens, params.num_beams, params.dtype) == (12, 2, "float32")
    with pytest.raises(ValueError, match=r"captioner 'blip' has no parameter 'temperature'.*max_new_tokens"):
        registry.create("blip", {"temperature": "0.7"})
    with pytest.raises(ValueError, match="blip.max_new_tokens: cannot read 'many' as int"):
        registry.create("blip", {"max_new_tokens": "many"})
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        registry.create("blip", {"num_beams": "0"})
    with pytest.raises(ValueError, match="not a captioning task"):
        registry.create("florence2", {"prompt": "<OD>"})
    with pytest.raises(registry.UnknownCaptionerError, match="known: blip, florence2, vlm"):
        registry.get("gpt4")
    assert registry.get("captioners.vlm:VlmCaptioner") is registry.get("vlm")
    with pytest.raises(TypeError, match="not a Captioner"):
        registry.get("captioners.base:shrink")
    assert {"blip", "florence2", "vlm"} <= set(registry.available())


def test_vlm_prompt_reaches_the_model(caption_weights, loaded):
    default = loaded("qwen2_vl")
    custom = registry.create("vlm", {**CASES["qwen2_vl"][1], **SHORT, "prompt": "List the colours you see."},
                             str(caption_weights))
    custom.setup()
    assert "List the colours you see." in custom.chat_text()
    assert "Describe the image in one sentence." in default.chat_text()
    images, ids = mixed_batch()
    assert custom.caption(images, ids) != default.caption(images, ids)


def test_blip_prefix_starts_the_caption(caption_weights, loaded):
    captioner = registry.create("blip", {**SHORT, "prompt": "a photo of"}, str(caption_weights))
    captioner.setup()
    images, ids = mixed_batch()
    captions = captioner.caption(images, ids)
    assert all(c.startswith("a photo of") for c in captions), captions  # BERT pieces may join the last word
    assert captions != loaded("blip").caption(images, ids)


def test_beam_search_is_deterministic_and_batch_independent(caption_weights):
    captioner = registry.create("vlm", {**CASES["qwen2_vl"][1], **SHORT, "num_beams": 2}, str(caption_weights))
    captioner.setup()
    images, ids = mixed_batch()
    captions = captioner.caption(images, ids)
    assert captions == [captioner.caption([img], [i])[0] for img, i in zip(images, ids)]


def test_empty_generation_gives_empty_caption(loaded, monkeypatch):
    """A model that ends at once yields "" for that image (the pipeline records an error row)."""
    import torch

    captioner = loaded("llava")
    eos = captioner.processor.tokenizer.eos_token_id

    def ends_at_once(input_ids, **kwargs):
        return torch.cat([input_ids, torch.full((len(input_ids), 1), eos)], dim=1)

    monkeypatch.setattr(captioner.model, "generate", ends_at_once)
    images, ids = mixed_batch()
    assert captioner.caption(images[:2], ids[:2]) == ["", ""]


def test_wrong_model_folders_are_refused_before_work(caption_weights, tmp_path):
    with pytest.raises(ValueError, match="model_type 'florence2'.*use the 'vlm' captioner"):
        registry.create("blip", {"model": LAYOUT["florence2"]}, str(caption_weights)).locate_weights()
    remote = Path(shutil.copytree(caption_weights / LAYOUT["florence2"], tmp_path / "Florence-2-base"))
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_florence2.Florence2Config"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code.*florence-community"):
        registry.create("florence2", {"model": str(remote)}).locate_weights()


def test_captioners_share_the_split_protocol():
    for name in ("blip", "florence2", "vlm"):
        cls = registry.get(name)
        assert issubclass(cls, TransformersCaptioner) and cls.name == name and cls.uses_model
        assert cls.packages == ("transformers", "torch")


def test_real_blip_captions_the_astronaut(photos):
    """With real weights (CONTROLFORGE_WEIGHTS holding Salesforce/blip-image-captioning-base or
    -large), BLIP says there is a person in scikit-image's astronaut photo."""
    root = os.environ.get("CONTROLFORGE_WEIGHTS")
    if not root:
        pytest.skip("CONTROLFORGE_WEIGHTS is not set: no real BLIP weights to test")
    folders = [f"{org}{name}" for name in ("blip-image-captioning-base", "blip-image-captioning-large")
               for org in ("Salesforce/", "")]
    found = next((f for f in folders if (Path(root) / f / "config.json").is_file()), None)
    if found is None:
        pytest.skip(f"no BLIP captioning folder under {root} (looked for {', '.join(folders)})")
    captioner = registry.create("blip", {"model": found}, root)
    captioner.setup()
    caption = captioner.caption([photos["astronaut"]], ["astronaut"])[0]
    assert any(word in caption.split() for word in ("man", "woman", "person", "astronaut")), caption


def test_sampling_in_the_folder_config_is_overridden(caption_weights, tmp_path, loaded):
    """Some hub folders ship do_sample=True in generation_config.json; captions stay greedy."""
    folder = Path(shutil.copytree(caption_weights / LAYOUT["llava"], tmp_path / "sampling"))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=5.0, top_k=50)
    (folder / "generation_config.json").write_text(json.dumps(config))
    captioner = registry.create("vlm", {**SHORT, "model": str(folder)})
    captioner.setup()
    images, ids = mixed_batch()
    assert captioner.caption(images, ids) == loaded("llava").caption(images, ids)
