#!/usr/bin/env python
"""Annotate an image collection into a ControlNet training manifest, with Ray.

    python pipeline/annotate.py --input photos/ --output data/manifests/photos --annotators canny
    ray job submit --working-dir . -- python pipeline/annotate.py --input s3://bucket/photos ...

Reads top to bottom: parse flags -> list inputs -> plan shards (skipping finished ones) ->
start Ray -> annotate shards in parallel -> write ``_manifest.json`` -> print a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import dataclasses
import datetime
import logging
import time
import uuid
from typing import Any, Callable, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from annotators import registry
from manifests.io import (
    delete_quietly,
    join,
    list_shards,
    resolve,
    shard_provenance,
    shard_row_count,
    write_manifest_json,
)
from manifests.schema import MANIFEST_JSON, SCHEMA_VERSION, STATUSES, cond_column, shard_name
from pipeline import ray_runtime
from pipeline import dispatch, output_lock
from pipeline.config import AnnotateConfig, fingerprint
from pipeline.decode import PrepareSettings
from pipeline.reader import IMAGE_EXTENSIONS, InputListing, list_inputs
from pipeline.shard import ShardAnnotator, ShardJob, annotate_shard, shard_spec

log = logging.getLogger("annotate")


class ResumeConflict(RuntimeError):
    """The output folder holds shards written with other settings."""


class ShardFailures(RuntimeError):
    """Some shards' tasks failed; the manifest is left without ``_manifest.json``."""


def parse_args(argv: Sequence[str] | None = None) -> AnnotateConfig:
    """Flags -> a checked ``AnnotateConfig``; a bad flag exits with a message saying what to do."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder or URI of the raw images (recursive)")
    p.add_argument("--output", required=True, help="folder or URI to write the manifest to")
    p.add_argument("--annotators", default="canny",
                   help=f"comma-separated names; known: {', '.join(registry.available())}")
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="annotator parameter, e.g. -p canny.low=50 (repeatable)")
    p.add_argument("--resolution", type=int, default=512, help="shortest side in pixels, multiple of 8")
    p.add_argument("--center-crop", action="store_true", help="crop to resolution x resolution")
    p.add_argument("--min-side", type=int, default=0, help="mark smaller images as filtered (0: upscale all)")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="reject images above this many pixels")
    p.add_argument("--max-aspect", type=float, default=4.0,
                   help="mark images longer than this ratio of long to short side as filtered")
    p.add_argument("--image-format", default="jpeg", help="jpeg or png for the prepared image")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=256, help="files per shard (the unit of resume)")
    p.add_argument("--batch-size", type=int, default=16, help="images per annotator call")
    p.add_argument("--limit", type=int, default=None, help="only the first N files of the sorted input")
    p.add_argument("--overwrite", action="store_true", help="redo every shard")
    p.add_argument("--weights-dir", default=None,
                   help="folder laid out like lllyasviel/Annotators (or a hub id); default: $CONTROLFORGE_WEIGHTS")
    p.add_argument("--require-detection", action="store_true",
                   help="pose/face/person annotators mark images where they find nothing as filtered")
    p.add_argument("--concurrency", type=int, default=None, help="model-annotator workers (default: per GPU or CPU)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per model worker (default: 1 if any, else 0)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--max-shard-retries", type=int, default=2,
                   help="resubmit a shard whose task or actor failed this many times before reporting it")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray (default: all)")
    args = p.parse_args(argv)
    try:
        names = tuple(n.strip() for n in args.annotators.split(",") if n.strip())
        for name in names:
            registry.get(name)
        config = AnnotateConfig(
            input=args.input, output=args.output, annotators=names,
            annotator_params=_parse_params(args.param), resolution=args.resolution,
            center_crop=args.center_crop, min_side=args.min_side, max_pixels=args.max_pixels, max_aspect=args.max_aspect,
            image_format=args.image_format, jpeg_quality=args.jpeg_quality, shard_size=args.shard_size,
            batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
            weights_dir=args.weights_dir, require_detection=args.require_detection,
            concurrency=args.concurrency, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, address=args.address, num_cpus=args.num_cpus,
            max_shard_retries=args.max_shard_retries,
        )
        for name in config.annotators:  # parameter names and values, checked before any work
            registry.parse_params(registry.get(name), config.annotator_params.get(name, {}))
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    return config


def _parse_params(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["canny.low=50"]`` -> ``{"canny": {"low": "50"}}``."""
    params: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, field = key.rpartition(".")
        if not (eq and dot and name and field):
            raise ValueError(f"--param {item!r}: write NAME.KEY=VALUE, e.g. canny.low=50")
        params[name][field] = value
    return dict(params)


