"""Shared plumbing of annotators that run a PyTorch model: device, dtype, same-size batches."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np

from annotators.base import Annotator, sha256_file
from annotators.image import check_batch


def pick_device() -> str:
    """``cuda`` when this worker was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def same_size_groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the batch grouped by HxW, so each group stacks into one tensor."""
    groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for i, img in enumerate(images):
        groups[img.shape[:2]].append(i)
    return list(groups.values())


class TorchAnnotator(Annotator):
    """An annotator whose maps come from a torch model run on same-size sub-batches."""

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

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():  # local, never global: annotators share processes with training code
            return self._annotate(images, ids)

    def _annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        check_batch(images, ids)
        out: list[Any] = [None] * len(images)
        step = self.cpu_batch if self.device == "cpu" else len(images)
        for group in same_size_groups(images):
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                for i, m in zip(chunk, self.predict(np.stack([images[i] for i in chunk]))):
                    out[i] = m
        return out

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        """Maps for an NxHxWx3 uint8 batch of same-size images (subclasses)."""
        raise NotImplementedError


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
