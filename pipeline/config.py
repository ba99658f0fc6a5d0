"""Settings of one annotation job, as a typed dataclass checked on construction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from manifests.duplicates import DEFAULT_MAX_DISTANCE
from manifests.flags import flag_name, nonfinite_problem
from pipeline.decode import PrepareSettings

IMAGE_FORMATS = ("jpeg", "png")
CAPTION_POLICIES = ("missing", "always", "prefix")


@dataclasses.dataclass(kw_only=True)
class AnnotateConfig(PrepareSettings):
    """Everything that decides what an annotation job writes, and how it runs (with the image
    preparation settings of ``PrepareSettings``)."""

    input: str | None = None
    """Folder or URI (``s3://``, ``gs://``, ``file://``, any fsspec scheme) holding the images; with
    ``input_list``, the root its relative entries are under (None: the entries are absolute)."""
    output: str
    """Folder or URI the manifest is written to."""
    input_list: str | None = dataclasses.field(default=None, metadata={"metavar": "FILE"})
    """A Parquet, CSV or text file listing the images (paths or URIs, one per row, an optional
    ``caption`` column), read as a stream in its own order, instead of listing ``input``."""
    annotators: tuple[str, ...] = dataclasses.field(default=("canny",), metadata={"separator": ","})
    """Registry names, comma-separated (or ``package.module:Class`` for your own); each makes one
    ``cond_<name>`` column."""
    annotator_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, metadata={"flag": False})
    """Per-annotator parameter overrides, e.g. ``{"canny": {"low": "50"}}`` (flag: ``-p canny.low=50``)."""
    image_format: str = "jpeg"
    """Encoding of the prepared image: ``jpeg`` or ``png`` (maps are always PNG)."""
    jpeg_quality: int = 95
    """JPEG quality of the prepared image."""
    shard_size: int = 256
    """Input files per shard; shards are fixed slices of the sorted input, the unit of resume."""
    batch_size: int = 16
    """Images per annotator call."""
    limit: int | None = None
    """Annotate only the first N files of the sorted input (for trying settings out)."""
    overwrite: bool = False
    """Redo every shard instead of keeping complete ones from an earlier run."""
    weights_dir: str | None = None
    """Folder laid out like ``lllyasviel/Annotators`` (or a hub id); None: the ``CONTROLFORGE_WEIGHTS``
    environment variable."""
    require_detection: bool = False
    """Detection annotators (pose, face, person mask) mark images where they find nothing as
    ``filtered`` instead of writing an empty map."""
    concurrency: int | None = None
    """Model-annotator workers (actors); None: one per GPU with GPUs, else one per CPU."""
    gpus_per_worker: float | None = None
    """GPUs per model-annotator worker; None: 1 when the cluster has GPUs, else 0 (CPU)."""
    cpus_per_worker: int = 1
    """CPUs per worker (torch uses as many threads)."""
    captioner: str | None = None
    """Captioner registry name (``blip``, ``florence2``, ``vlm`` or ``package.module:Class``): its
    forward pass runs in the model actors; None: captions come only from sidecars, metadata, lists. Its
    parameters are set like an annotator's, e.g. ``-p vlm.prompt="Describe the image in one sentence."``."""
    captioner_params: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"flag": False})
    """The captioner's parameter overrides (``-p blip.max_new_tokens=30``)."""
    caption_policy: str = dataclasses.field(default="missing", metadata={"choices": CAPTION_POLICIES})
    """``missing``: caption rows without a sidecar/metadata caption; ``always``: caption every row
    (replacing given captions); ``prefix``: every row gets ``caption_prefix`` plus its generated caption."""
    caption_prefix: str = ""
    """Text put before every generated caption (a trigger phrase for a task-specific ControlNet)."""
    max_caption_chars: int = 4096
    """Captions longer than this many characters are cut to it, and the row records the original
    length (``caption_original_length``). Text encoders read far less: CLIP 77 tokens, T5 (SD3,
    Flux) at most 512 tokens, about 2,000 characters of English; 4096 keeps every caption an
    encoder could use, while a sidecar that is really a log file (50 MB) no longer flows into the
    manifest and the trainer's tokenizer."""
    near_duplicate_distance: int = DEFAULT_MAX_DISTANCE
    """Images whose perceptual hashes differ in at most this many of 64 bits are near duplicates
    (listed in ``_duplicates/duplicates.parquet``, skipped by readers); 0: identical hashes and exact copies only."""
    max_shard_retries: int = 2
    """Times a shard whose task or actor failed is resubmitted before it is reported as failed
    (the other shards go on; the same command again redoes it)."""
    address: str | None = None
    """Ray cluster to join (``ray://...``, ``auto``, ``host:port``); None starts local Ray."""
    num_cpus: int | None = None
    """CPUs of the embedded local Ray (None: all of this machine's)."""

    def __post_init__(self) -> None:
        problem = nonfinite_problem(self, lambda name: flag_name(name, dashes=True))
        if problem:
            raise ValueError(problem)
        self.annotators = tuple(self.annotators)
        if self.input is None and self.input_list is None:
            raise ValueError("give --input (a folder or URI of images) or --input-list (a file listing them)")
        if not self.annotators:
            raise ValueError("--annotators: give at least one annotator")
        if len(set(self.annotators)) != len(self.annotators):
            raise ValueError(f"--annotators lists a name twice: {','.join(self.annotators)}")
        if self.caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"--caption-policy {self.caption_policy!r}: choose one of {', '.join(CAPTION_POLICIES)}")
        if self.captioner is None and (self.caption_policy != "missing" or self.caption_prefix):
            raise ValueError("--caption-policy and --caption-prefix need --captioner (e.g. --captioner blip)")
        if self.caption_policy == "prefix" and not self.caption_prefix.strip():
            raise ValueError("--caption-policy prefix needs --caption-prefix TEXT (e.g. \"a canny edge photo,\")")
        if self.caption_prefix and self.caption_policy != "prefix":  # else it would be dropped without a word
            raise ValueError(f"--caption-prefix is used by --caption-policy prefix only, not {self.caption_policy}: "
                             "add --caption-policy prefix (every row captioned after the prefix), or drop it")
        unknown = set(self.annotator_params) - set(self.annotators)
        if unknown:
            raise ValueError(f"parameters given for annotators not in --annotators: {sorted(unknown)}")
        if self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"--resolution {self.resolution}: use a multiple of 8, at least 64 (e.g. 512)")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--image-format {self.image_format!r}: choose one of {IMAGE_FORMATS}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality {self.jpeg_quality}: use 1..100")
        for key in ("shard_size", "batch_size", "max_pixels"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
        if self.min_aspect is not None and not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"--min-aspect {self.min_aspect}: use a width / height ratio above 0 and at most "
                             f"--max-aspect {self.max_aspect:g} (e.g. 1 keeps landscape and square images)")
        if self.max_aspect < 1:
            raise ValueError(f"--max-aspect {self.max_aspect}: use 1 or more (e.g. 4 keeps up to 4:1 panoramas)")
        if self.min_side < 0:
            raise ValueError("--min-side must be 0 or more")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError("--gpus-per-worker must be 0 or more")
        if self.cpus_per_worker < 1:
            raise ValueError("--cpus-per-worker must be at least 1")
        if not 0 <= self.near_duplicate_distance <= 16:
            raise ValueError(f"--near-duplicate-distance {self.near_duplicate_distance}: use 0 (identical only) "
                             f"to 16 bits of 64 (default {DEFAULT_MAX_DISTANCE}; beyond about 8 the search slows)")
        if self.max_shard_retries < 0:
            raise ValueError("--max-shard-retries must be 0 or more")
        if self.max_caption_chars < 1:
            raise ValueError(f"--max-caption-chars {self.max_caption_chars}: use at least 1 (default 4096)")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("--num-cpus must be at least 1")

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide the rows written (not how the job runs)."""
        keys = ("resolution", "center_crop", "min_side", "max_pixels", "max_aspect", "min_aspect", "image_format",
                "jpeg_quality", "shard_size", "annotators", "require_detection", "captioner", "caption_policy",
                "caption_prefix")
        settings = {k: getattr(self, k) for k in keys}
        if self.max_caption_chars != AnnotateConfig.max_caption_chars:
            # Only when changed: manifests written before the cap existed keep their fingerprint and resume.
            settings["max_caption_chars"] = self.max_caption_chars
        return settings


def fingerprint(payload: Any) -> str:
    """Short stable hash of a JSON-able value."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