def annotator_overrides(config: AnnotateConfig, name: str) -> dict[str, Any]:
    """An annotator's parameters from the flags, with ``--require-detection`` where it applies."""
    overrides = dict(config.annotator_params.get(name, {}))
    fields = {f.name for f in dataclasses.fields(registry.get(name).Params)}
    if config.require_detection and "require_detection" in fields:
        overrides.setdefault("require_detection", True)
    return overrides


def make_job(config: AnnotateConfig) -> ShardJob:
    """The worker-side description of the job, with provenance recorded in every shard.

    Every weight file is located (and hashed) here, so a missing one stops the job before
    Ray starts, with a message naming the file and where to get it.
    """
    overrides = {n: annotator_overrides(config, n) for n in config.annotators}
    annotators = [registry.create(n, overrides[n], config.weights_dir) for n in config.annotators]
    names = [a.name for a in annotators]
    if len(set(names)) != len(names):
        raise ValueError(f"two annotators write the same column: {names}")
    for annotator in annotators:
        annotator.locate_weights()
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "settings": config.output_settings(),
        "annotators": [a.provenance() for a in annotators],
    }
    provenance["settings_fingerprint"] = fingerprint(
        {"settings": provenance["settings"], "params": [a.params.to_dict() for a in annotators]}
    )
    return ShardJob(
        input=config.input, output=config.output,
        prepare=PrepareSettings(config.resolution, config.center_crop, config.min_side, config.max_pixels,
                                config.max_aspect),
        image_format=config.image_format, jpeg_quality=config.jpeg_quality,
        annotators=tuple((n, overrides[n]) for n in config.annotators),
        batch_size=config.batch_size, provenance=provenance, weights_dir=config.weights_dir,
    )


def check_writable(output: str) -> None:
    """Fail before any work (and before Ray) when the output cannot take a manifest."""
    fs, base = resolve(output)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise ValueError(f"--output {output} is a file; give a folder (new or holding a manifest)")
    probe = f"{base}/.tmp-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        raise ValueError(f"--output {output} is not writable ({type(exc).__name__}: {exc}); choose a folder "
                         "you can write to") from exc


def plan_shards(config: AnnotateConfig, listing: InputListing, job: ShardJob) -> tuple[list[dict], list[int]]:
    """Split the sorted input into fixed slices; return (shards to do, indices already done).

    A complete shard from an earlier run with the same settings and the same files is kept;
    one whose files changed is redone. Every check runs before anything is deleted, so a refused
    run leaves the output exactly as it was: shards written with other settings, files this project
    did not write, or a rerun that would drop rows (a shrunk input, ``--limit``) stop the job unless
    ``--overwrite`` allows it (files of others are never touched).
    """
    items = listing.items
    size = config.shard_size
    settings_fp = job.provenance["settings_fingerprint"]
    specs = [shard_spec(i, items[s:s + size], settings_fp) for i, s in enumerate(range(0, len(items), size))]
    fs, base = resolve(config.output)
    existing = {Path(p).name: p for p in list_shards(config.output)}
    provenance = {name: shard_provenance(path) for name, path in existing.items()}  # one footer read each
    refuse_foreign_files(config.output, provenance)
    stored = {name: p or {} for name, p in provenance.items()}
    if not config.overwrite:
        check_resumable(config, specs, stored, existing, settings_fp)
    # Every check passed: from here on the output changes.
    delete_quietly(fs, join(base, MANIFEST_JSON))  # present only while the manifest is complete
    remove_stale_temp_files(config.output)
    if config.overwrite:
        for path in existing.values():
            fs.delete_file(path)
        return specs, []
    todo, done = [], []
    for spec in specs:
        fingerprint_stored = stored.get(shard_name(spec["shard"]), {}).get("fingerprint")
        (done if fingerprint_stored == spec["fingerprint"] else todo).append(spec)
    return todo, [s["shard"] for s in done]


def refuse_foreign_files(output: str, shards: dict[str, dict | None]) -> None:
    """Stop when the output holds files this project did not write (it never deletes those);
    ``shards`` maps each shard's name to its provenance (None: not written by this project)."""
    fs, base = resolve(output)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except FileNotFoundError:
        return
    ours = {MANIFEST_JSON, output_lock.LOCK_NAME, output_lock.LOCK_NAME + ".takeover", *shards}
    foreign = sorted(i.base_name for i in infos
                     if i.base_name not in ours and not i.base_name.startswith(".tmp-"))
    foreign += sorted(name for name, provenance in shards.items() if provenance is None)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ResumeConflict(f"{output} holds files this project did not write ({shown}); nothing was changed: "
                             "choose an empty or new --output")


