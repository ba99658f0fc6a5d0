"""Shared plumbing of annotators that run a PyTorch model: device, dtype, same-size batches."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np

from annotators.base import SplitAnnotator, sha256_file


def pick_device() -> str:
    """``cuda`` when this worker was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def same_size_groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the batch grouped by shape (HxW for images), so each group stacks into one tensor."""
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    for i, img in enumerate(images):
        groups[img.shape].append(i)
    return list(groups.values())


class TorchAnnotator(SplitAnnotator):
    """An annotator whose maps come from a torch model run on same-size sub-batches.

    Split so that ``forward`` is the network (and what is cheap on the device next to it), and
    ``postprocess`` the CPU work that turns its output into a map.
    """

    uses_model = True
    packages = ("torch", "controlnet-aux")
    #: Force a device ("cpu", "cuda"); None picks the GPU Ray gave this worker, if any.
    requested_device: str | None = None
    #: Largest sub-batch on CPU. Measured for HED at 512 px on 2 cores: 8 images at once ran
    #: 1.2x slower per image than one at a time (activations outgrow the caches); GPUs take
    #: the whole same-size group.
    cpu_batch: int = 1

    def setup(self) -> None:
        import torch

        self.device = self.requested_device or pick_device()
        with torch.no_grad():
            self.load()

    def weight_paths(self) -> dict[str, str]:
        """{name: local path} of every weight file the model loads (subclasses); raises
        ``MissingWeightsError`` for a missing one. Hashed on the driver, read by ``load``."""
        raise NotImplementedError

    def locate_weights(self) -> dict[str, str]:
        return self.hash_weights(self.weight_paths())

    def load(self) -> None:
        """Build the model from the located weights (subclasses)."""
        raise NotImplementedError

    def hash_weights(self, paths: dict[str, str]) -> dict[str, str]:
        """{file name: sha256} for provenance; remembered on the annotator."""
        self.weights.update({name: sha256_file(path) for name, path in paths.items()})
        return dict(self.weights)

    def preprocess(self, image: np.ndarray, image_id: str) -> Any:
        """The image itself by default: uint8 is the most compact input, and the conversion to a
        float tensor belongs on the device, in ``forward``."""
        return image

    def forward(self, inputs: list[Any]) -> list[Any]:
        """``forward_batch`` on same-shape sub-batches of the inputs, outputs in input order."""
        import torch

        with torch.no_grad():  # local, never global: annotators share processes with training code
            return self.batched(inputs, self.forward_batch)

    def batched(self, inputs: Sequence[np.ndarray], run: Callable[[np.ndarray], list[Any]]) -> list[Any]:
        """``run`` on NxHxWxC stacks of same-shape ``inputs`` (at most ``cpu_batch`` on CPU), one
        result per input in input order: mixed-size batches stack group by group."""
        out: list[Any] = [None] * len(inputs)
        step = self.cpu_batch if self.device == "cpu" else len(inputs)
        for group in same_size_groups(inputs):
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                results = run(np.stack([inputs[i] for i in chunk]))
                if len(results) != len(chunk):
                    raise RuntimeError(f"{type(self).__name__}: {len(results)} results for a batch of {len(chunk)}")
                for i, result in zip(chunk, results):
                    out[i] = result
        return out

    def forward_batch(self, batch: np.ndarray) -> list[Any]:
        """The model's compact outputs, one per item, for an NxHxWxC stack of same-shape
        ``preprocess`` outputs (subclasses)."""
        raise NotImplementedError


def cpu_tensor(array: np.ndarray) -> Any:
    """A CPU tensor of ``array``: on its memory, or on a copy when it is read-only (as arrays
    out of Ray's object store are; torch warns on those and may not write to them)."""
    import torch

    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_tensor(batch: np.ndarray, device: str, scale: Callable[[Any], Any] | None = None,
              channels_last: bool = False) -> Any:
    """NxHxWx3 uint8 -> Nx3xHxW float32 tensor on ``device`` (optionally rescaled).

    ``channels_last`` keeps the NHWC layout in memory, which convolution nets run faster on
    (HED: 1.4x on CPU here); the shape seen by the model is the same.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return scale(t) if scale else t
