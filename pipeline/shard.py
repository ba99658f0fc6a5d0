"""Annotate one shard in three stages, knowing nothing of Ray.

1. ``prepare`` (CPU): read the shard's files (a few threads, so object-store reads overlap),
   decode, resize, encode the image; run the CPU-only annotators; run each model annotator's
   ``preprocess``.
2. ``forward`` (the model worker: a GPU actor): only the model annotators' forward passes, in
   batches.
3. ``finish`` (CPU): each model annotator's ``postprocess`` and PNG encode, then the rows in
   input order, committed as one shard by the ``ManifestSink``.

``ShardWorker(job)(spec)`` runs all three in one process (CPU-only jobs, tests); the Ray glue in
``pipeline/dispatch.py`` runs them as separate tasks and actors. Every input file becomes exactly
one row; a failure is recorded in that row and the shard goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from annotators import registry
from annotators.base import AnnotationSkipped, Annotator
from annotators.image import check_map
from captioners import registry as caption_registry
from manifests.duplicates import phash
from manifests.rows import empty_row, mark
from manifests.schema import STATUS_ERROR, STATUS_FILTERED, STATUS_OK, cond_column
from manifests.sink import ManifestSink, ShardStats
from pipeline.config import fingerprint
from pipeline.decode import Filtered, PrepareSettings, prepare
from pipeline.encode import encode_image, encode_map
from pipeline.plan import ShardSpec, read_plan
from pipeline.reader import CaptionError, InputItem, SourceReader, cap_caption

#: Note put on an exception that escapes one file's processing (it fails the shard): names the file.
INPUT_NOTE = "input file: "

#: Files read at once per shard: enough to hide object-store latency, few enough to bound memory.
READ_THREADS = 8


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What every worker needs to annotate any shard of one job (small and picklable)."""

    input: str | None
    """Root the sources are relative to; None when they are absolute paths or URIs (``--input-list``)."""
    prepare: PrepareSettings
    image_format: str
    jpeg_quality: int
    annotators: tuple[tuple[str, dict[str, Any]], ...]
    """(registry name, parameter overrides) per annotator, in column order."""
    batch_size: int
    sink: ManifestSink
    """Commits each shard and its stats (knows the output and the provenance stored in shards)."""
    weights_dir: str | None = None
    """Folder (or hub id) the model annotators load weights from."""
    captioner: tuple[str, dict[str, Any]] | None = None
    """(captioner registry name, parameter overrides), or None: no generated captions."""
    caption_policy: str = "missing"
    """Which rows the captioner captions: ``missing`` (those without a caption), ``always``, ``prefix``."""
    caption_prefix: str = ""
    """Text put before each generated caption."""
    max_caption_chars: int = 4096
    """Captions longer than this are cut to it (``AnnotateConfig.max_caption_chars``)."""


#: The model inputs/outputs key of the captioner (annotator names never contain a colon).
CAPTION_KEY = "caption:"


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a row has no map from one annotator: ``filtered`` (nothing to annotate) or ``error``."""

    status: str
    reason: str


Outcome = bytes | Failure
"""One annotator's result for one row: the encoded map, or why there is none."""


@dataclasses.dataclass
class PreparedShard:
    """Stage 1's output, minus the model inputs (those go to the model worker alone)."""

    rows: list[dict[str, Any]]
    images: list[np.ndarray]
    """The prepared images of the live rows (``live``), in row order."""
    live: list[int]
    """Indices of the rows that decoded (the ones annotators see)."""
    outcomes: dict[str, list[Outcome]]
    """CPU annotators' results, per live row."""
    captions_not_utf8: list[str]
    started: float


ModelInputs = dict[str, list[Any]]
"""Per model annotator, one input per live row (a ``Failure`` where its preprocess failed)."""


def is_model(annotator: Annotator) -> bool:
    """Model annotators run their forward pass in the model worker; the others run in stage 1."""
    return annotator.uses_model