def check_resumable(config: AnnotateConfig, specs: list[dict], stored: dict[str, dict], existing: dict[str, str],
                    settings_fp: str) -> None:
    """Refuse (changing nothing) a rerun that would mix settings or drop rows without --overwrite."""
    other = sorted(n for n, p in stored.items() if not p.get("fingerprint", "").startswith(settings_fp))
    if other:
        raise ResumeConflict(
            f"{config.output} holds shards written with other settings or annotators ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); nothing was changed: pass --overwrite to redo them, or "
            "choose another --output"
        )
    rows_now = sum(shard_row_count(p) for p in existing.values())
    rows_planned = sum(len(s["ids"]) for s in specs)
    if rows_planned < rows_now:
        why = f"--limit {config.limit}" if config.limit is not None else "the input has fewer files than before"
        raise ResumeConflict(
            f"{config.output} holds {rows_now} rows and this run would keep {rows_planned} ({why}); nothing was "
            "changed: pass --overwrite to rewrite it with fewer rows, or choose another --output"
        )


def remove_stale_temp_files(output: str) -> None:
    """Delete the temp files of writes that were killed mid-way (safe: this run holds the lock)."""
    fs, base = resolve(output)
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
             if i.base_name.startswith(".tmp-") and not i.base_name.endswith("-lock")
             and i.type == pafs.FileType.File]
    for path in stale:
        fs.delete_file(path)
    if stale:
        log.info("removed %d temp files left by an interrupted run", len(stale))


def annotate_shards(job: ShardJob, todo: list[dict], total_rows: int,
                    config: AnnotateConfig) -> tuple[float, list[str], list[str]]:
    """Annotate the shards on Ray with a progress bar.

    CPU-only annotators run as one task per shard; model annotators run in a pool of actors
    that load their weights once (on a GPU each when there are GPUs), each given the next shard as
    soon as it is free (pipeline/dispatch.py). A shard that still fails after
    ``--max-shard-retries`` resubmissions is reported and left unwritten; the same command again
    redoes it. Returns (seconds, failed-shard messages, sidecars that were not UTF-8).
    """
    import ray

    uses_model = any(registry.get(n).uses_model for n, _ in job.annotators)
    if uses_model:
        factory, size = _actor_pool(job, config)
        results = dispatch.run_on_actors(factory, size, todo, config.max_shard_retries)
    else:
        task = ray.remote(num_cpus=1, max_retries=0)(annotate_shard)  # retries are the dispatcher's
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        results = dispatch.run_as_tasks(task, ray.put(job), todo, window, config.max_shard_retries)
    failures: list[str] = []
    not_utf8: list[str] = []
    start = time.perf_counter()
    with tqdm(total=total_rows, unit="img", desc="annotate", file=sys.stderr) as bar:
        for result in results:
            if result.stat is None:
                failures.append(f"{shard_name(result.spec['shard'])} (failed {result.attempts} times): "
                                f"{result.error}")
                continue
            not_utf8.extend(result.stat.get("captions_not_utf8", []))
            bar.update(result.stat["rows"])
            bar.set_postfix(error=result.stat["error"], filtered=result.stat["filtered"], refresh=False)
    return time.perf_counter() - start, failures, sorted(not_utf8)


