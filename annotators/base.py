"""The annotator protocol: batch of RGB images in, condition maps of the same size out.

An annotator is constructed once per worker (that is where weights load), is called on batches,
and knows its own name, parameters and provenance. It knows nothing of Ray or of manifests.

A :class:`SplitAnnotator` also offers its work in three parts, so that a pipeline can run the CPU
parts (``preprocess``, ``postprocess``) in plain tasks and keep a GPU actor busy with ``forward``
alone; its ``annotate`` composes the three and is what every other caller uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from importlib import metadata
from typing import Any, ClassVar, Sequence

import numpy as np

from annotators.image import check_batch


@dataclasses.dataclass
class AnnotatorParams:
    """Base for each annotator's parameters; subclasses add documented fields and checks.

    Every annotator takes the two curation fields below: a ControlNet learns nothing from a pair
    whose condition map is empty, so such rows can be ``filtered`` (``canny: empty map ...``).
    """

    min_coverage: float = 0.0
    """Mark the row ``filtered`` when less than this share of the map's pixels is above
    ``coverage_level`` (e.g. 0.005 for Canny; 0 keeps every map)."""
    coverage_level: int = 0
    """A pixel counts as covered when its value (any channel) exceeds this: 0 for binary maps such
    as Canny's, about 32 for soft maps such as HED's."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AnnotationSkipped(Exception):
    """Returned in place of a map, per image, when the annotator found nothing to annotate (e.g. no
    person); an exception type so it carries a message, but returned, not raised, so the rest of the
    batch keeps its maps. The pipeline records such a row as ``status=filtered`` with the message.
    """


class Annotator(ABC):
    """Base class of every annotator.

    Subclasses set ``name`` (the registry key and the ``cond_<name>`` column), ``Params`` (a
    dataclass of parameters), ``packages`` (distributions whose versions go in provenance) and
    implement :meth:`annotate`.
    """

    name: ClassVar[str]
    Params: ClassVar[type[AnnotatorParams]] = AnnotatorParams
    packages: ClassVar[tuple[str, ...]] = ()
    #: True when the annotator loads a model: the pipeline then runs it in an actor pool.
    uses_model: ClassVar[bool] = False
    #: True when the annotator implements preprocess/forward/postprocess (a SplitAnnotator).
    splits: ClassVar[bool] = False

    def __init__(self, params: AnnotatorParams | None = None, weights_dir: str | None = None) -> None:
        """Cheap: checks parameters only, so the driver can validate a job before any work.

        ``weights_dir`` is a folder laid out like ``lllyasviel/Annotators`` (or a hub id);
        None falls back to the ``CONTROLFORGE_WEIGHTS`` environment variable.
        """
        from annotators.weights import weights_source

        self.params = params if params is not None else self.Params()
        self.weights_dir = weights_source(weights_dir)
        #: Weight files loaded, as {file name: sha256}; filled by model annotators.
        self.weights: dict[str, str] = {}

    def locate_weights(self) -> dict[str, str]:
        """{file name: sha256} of every weight file this annotator will load; raises
        ``MissingWeightsError`` naming the file when one is missing. Called on the driver before
        any work, so a bad weights folder fails in seconds, not after Ray starts."""
        return {}

    def setup(self) -> None:
        """Load weights; called once per worker before the first batch (no-op by default)."""

    @abstractmethod
    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        """Condition maps for a batch of uint8 HxWx3 RGB images.

        ``ids`` are the rows' stable ids, used to seed any per-image randomness so that a
        result never depends on batching, sharding or worker. Each returned map is uint8,
        HxW or HxWx3, with the same HxW as its image (or an :class:`AnnotationSkipped`).
        """

    def versions(self) -> dict[str, str | None]:
        """Versions of the packages that compute the maps."""
        return {p: package_version(p) for p in self.packages}

    def provenance(self) -> dict[str, Any]:
        """What made this annotator's maps: class, package versions, parameters, weight hashes."""
        return plugin_provenance(self)


class SplitAnnotator(Annotator):
    """An annotator whose CPU parts can run apart from its model. annotate() composes them.

    ``preprocess`` and ``postprocess`` run per image in processes where ``setup()`` was never
    called, so they must not touch weights; ``forward`` runs the model on a batch (after
    ``setup()``). What passes between them travels through Ray's object store: keep it compact
    and picklable (numpy on the CPU, uint8 where possible; never torch tensors or device memory).
    """

    splits = True

    @abstractmethod
    def preprocess(self, image: np.ndarray, image_id: str) -> Any:
        """CPU, no weights needed (runs in a process where setup() was never called): one image's model input.
        Keep it compact (uint8 where possible): it travels through Ray's object store."""

    @abstractmethod
    def forward(self, inputs: list[Any]) -> list[Any]:
        """The model on a batch of preprocess() outputs (needs setup()); one output per input, compact
        (e.g. float16/uint8 numpy on CPU), as it travels back through the object store."""

    @abstractmethod
    def postprocess(self, output: Any, image: np.ndarray, image_id: str) -> np.ndarray | AnnotationSkipped:
        """CPU, no weights needed: one image's map (uint8 HxW or HxWx3, same HxW as image) from its forward output."""

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray | AnnotationSkipped]:
        """``postprocess`` of ``forward`` of ``preprocess``, image by image: the same maps a
        pipeline gets by running the three parts in different processes."""
        check_batch(images, ids)
        outputs = self.forward([self.preprocess(img, i) for img, i in zip(images, ids)])
        if len(outputs) != len(images):  # a silent zip would drop rows
            raise RuntimeError(f"{type(self).__name__}.forward returned {len(outputs)} outputs for {len(images)} inputs")
        return [self.postprocess(out, img, i) for out, img, i in zip(outputs, images, ids)]


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weight files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed from a job seed and the row id, stable across runs and workers."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def plugin_provenance(plugin: Any) -> dict[str, Any]:
    """An annotator's or captioner's record in the provenance: name, class, package versions,
    parameters and weight hashes."""
    cls = type(plugin)
    return {
        "name": plugin.name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "versions": plugin.versions(),
        "params": plugin.params.to_dict(),
        "weights": dict(plugin.weights),
    }