class ShardWorker:
    """The per-shard work of one job; build once per process (``load_models`` only where the
    forward pass runs), call its stages once per shard."""

    def __init__(self, job: ShardJob, load_models: bool = True, load_cpu: bool = True) -> None:
        self.job = job
        limit_cv2_threads()
        self.annotators: list[Annotator] = [registry.create(n, p, job.weights_dir) for n, p in job.annotators]
        for annotator in self.annotators:
            if (load_models if is_model(annotator) else load_cpu):
                annotator.setup()
        self.captioner = None
        if job.captioner is not None:
            self.captioner = caption_registry.create(job.captioner[0], job.captioner[1], job.weights_dir)
            if load_models:
                self.captioner.setup()
        self.reader = SourceReader(job.input)

    @property
    def models(self) -> list[Annotator]:
        return [a for a in self.annotators if is_model(a)]

    def __call__(self, spec: ShardSpec) -> ShardStats:
        """All three stages in this process."""
        prepared, inputs = self.prepare(spec)
        return self.finish(spec, prepared, self.forward(inputs))

    def run(self, spec: ShardSpec) -> ShardStats:
        """Actor-method spelling of ``__call__`` (Ray actors call methods by name)."""
        return self(spec)

    # ------------------------------------------------------------------------------ stage 1

    def prepare(self, spec: ShardSpec) -> tuple[PreparedShard, ModelInputs]:
        """Read, decode and encode every file; CPU annotators' maps; model annotators' inputs."""
        started = time.perf_counter()
        items = read_plan(spec.plan)
        names = [a.name for a in self.annotators]
        rows, images, live, not_utf8 = [], [], [], []
        for item, data in zip(items, prefetch(self._read, items, READ_THREADS)):
            try:
                row, image = self.prepare_row(item, data, names, not_utf8)
            except BaseException as exc:  # escaped the row's own handling: the shard fails, naming the file
                exc.add_note(f"{INPUT_NOTE}{item.source}")
                raise
            if image is not None:
                live.append(len(rows))
                images.append(image)
            rows.append(row)
        ids = [rows[i]["id"] for i in live]
        outcomes = {a.name: annotate_on_cpu(a, images, ids, self.job.batch_size)
                    for a in self.annotators if not is_model(a)}
        inputs = {a.name: preprocess_all(a, images, ids) for a in self.models}
        if self.captioner is not None:
            inputs[CAPTION_KEY] = self.caption_inputs([rows[i] for i in live], images, ids)
        return PreparedShard(rows, images, live, outcomes, not_utf8, started), inputs

    def caption_inputs(self, rows: Sequence[dict[str, Any]], images: Sequence[np.ndarray],
                       ids: Sequence[str]) -> list[Any]:
        """The captioner's input per live row; None where the policy keeps the given caption."""
        inputs: list[Any] = []
        for row, image, image_id in zip(rows, images, ids):
            if self.job.caption_policy == "missing" and row["caption"]:
                inputs.append(None)
                continue
            try:
                inputs.append(self.captioner.preprocess(image, image_id))
            except Exception as exc:
                inputs.append(Failure(STATUS_ERROR, f"caption[{self.captioner.name}]: {describe(exc)}"))
        return inputs

    def _read(self, item: InputItem) -> bytes | BaseException | None:
        """A file's bytes (None when the listing already knows it cannot be read; the error when reading fails)."""
        if item.problem:
            return None
        try:
            return self.reader.read(item.source)
        except Exception as exc:  # recorded in the row by prepare_row
            return exc

    def prepare_row(self, item: InputItem, data: bytes | BaseException | None, names: Sequence[str],
                    not_utf8: list[str]) -> tuple[dict[str, Any], np.ndarray | None]:
        """Caption, decode and encode one file; a failure is recorded in the row."""
        row = empty_row(item.id, item.source, names)
        stage = "read"
        try:
            if item.problem:
                raise _Unreadable(item.problem)
            if isinstance(data, BaseException):
                raise data
            row["source_sha256"] = hashlib.sha256(data).hexdigest()
            stage = "caption"
            if item.caption_problem:
                raise CaptionError(item.caption_problem)
            caption, row["caption_source"] = item.caption, item.caption_from or ""
            length = len(caption) if caption else 0
            if item.sidecar is not None:
                caption, encoding, length = self.reader.read_sidecar_capped(item.sidecar, self.job.max_caption_chars)
                row["caption_source"] = "sidecar"
                if encoding:
                    not_utf8.append(f"{item.sidecar} ({encoding})")
            # a blank metadata or list caption ("  ") is none: policy "missing" must caption that row
            caption = caption if caption and caption.strip() else ""
            row["caption"], _ = cap_caption(caption, self.job.max_caption_chars)
            if length > self.job.max_caption_chars and caption:
                row["caption_original_length"] = length
            if not row["caption"]:
                row["caption_source"] = ""
            stage = "decode"
            prepared = prepare(data, self.job.prepare)
            row.update(orig_width=prepared.orig_width, orig_height=prepared.orig_height)
            stage = "encode"
            encoded = encode_image(prepared.image, self.job.image_format, self.job.jpeg_quality)
        except Filtered as exc:
            mark(row, STATUS_FILTERED, f"{exc.code}: {exc}")
            return row, None
        except Exception as exc:  # one bad file must never stop the shard
            mark(row, STATUS_ERROR, f"{stage}: {describe(exc)}")
            return row, None
        height, width = prepared.image.shape[:2]
        row.update(width=width, height=height, image={"bytes": encoded, "path": None}, phash=phash(prepared.image))
        return row, prepared.image

    # ------------------------------------------------------------------------------ stage 2

    def forward(self, inputs: ModelInputs) -> dict[str, list[Any]]:
        """The model annotators' forward passes, batch by batch (needs ``load_models``)."""
        outputs = {a.name: forward_all(a, inputs[a.name], self.job.batch_size) for a in self.models}
        if self.captioner is not None:
            outputs[CAPTION_KEY] = caption_all(self.captioner, inputs[CAPTION_KEY], self.job.batch_size)
        return outputs

    # ------------------------------------------------------------------------------ stage 3

    def finish(self, spec: ShardSpec, prepared: PreparedShard, outputs: dict[str, list[Any]]) -> ShardStats:
        """Postprocess and encode the model maps, apply every annotator's outcome in column order,
        and commit the shard."""
        ids = [prepared.rows[i]["id"] for i in prepared.live]
        outcomes = dict(prepared.outcomes)
        for annotator in self.models:
            outcomes[annotator.name] = postprocess_all(annotator, outputs[annotator.name], prepared.images, ids)
        captions = outputs.get(CAPTION_KEY)
        for position, index in enumerate(prepared.live):
            row = prepared.rows[index]
            apply_outcomes(row, [(a.name, outcomes[a.name][position]) for a in self.annotators])
            if captions is not None and row["status"] == STATUS_OK:
                self.apply_caption(row, captions[position])
        return self.job.sink.write(prepared.rows, spec.index, spec.fingerprint, prepared.captions_not_utf8,
                                   time.perf_counter() - prepared.started)


    def apply_caption(self, row: dict[str, Any], caption: str | Failure | None) -> None:
        """Set a generated caption (after the prefix, with the captioner as its source), or fail the row."""
        name = self.captioner.name
        if caption is None:  # the policy kept the given caption
            return
        if isinstance(caption, Failure):
            mark(row, caption.status, caption.reason)
        elif not caption.strip():
            mark(row, STATUS_ERROR, f"caption[{name}]: empty caption")
        else:
            prefix = self.job.caption_prefix.strip() if self.job.caption_policy == "prefix" else ""
            row["caption"] = f"{prefix} {caption.strip()}" if prefix else caption.strip()
            row["caption_source"] = name