def _actor_pool(job: ShardJob, config: AnnotateConfig) -> tuple[Callable[[], Any], int]:
    """(a factory of ShardAnnotator actors, how many): ``--concurrency``, else one per GPU or CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = config.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if config.concurrency is not None:
        size = config.concurrency
    elif gpus > 0:
        size = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        size = max(1, int(resources.get("CPU", 1) // config.cpus_per_worker))
    if size * config.cpus_per_worker > resources.get("CPU", 0) or size * gpus > resources.get("GPU", 0):
        log.warning("%d workers x (%d CPU, %g GPU) exceed the cluster's %s CPU / %s GPU: the extra workers wait "
                    "for an autoscaler to add nodes", size, config.cpus_per_worker, gpus,
                    resources.get("CPU", 0), resources.get("GPU", 0))
    # A crashed actor restarts (reloading its weights); the dispatcher resubmits its shard.
    actor_cls = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=gpus, max_restarts=-1,
                           max_task_retries=0)(ShardAnnotator)
    return (lambda: actor_cls.remote(job)), size


def summarize(config: AnnotateConfig, listing: InputListing, job: ShardJob, run: dict[str, Any]) -> dict[str, Any]:
    """The ``_manifest.json`` content: counts are read back from the shards on disk."""
    fs, _ = resolve(config.output)
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    shards = []
    for path in list_shards(config.output):
        table = pq.read_table(path, columns=["status", "error"], filesystem=fs)
        statuses = table["status"].to_pylist()
        counts.update(statuses)
        reasons.update(e.split(":")[0] for e in table["error"].to_pylist() if e)
        shards.append({"name": Path(path).name, "rows": table.num_rows})
    rows = sum(s["rows"] for s in shards)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"uri": config.input, "images": len(listing.items), "ignored_files": listing.ignored,
                  "skipped_links": listing.skipped_links},
        "settings": job.provenance["settings"],
        "settings_fingerprint": job.provenance["settings_fingerprint"],
        "annotators": job.provenance["annotators"],
        "columns": ["image", *[cond_column(a["name"]) for a in job.provenance["annotators"]]],
        "counts": {"rows": rows, **{s: counts.get(s, 0) for s in STATUSES}},
        "error_reasons": dict(reasons.most_common()),
        "shards": shards,
        "run": run,
    }


def run(config: AnnotateConfig) -> dict[str, Any]:
    """The whole job; returns the summary written to ``_manifest.json``."""
    started = time.perf_counter()
    listing = list_inputs(config.input)
    if listing.skipped_links:
        log.warning("skipped %d symlinked folders already listed through another path (loops or repeats): %s",
                    len(listing.skipped_links), ", ".join(listing.skipped_links[:5]))
    if not listing.items:
        raise FileNotFoundError(f"no images found under {config.input} ({listing.ignored} other files); images are "
                                f"files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}")
    if config.limit is not None:
        listing.items = listing.items[: config.limit]
    job = make_job(config)
    check_writable(config.output)
    with output_lock.acquire(config.output) as lock:  # one run per output, before any change
        todo, done = plan_shards(config, listing, job)
        ray_info = ray_runtime.connect(config.address, config.num_cpus)
        log.info("%d images in %d shards (%d done before)", len(listing.items), len(todo) + len(done), len(done))
        work_s, not_utf8 = 0.0, []
        if todo:
            work_s, failures, not_utf8 = annotate_shards(job, todo, sum(len(s["ids"]) for s in todo), config)
            if failures:
                raise ShardFailures(
                    f"{len(failures)} of {len(todo)} shards failed (the others are written; run the "
                    "same command again to redo only these):\n  " + "\n  ".join(failures)
                )
        done_rows = sum(len(s["ids"]) for s in todo)
        run_info = {
            "ray": ray_info, "shards_written": len(todo), "shards_kept": len(done),
            "wall_s": round(time.perf_counter() - started, 3), "annotate_s": round(work_s, 3),
            "images_per_s": round(done_rows / work_s, 2) if work_s else None,
            "captions_not_utf8": not_utf8,
        }
        summary = summarize(config, listing, job, run_info)
        lock.check()  # a run that lost its lock never declares the manifest complete
        write_manifest_json(config.output, summary)
    return summary


def print_summary(summary: dict[str, Any], output: str) -> None:
    counts = summary["counts"]
    run_info = summary["run"]
    print(f"manifest: {output}  ({counts['rows']} rows: {counts['ok']} ok, "
          f"{counts['error']} error, {counts['filtered']} filtered)")
    if summary["error_reasons"]:
        print("  not ok by reason: " + ", ".join(f"{k}={v}" for k, v in summary["error_reasons"].items()))
    if run_info.get("captions_not_utf8"):
        shown = run_info["captions_not_utf8"]
        print(f"  {len(shown)} caption files were not UTF-8 and were decoded as a legacy encoding: "
              + ", ".join(shown[:5]) + (" ..." if len(shown) > 5 else ""))
    if summary["input"].get("skipped_links"):
        print(f"  {len(summary['input']['skipped_links'])} symlinked folders skipped (already listed through "
              "another path)")
    speed = run_info["images_per_s"]
    print(f"  shards: {run_info['shards_written']} written, {run_info['shards_kept']} kept from an earlier run; "
          f"{speed if speed is not None else '-'} images/s; wall {run_info['wall_s']} s")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    ray_was_running = ray_runtime.is_running()
    try:
        summary = run(config)
    except (FileNotFoundError, ResumeConflict, ShardFailures, output_lock.OutputLocked, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not ray_was_running:  # leave a caller's Ray (a notebook, the tests) running
            ray_runtime.shutdown()
    print_summary(summary, config.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
