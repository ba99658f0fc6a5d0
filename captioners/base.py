"""The captioner protocol: batch of RGB images in, one caption per image out.

A captioner is split like a :class:`annotators.base.SplitAnnotator`, so the pipeline can run
``preprocess`` in CPU tasks (no weights) and keep a GPU actor busy with ``forward`` alone:

    preprocess(image, id) -> compact uint8 array      CPU task, any process, never needs setup()
    forward([inputs...])  -> [caption, ...]           model actor, after setup(); batched generate
    caption(images, ids)  =  forward([preprocess(...) ...])

Captions are deterministic: greedy or beam search, never sampling, and a caption does not depend
on what else is in its batch (decoder-only models are padded on the left, with attention masks).
On a GPU in half precision, batched kernels may still round differently from single-image ones;
that is the usual price of batching and only flips a word where two were tied.

An empty caption is not an exception: ``forward`` returns "" for that image, and the pipeline
records the row as an error ``caption[NAME]: empty caption``, so the rest of the batch keeps its
captions.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from annotators.base import package_version, plugin_provenance, sha256_file
from annotators.weights import WEIGHTS_ENV, MissingWeightsError, weight_files, weights_source

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclasses.dataclass
class CaptionerParams:
    """Parameters every captioner has; each captioner subclasses it to set its defaults."""

    model: str = ""
    """Model folder: a sub-folder of the weights folder saved with ``save_pretrained`` (looked up
    as ``<weights_dir>/<model>``, then ``<weights_dir>/<last part of model>``), a path, or a hub id
    (downloaded only when online and not found locally)."""
    max_new_tokens: int = 40
    """Most tokens generated per caption."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search. Never sampling, so captions are reproducible."""
    prompt: str = ""
    """Text given to the model with the image; its meaning depends on the captioner."""
    image_size: int = 512
    """``preprocess`` shrinks images whose short side is longer than this (never enlarges; 0 keeps
    every image as it is). Set it at or above the model's input size: the processor makes the
    exact model input in ``forward``; this only keeps what travels to the actor small."""
    dtype: str = "auto"
    """Weights' precision: auto (bfloat16 on a GPU that has it, else float16; float32 on CPU),
    float32, float16 or bfloat16."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be 0 (keep) or a size in pixels, got {self.image_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.model:
            raise ValueError("model must name a model folder or hub id")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Captioner(ABC):
    """Base class of every captioner.

    Subclasses set ``name`` (the registry key), ``Params`` (a dataclass of documented fields),
    ``packages`` (distributions whose versions go in provenance) and implement ``setup``,
    ``preprocess`` and ``forward``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[CaptionerParams]] = CaptionerParams
    packages: ClassVar[tuple[str, ...]] = ("transformers", "torch")
    #: True when the captioner loads a model: the pipeline then runs ``forward`` in an actor pool.
    uses_model: ClassVar[bool] = True

    def __init__(self, params: CaptionerParams | None = None, weights_dir: str | None = None) -> None:
        """Cheap: checks parameters only, so the driver can validate a job before any work.

        ``weights_dir`` is a folder holding model folders (or None: the ``CONTROLFORGE_WEIGHTS``
        environment variable).
        """
        self.params = params if params is not None else self.Params()
        self.weights_dir = weights_source(weights_dir)
        #: Weight files of the model, as {path relative to the model folder: sha256}.
        self.weights: dict[str, str] = {}

    def locate_weights(self) -> dict[str, str]:
        """{file: sha256} of every weight file the model loads; raises ``MissingWeightsError``
        naming the folder and where to download it when it is missing. Called on the driver before
        any work, so a bad weights folder fails in seconds, not after Ray starts."""
        return {}

    @abstractmethod
    def setup(self) -> None:
        """Load the model and its processor (on the GPU this worker was given, if any); called once
        per worker before the first ``forward``."""

    @abstractmethod
    def preprocess(self, image: np.ndarray, image_id: str) -> Any:
        """CPU, no weights (runs where ``setup()`` never ran): one image's model input, compact and
        picklable (uint8 numpy), as it travels through Ray's object store."""

    @abstractmethod
    def forward(self, inputs: list[Any]) -> list[str]:
        """Captions for a batch of ``preprocess`` outputs (needs ``setup()``): one stripped str per
        input, in input order; "" where the model generated no text (the pipeline records that
        row as an error ``caption[NAME]: empty caption``)."""

    def caption(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[str]:
        """``forward`` of ``preprocess``, image by image: what a pipeline gets by running the parts
        in different processes."""
        check_images(images, ids)
        captions = self.forward([self.preprocess(img, i) for img, i in zip(images, ids)])
        if len(captions) != len(images):  # a silent zip would drop rows
            raise RuntimeError(f"{type(self).__name__}.forward returned {len(captions)} captions for {len(images)} images")
        return captions

    def versions(self) -> dict[str, str | None]:
        return {p: package_version(p) for p in self.packages}

    def provenance(self) -> dict[str, Any]:
        """What made the captions: name, class, package versions, parameters, weight hashes."""
        if self.uses_model and not self.weights:
            self.locate_weights()
        return plugin_provenance(self)


def check_images(images: Sequence[np.ndarray], ids: Sequence[str]) -> None:
    """Fail clearly on a batch that breaks the protocol (uint8 HxWx3, one id per image)."""
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    for img in images:
        check_image(img)


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"captioners take uint8 HxWx3 RGB arrays, got {got}")


def shrink(image: np.ndarray, short_side: int) -> np.ndarray:
    """``image`` with its short side brought down to ``short_side`` (area-averaged), or as it is
    when it is already no larger (0: always as it is); C-contiguous uint8 either way."""
    height, width = image.shape[:2]
    if short_side <= 0 or min(height, width) <= short_side:
        return np.ascontiguousarray(image)
    import cv2

    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (w, h)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.path.isabs(model) or model.count("/") > 1


