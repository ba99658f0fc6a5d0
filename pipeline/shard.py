"""Annotate one shard: read, decode, annotate and encode its files, then write its Parquet file.

This is the unit of work the Ray job schedules and the unit of resume. It knows nothing of Ray:
``ShardAnnotator`` is constructed once per worker (annotators load there) and called per shard.
Every input file becomes exactly one row; a failure is recorded in that row and the shard goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Sequence

import numpy as np

from annotators import registry
from annotators.base import AnnotationSkipped, Annotator
from annotators.image import check_map
from manifests.io import join, resolve, write_shard
from manifests.schema import (
    STATUS_ERROR,
    STATUS_FILTERED,
    STATUS_OK,
    STATUSES,
    cond_column,
    manifest_schema,
    shard_name,
)
from pipeline.config import fingerprint
from pipeline.decode import Filtered, PrepareSettings, prepare
from pipeline.encode import encode_image, encode_map
from pipeline.reader import read_sidecar


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What every worker needs to annotate any shard of one job (small and picklable)."""

    input: str
    output: str
    prepare: PrepareSettings
    image_format: str
    jpeg_quality: int
    annotators: tuple[tuple[str, dict[str, Any]], ...]
    """(registry name, parameter overrides) per annotator, in column order."""
    batch_size: int
    provenance: dict[str, Any]
    """Job provenance stored in every shard's metadata (settings fingerprint, annotators)."""
    weights_dir: str | None = None
    """Folder (or hub id) the model annotators load weights from."""