class _Unreadable(Exception):
    """The listing found a file that cannot be opened (a FIFO, a name that is not UTF-8, ...)."""


def apply_outcomes(row: dict[str, Any], outcomes: Sequence[tuple[str, Outcome]]) -> None:
    """Set the row's maps; the first annotator (in column order) that failed decides its status."""
    for name, outcome in outcomes:
        if isinstance(outcome, Failure):
            mark(row, outcome.status, outcome.reason)
            return
        row[cond_column(name)] = {"bytes": outcome, "path": None}


# ---------------------------------------------------------------------------- annotator calls


def annotate_on_cpu(annotator: Annotator, images: Sequence[np.ndarray], ids: Sequence[str],
                    batch_size: int) -> list[Outcome]:
    """A CPU annotator's encoded maps, batch by batch; a batch that fails is retried image by image."""
    outcomes: list[Outcome] = []
    for start in range(0, len(images), batch_size):
        batch, batch_ids = images[start:start + batch_size], ids[start:start + batch_size]
        results = isolate(lambda imgs, i: annotator.annotate(imgs, i), list(batch), list(batch_ids))
        outcomes.extend(encoded(annotator, result, image) for result, image in zip(results, batch))
    return outcomes


def preprocess_all(annotator: Annotator, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[Any]:
    """A model annotator's inputs: its ``preprocess`` when it splits, else the image and id."""
    if not annotator.splits:
        return [(image, image_id) for image, image_id in zip(images, ids)]
    inputs: list[Any] = []
    for image, image_id in zip(images, ids):
        try:
            inputs.append(annotator.preprocess(image, image_id))
        except Exception as exc:
            inputs.append(Failure(STATUS_ERROR, f"annotate[{annotator.name}]: {describe(exc)}"))
    return inputs


def forward_all(annotator: Annotator, inputs: Sequence[Any], batch_size: int) -> list[Any]:
    """Forward outputs per input (``Failure`` passed through, or where the model failed on it)."""
    outputs: list[Any] = list(inputs)
    todo = [i for i, x in enumerate(inputs) if not isinstance(x, Failure)]
    if annotator.splits:
        call: Callable[[list[Any]], list[Any]] = annotator.forward
    else:  # an unsplit model annotator does all its work here
        def call(batch: list[Any]) -> list[Any]:
            return annotator.annotate([image for image, _ in batch], [image_id for _, image_id in batch])
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        results = isolate(lambda batch, _ids: call(batch), [inputs[i] for i in chunk], [None] * len(chunk))
        for i, result in zip(chunk, results):
            outputs[i] = Failure(STATUS_ERROR, f"annotate[{annotator.name}]: {describe(result)}") \
                if isinstance(result, Exception) and not isinstance(result, AnnotationSkipped) else result
    return outputs


def caption_all(captioner: Any, inputs: Sequence[Any], batch_size: int) -> list[Any]:
    """Captions per input (None and ``Failure`` passed through; a failing image fails alone)."""
    outputs: list[Any] = list(inputs)
    todo = [i for i, x in enumerate(inputs) if x is not None and not isinstance(x, Failure)]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        results = isolate(lambda batch, _ids: captioner.forward(batch), [inputs[i] for i in chunk], [None] * len(chunk))
        for i, result in zip(chunk, results):
            outputs[i] = caption_outcome(captioner.name, result)
    return outputs


def caption_outcome(name: str, result: Any) -> str | Failure:
    """One image's caption, or its row's failure: an exception, or anything but a str (None, bytes, a
    number) from a plugin that breaks the protocol, fails that row alone; a None passed on would read
    as "the policy kept the given caption", and a number would fail the whole shard in ``finish``."""
    if isinstance(result, Exception):
        return Failure(STATUS_ERROR, f"caption[{name}]: {describe(result)}")
    if not isinstance(result, str):
        return Failure(STATUS_ERROR, f"caption[{name}]: returned {type(result).__name__}, not a str")
    return result


def postprocess_all(annotator: Annotator, outputs: Sequence[Any], images: Sequence[np.ndarray],
                    ids: Sequence[str]) -> list[Outcome]:
    """Encoded maps from forward outputs (``postprocess`` for annotators that split)."""
    outcomes: list[Outcome] = []
    for output, image, image_id in zip(outputs, images, ids):
        if isinstance(output, Failure):
            outcomes.append(output)
            continue
        result: Any = output
        if annotator.splits:
            try:
                result = annotator.postprocess(output, image, image_id)
            except Exception as exc:
                result = exc
        outcomes.append(encoded(annotator, result, image))
    return outcomes


def encoded(annotator: Annotator, result: Any, image: np.ndarray) -> Outcome:
    """One annotator result (map, ``AnnotationSkipped`` or exception) as an outcome for its row;
    a map covering less than the annotator's ``min_coverage`` makes the row ``filtered``."""
    name = annotator.name
    if isinstance(result, AnnotationSkipped):
        return Failure(STATUS_FILTERED, f"{name}: {describe(result)}")
    if isinstance(result, Exception):
        return Failure(STATUS_ERROR, f"annotate[{name}]: {describe(result)}")
    try:
        checked = check_map(result, image, name)
    except Exception as exc:
        return Failure(STATUS_ERROR, f"annotate[{name}]: {describe(exc)}")
    params = annotator.params
    if params.min_coverage > 0:
        covered = checked > params.coverage_level
        share = float((covered.any(axis=-1) if covered.ndim == 3 else covered).mean())
        if share < params.min_coverage:
            return Failure(STATUS_FILTERED, f"{name}: empty map (coverage {share:.4f} < min_coverage "
                                            f"{params.min_coverage:g})")
    try:
        return encode_map(checked)
    except Exception as exc:  # a map that cannot be encoded fails its row, not the shard
        return Failure(STATUS_ERROR, f"encode[{name}]: {describe(exc)}")


def isolate(call: Callable[[list[Any], list[Any]], list[Any]], batch: list[Any], ids: list[Any]) -> list[Any]:
    """``call`` on the batch; when it fails (or returns the wrong count), once per item, so one bad
    image fails alone. Each result is the item's output or the exception it raised."""
    try:
        results = list(call(batch, ids))
        if len(results) == len(batch):
            return results
        raise ValueError(f"returned {len(results)} results for {len(batch)} inputs")
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    out: list[Any] = []
    for item, item_id in zip(batch, ids):
        try:
            out.append(call([item], [item_id])[0])
        except Exception as exc:
            out.append(exc)
    return out


def prefetch(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> Iterator[Any]:
    """``fn(item)`` for each item in order, ``threads`` at a time, at most ``2 * threads`` ahead."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: list[concurrent.futures.Future] = []
        source = iter(items)
        for item in _take(source, 2 * threads):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.pop(0).result()
            for item in _take(source, 1):
                pending.append(pool.submit(fn, item))
            yield result


def _take(source: Iterator[Any], n: int) -> Iterable[Any]:
    for _ in range(n):
        try:
            yield next(source)
        except StopIteration:
            return


# ---------------------------------------------------------------------------- per-process workers

_WORKERS: dict[tuple[str, bool, bool], ShardWorker] = {}


def worker_for(job: ShardJob, load_models: bool, load_cpu: bool) -> ShardWorker:
    """This process's ``ShardWorker`` for ``job``: Ray reuses worker processes across tasks, so
    annotators (and their weights) load once per process and job, while shards stay independent
    retryable tasks."""
    key = (fingerprint(dataclasses.asdict(job)), load_models, load_cpu)
    if key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[key] = ShardWorker(job, load_models=load_models, load_cpu=load_cpu)
    return _WORKERS[key]


def annotate_shard(job: ShardJob, spec: ShardSpec) -> ShardStats:
    """One shard, every stage in this process (the CPU-only job's task)."""
    return worker_for(job, load_models=True, load_cpu=True)(spec)


def prepare_shard(job: ShardJob, spec: ShardSpec) -> tuple[int, PreparedShard, ModelInputs]:
    """Stage 1 as a task: (a small receipt the driver waits on, the prepared shard, the model inputs)."""
    prepared, inputs = worker_for(job, load_models=False, load_cpu=True).prepare(spec)
    return spec.index, prepared, inputs


def finish_shard(job: ShardJob, spec: ShardSpec, prepared: PreparedShard, outputs: dict[str, list[Any]]) -> ShardStats:
    """Stage 3 as a task."""
    return worker_for(job, load_models=False, load_cpu=False).finish(spec, prepared, outputs)


class ModelWorker:
    """Stage 2: holds the model annotators' weights; build once per actor."""

    def __init__(self, job: ShardJob) -> None:
        self.worker = ShardWorker(job, load_models=True, load_cpu=False)

    def forward(self, spec_index: int, inputs: ModelInputs) -> tuple[int, dict[str, list[Any]]]:
        """(a small receipt, the forward outputs)."""
        return spec_index, self.worker.forward(inputs)


def limit_cv2_threads() -> None:
    """Follow Ray's one-thread-per-task setting in OpenCV too: its pool would oversubscribe CPUs."""
    import cv2

    if os.environ.get("OMP_NUM_THREADS"):
        cv2.setNumThreads(int(os.environ["OMP_NUM_THREADS"]))


def describe(exc: BaseException) -> str:
    """A one-line reason: the message, or the exception type when it has none."""
    text = " ".join(str(exc).split())
    # Object reprs carry memory addresses ("<_io.BytesIO object at 0x7f...>"): drop them so the
    # same input gives the same reason on every run.
    text = _ADDRESS.sub("", text)
    return text or type(exc).__name__


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