def locate_model_folder(source: str | None, model: str, captioner: str) -> str:
    """A transformers model folder for ``model``: a path, ``source/model``, ``source/<last part of
    model>``; else, online, the hub snapshot of ``model``. Missing: ``MissingWeightsError`` naming
    the folders tried and the hub id to download."""
    candidates = [Path(model).expanduser()]
    if source and (os.path.isdir(source) or _is_path(source)):  # not a hub id (the annotators' repo)
        candidates += [Path(source) / model, Path(source) / Path(model).name]
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return str(candidate)
    if _is_path(model):
        raise MissingWeightsError(f"captioner {captioner!r}: model folder {model} does not exist (or has no config.json)")
    looked = ", ".join(str(c) for c in candidates)
    where = Path(source) / model if source and os.path.isdir(source) else f"<weights dir>/{model}"
    hint = (f"download https://huggingface.co/{model} (e.g. `hf download {model} --local-dir {where}`) "
            f"with --weights-dir DIR or {WEIGHTS_ENV}=DIR naming the folder that holds it, "
            f"or pass the model folder's path as -p {captioner}.model=PATH")
    if hub_offline() or "/" not in model:
        raise MissingWeightsError(f"captioner {captioner!r} needs the model folder {model!r} (config.json, weights, "
                                  f"processor files), not found in {looked}: {hint}")
    from huggingface_hub import snapshot_download

    try:  # every file but the formats transformers does not load for torch
        return snapshot_download(model, ignore_patterns=["*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.tflite"])
    except Exception as exc:
        raise MissingWeightsError(f"captioner {captioner!r}: model {model!r} is not in {looked} and cannot be "
                                  f"fetched from the hub ({type(exc).__name__}): {hint}") from exc


class TransformersCaptioner(Captioner):
    """A captioner over a transformers model folder: processor + ``generate``.

    Subclasses choose the model class (``load_model``), build the processor's inputs for a batch
    (``encode``) and, where the model's output is not simply prompt-then-caption, ``decode``.
    """

    #: Force a device ("cpu", "cuda", "cuda:1"); None picks the GPU Ray gave this worker, if any.
    requested_device: str | None = None

    def model_dir(self) -> str:
        return locate_model_folder(self.weights_dir, self.params.model, self.name)

    def locate_weights(self) -> dict[str, str]:
        folder = self.model_dir()
        self.check_folder(folder)
        files = weight_files(folder)
        if not files:
            raise MissingWeightsError(f"captioner {self.name!r}: model folder {folder} has no weight files "
                                      f"(*.safetensors, *.bin); download https://huggingface.co/{self.params.model}")
        self.weights = {os.path.relpath(f, folder): sha256_file(f) for f in files}
        return dict(self.weights)

    def check_folder(self, folder: str) -> None:
        """Refuse a folder this captioner cannot load, before any work (subclasses)."""

    def setup(self) -> None:
        import torch
        from transformers import AutoProcessor

        from annotators.torch_model import pick_device

        folder = self.model_dir()
        self.check_folder(folder)
        self.device = self.requested_device or pick_device()
        self.torch_dtype = resolve_dtype(self.params.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(folder)
        with torch.no_grad():
            self.model = self.load_model(folder).to(self.device).eval()
        config = self.model.config
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False)
                                    or getattr(config.get_text_config(), "is_encoder_decoder", False))
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.encoder_decoder:
            tokenizer.padding_side = "left"  # generation continues from the last position of every row

    def load_model(self, folder: str) -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(folder, dtype=self.torch_dtype)

    def preprocess(self, image: np.ndarray, image_id: str) -> np.ndarray:
        """The image, its short side shrunk to ``image_size`` when larger: uint8 and never larger
        than the input. The processor's float tensors (4x the bytes, or more) are made in
        ``forward``, in the actor."""
        check_image(image)
        return shrink(image, self.params.image_size)

    def forward(self, inputs: list[Any]) -> list[str]:
        import torch

        if not inputs:
            return []
        with torch.inference_mode():  # local, never global: captioners share processes with other code
            # arrays out of Ray's object store are read-only, which torch warns about (and may write to)
            batch = self.encode([x if x.flags.writeable else x.copy() for x in map(np.asarray, inputs)])
            batch = batch.to(self.device)
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.torch_dtype)
            output = self.model.generate(**batch, **self.generate_kwargs())
        captions = self.decode(output, batch)
        if len(captions) != len(inputs):
            raise RuntimeError(f"{type(self).__name__}: {len(captions)} captions for {len(inputs)} inputs")
        return captions

    def generate_kwargs(self) -> dict[str, Any]:
        """Deterministic decoding whatever the folder's generation_config.json says (some ship
        ``do_sample=True``)."""
        return {"max_new_tokens": self.params.max_new_tokens, "num_beams": self.params.num_beams,
                "do_sample": False}

    @abstractmethod
    def encode(self, images: list[np.ndarray]) -> Any:
        """The processor's batch (a ``BatchFeature``) for these images and the prompt."""

    def decode(self, output: Any, batch: Any) -> list[str]:
        """The generated text only: encoder-decoder models return just it; decoder-only models
        return the (left-padded) prompt first, which is cut off."""
        sequences = getattr(output, "sequences", output)
        if not self.encoder_decoder and "input_ids" in batch:
            sequences = sequences[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(sequences, skip_special_tokens=True)]


def resolve_dtype(name: str, device: str) -> Any:
    """The torch dtype for the ``dtype`` parameter on ``device``."""
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)