def shard_spec(index: int, items: Sequence[Any], settings_fingerprint: str) -> dict[str, Any]:
    """A shard's work order: its files (as plain lists, so Ray Data can hold them in Arrow)."""
    spec = {
        "shard": index,
        "ids": [i.id for i in items],
        "sources": [i.source for i in items],
        "sidecars": [i.sidecar for i in items],
        "captions": [i.caption for i in items],
        "problems": [i.problem for i in items],
    }
    # Names and stamps (size, mtime of the file and its sidecar): an overwritten image or an
    # edited caption changes its slice's fingerprint, so resume redoes that shard.
    listed = "\n".join(f"{i.source}\t{i.stamp}" for i in items)
    slice_key = hashlib.sha256(listed.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    spec["fingerprint"] = f"{settings_fingerprint}-{slice_key}"
    return spec


class ShardAnnotator:
    """Annotates shards of one job; build once per worker, call once per shard spec."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        limit_cv2_threads()
        self.annotators: list[Annotator] = [registry.create(n, p, job.weights_dir) for n, p in job.annotators]
        for annotator in self.annotators:
            annotator.setup()
        self.fs, self.base = resolve(job.input)

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Actor-method spelling of ``__call__`` (Ray actors call methods by name)."""
        return self(spec)

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Annotate and write one shard; returns its counts by status and its time."""
        start = time.perf_counter()
        rows = self.annotate_rows(spec)
        schema = manifest_schema(
            [a.name for a in self.annotators],
            {**self.job.provenance, "shard": spec["shard"], "fingerprint": spec["fingerprint"]},
        )
        write_shard(rows, schema, self.job.output, shard_name(spec["shard"]))
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        return {"shard": spec["shard"], "rows": len(rows), **counts,
                "seconds": time.perf_counter() - start, "captions_not_utf8": self.captions_not_utf8}

    def annotate_rows(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        """The shard's rows, in input order, one per file."""
        self.captions_not_utf8: list[str] = []
        rows: list[dict[str, Any]] = []
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        for index in range(len(spec["ids"])):
            row, image = self.prepare_row(spec, index)
            rows.append(row)
            if image is not None:
                pending.append((row, image))
            if len(pending) >= self.job.batch_size:
                self.annotate_batch(pending)
                pending = []
        if pending:
            self.annotate_batch(pending)
        return rows

    def prepare_row(self, spec: dict[str, Any], index: int) -> tuple[dict[str, Any], np.ndarray | None]:
        """Read, caption and decode one file; a failure is recorded in the row."""
        row = empty_row(spec["ids"][index], spec["sources"][index], [a.name for a in self.annotators])
        stage = "read"
        problems = spec.get("problems") or [None] * len(spec["ids"])
        if problems[index]:
            mark(row, STATUS_ERROR, f"{stage}: {problems[index]}")
            return row, None
        try:
            with self.fs.open_input_file(join(self.base, row["source"])) as f:
                data = f.read()
            row["source_sha256"] = hashlib.sha256(data).hexdigest()
            stage = "caption"
            sidecar = spec["sidecars"][index]
            caption = spec["captions"][index]
            if sidecar is not None:
                caption, encoding = read_sidecar(self.fs, self.base, sidecar)
                if encoding:
                    self.captions_not_utf8.append(f"{sidecar} ({encoding})")
            row["caption"] = caption or ""
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
        row.update(width=width, height=height, image={"bytes": encoded, "path": None})
        return row, prepared.image

    def annotate_batch(self, batch: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        """Run every annotator on the batch; rows whose annotation fails are marked, not lost."""
        for annotator in self.annotators:
            live = [(row, img) for row, img in batch if row["status"] == STATUS_OK]
            if not live:
                return
            maps = run_annotator(annotator, live)
            for (row, image), result in zip(live, maps):
                if isinstance(result, AnnotationSkipped):
                    mark(row, STATUS_FILTERED, f"{annotator.name}: {describe(result)}")
                elif isinstance(result, Exception):
                    mark(row, STATUS_ERROR, f"annotate[{annotator.name}]: {describe(result)}")
                else:
                    try:
                        row[cond_column(annotator.name)] = {"bytes": encode_map(result), "path": None}
                    except Exception as exc:  # a map that cannot be encoded fails its row, not the shard
                        mark(row, STATUS_ERROR, f"encode[{annotator.name}]: {describe(exc)}")


_WORKER_CACHE: dict[str, ShardAnnotator] = {}


def annotate_shard(job: ShardJob, spec: dict[str, Any]) -> dict[str, Any]:
    """Annotate one shard with this process's ``ShardAnnotator`` for ``job``.

    Ray reuses worker processes across tasks, so annotators (and their weights) load once per
    worker process and job, as in an actor, while shards stay independent retryable tasks.
    """
    key = fingerprint(dataclasses.asdict(job))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = ShardAnnotator(job)
    return _WORKER_CACHE[key](spec)


def limit_cv2_threads() -> None:
    """Follow Ray's one-thread-per-task setting in OpenCV too: its pool would oversubscribe CPUs."""
    import cv2

    if os.environ.get("OMP_NUM_THREADS"):
        cv2.setNumThreads(int(os.environ["OMP_NUM_THREADS"]))


def run_annotator(annotator: Annotator, batch: list[tuple[dict[str, Any], np.ndarray]]) -> list[Any]:
    """Maps for the batch; when the batch call fails, retry image by image to isolate the culprit."""
    images = [img for _, img in batch]
    ids = [row["id"] for row, _ in batch]
    try:
        maps = annotator.annotate(images, ids)
        return [_checked(m, img, annotator.name) for m, img in zip(maps, images, strict=True)]
    except Exception:
        if len(batch) == 1:
            return [_single(annotator, images[0], ids[0])]
    return [_single(annotator, img, i) for img, i in zip(images, ids)]


def _single(annotator: Annotator, image: np.ndarray, image_id: str) -> Any:
    try:
        return _checked(annotator.annotate([image], [image_id])[0], image, annotator.name)
    except Exception as exc:
        return exc


def _checked(result: Any, image: np.ndarray, name: str) -> Any:
    """A valid map, or the ``AnnotationSkipped`` an annotator returned for this image."""
    return result if isinstance(result, AnnotationSkipped) else check_map(result, image, name)


def empty_row(row_id: str, source: str, annotator_names: Sequence[str]) -> dict[str, Any]:
    """A row with only its keys set: status ok until something fails."""
    row: dict[str, Any] = {
        "id": row_id, "source": source, "caption": "", "image": None, "width": None, "height": None,
        "status": STATUS_OK, "error": None, "source_sha256": None, "orig_width": None, "orig_height": None,
    }
    row.update({cond_column(n): None for n in annotator_names})
    return row


def mark(row: dict[str, Any], status: str, reason: str) -> None:
    """Record a failure: the row keeps its provenance but drops half-made images."""
    row["status"] = status
    row["error"] = reason
    row["image"] = None
    row["width"] = row["height"] = None
    for key in row:
        if key.startswith("cond_"):
            row[key] = None


def describe(exc: BaseException) -> str:
    """A one-line reason: the message, or the exception type when it has none."""
    text = " ".join(str(exc).split())
    # Object reprs carry memory addresses ("<_io.BytesIO object at 0x7f...>"): drop them so the
    # same input gives the same reason on every run.
    text = _ADDRESS.sub("", text)
    return text or type(exc).__name__


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
