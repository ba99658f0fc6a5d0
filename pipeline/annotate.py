#!/usr/bin/env python
"""Annotate an image collection into a ControlNet training manifest, with Ray.

    python pipeline/annotate.py --input photos/ --output data/manifests/photos --annotators canny
    ray job submit --working-dir . -- python pipeline/annotate.py --input s3://bucket/photos ...

Reads top to bottom: parse flags -> stream the listing -> plan shards into small plan files
(skipping finished ones) -> start Ray -> annotate shards in stages (pipeline/dispatch.py) -> write
``_manifest.json`` from the shards' stats files -> print a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import dataclasses
import itertools
import logging
import time
import uuid
from typing import Any, Iterator, Sequence

import pyarrow.fs as pafs
from tqdm import tqdm

from annotators import registry
from captioners import registry as caption_registry
from manifests import duplicates
from manifests.duplicates import DEFAULT_MAX_DISTANCE
from manifests.io import resolve
from manifests.schema import SCHEMA_VERSION, shard_name
from manifests.sink import ExistingShards, ManifestSink
from pipeline import dispatch, output_lock, ray_runtime
from pipeline.config import AnnotateConfig, fingerprint
from pipeline.plan import PLAN_DIR, Plan, plan_shards, remove_plans, run_plan_dir
from pipeline.reader import IMAGE_EXTENSIONS, InputItem, ListingStats, iter_input_list, iter_inputs
from pipeline.shard import ShardJob

log = logging.getLogger("annotate")


#: What the driver (not the sink) keeps in the output: the lock, its takeover file, the plan folders.
DRIVER_FILES = (output_lock.LOCK_NAME, output_lock.LOCK_NAME + ".takeover", PLAN_DIR)


class ResumeConflict(RuntimeError):
    """The output folder holds shards written with other settings."""


class ShardFailures(RuntimeError):
    """Some shards' tasks failed; the manifest is left without ``_manifest.json``."""


def parse_args(argv: Sequence[str] | None = None) -> AnnotateConfig:
    """Flags -> a checked ``AnnotateConfig``; a bad flag exits with a message saying what to do."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=None,
                   help="folder or URI of the raw images (recursive); with --input-list, the root of its relative entries")
    p.add_argument("--input-list", default=None, metavar="FILE",
                   help="Parquet, CSV or text file of image paths or URIs (one per row, optional caption column), "
                        "instead of listing --input")
    p.add_argument("--output", required=True, help="folder or URI to write the manifest to")
    p.add_argument("--annotators", default="canny",
                   help=f"comma-separated names; known: {', '.join(registry.available())}")
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="annotator parameter, e.g. -p canny.low=50 (repeatable)")
    p.add_argument("--captioner", default=None,
                   help="caption rows with a model: blip, florence2, vlm (or package.module:Class); -p NAME.KEY=VALUE "
                        "sets its parameters, e.g. -p vlm.prompt=\"Describe the image in one sentence.\"")
    p.add_argument("--caption-policy", default="missing", choices=("missing", "always", "prefix"),
                   help="missing: caption rows without a given caption; always: every row; prefix: every row, "
                        "after --caption-prefix")
    p.add_argument("--caption-prefix", default="", help="text put before every generated caption (a trigger phrase)")
    p.add_argument("--max-caption-chars", type=int, default=AnnotateConfig.max_caption_chars,
                   help="cut longer captions to this many characters (recorded in caption_original_length)")
    p.add_argument("--resolution", type=int, default=512, help="shortest side in pixels, multiple of 8")
    p.add_argument("--center-crop", action="store_true", help="crop to resolution x resolution")
    p.add_argument("--min-side", type=int, default=0, help="mark smaller images as filtered (0: upscale all)")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="reject images above this many pixels")
    p.add_argument("--max-aspect", type=float, default=4.0,
                   help="mark images longer than this ratio of long to short side as filtered")
    p.add_argument("--min-aspect", type=float, default=None,
                   help="mark images whose width / height is below this as filtered (e.g. 1: landscape and square only)")
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
    p.add_argument("--near-duplicate-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help="perceptual-hash bits (of 64) within which images are near duplicates; 0: identical only")
    p.add_argument("--max-shard-retries", type=int, default=2,
                   help="resubmit a shard whose task or actor failed this many times before reporting it")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray (default: all)")
    args = p.parse_args(argv)
    try:
        names = tuple(n.strip() for n in args.annotators.split(",") if n.strip())
        for name in names:
            registry.get(name)
        params = _parse_params(args.param)
        captioner_params = params.pop(args.captioner, {}) if args.captioner else {}
        if args.captioner:
            caption_registry.parse_params(caption_registry.get(args.captioner), captioner_params)
        config = AnnotateConfig(
            input=args.input, input_list=args.input_list, output=args.output, annotators=names,
            annotator_params=params, resolution=args.resolution, captioner=args.captioner,
            captioner_params=captioner_params, caption_policy=args.caption_policy, caption_prefix=args.caption_prefix,
            max_caption_chars=args.max_caption_chars,
            center_crop=args.center_crop, min_side=args.min_side, max_pixels=args.max_pixels, max_aspect=args.max_aspect,
            min_aspect=args.min_aspect,
            image_format=args.image_format, jpeg_quality=args.jpeg_quality, shard_size=args.shard_size,
            batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
            weights_dir=args.weights_dir, require_detection=args.require_detection,
            concurrency=args.concurrency, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, address=args.address, num_cpus=args.num_cpus,
            max_shard_retries=args.max_shard_retries, near_duplicate_distance=args.near_duplicate_distance,
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
    captioner = None
    if config.captioner is not None:
        captioner = caption_registry.create(config.captioner, config.captioner_params, config.weights_dir)
        captioner.locate_weights()  # a missing model folder stops here, naming it and where to get it
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "settings": config.output_settings(),
        "annotators": [a.provenance() for a in annotators],
        "captioner": captioner.provenance() if captioner else None,
    }
    provenance["settings_fingerprint"] = fingerprint(
        {"settings": provenance["settings"], "params": [a.params.to_dict() for a in annotators],
         **({"captioner": dataclasses.asdict(captioner.params)} if captioner else {})}
    )
    sink = ManifestSink(config.output, names, provenance)
    return ShardJob(
        input=config.input, prepare=config.prepare_settings(), image_format=config.image_format,
        jpeg_quality=config.jpeg_quality, annotators=tuple((n, overrides[n]) for n in config.annotators),
        batch_size=config.batch_size, sink=sink, weights_dir=config.weights_dir,
        captioner=(config.captioner, dict(config.captioner_params)) if config.captioner else None,
        caption_policy=config.caption_policy, caption_prefix=config.caption_prefix,
        max_caption_chars=config.max_caption_chars,
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


def stream_inputs(config: AnnotateConfig, stats: ListingStats) -> Iterator[InputItem]:
    """The input files as a stream in their order (sorted for a folder, as given for a list),
    cut at ``--limit``; fails here, before any work, when there is no image at all."""
    if config.input_list is not None:
        items = iter_input_list(config.input_list, config.input, stats)
    else:
        items = iter_inputs(config.input, stats)
    items = itertools.islice(items, config.limit)
    first = next(items, None)
    if first is None:
        where = config.input_list or config.input
        raise FileNotFoundError(f"no images found under {where} ({stats.ignored} other files); images are "
                                f"files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return itertools.chain([first], items)


def check_output(config: AnnotateConfig, existing: ExistingShards, settings_fp: str) -> None:
    """Refuse, changing nothing, an output holding files of others, or (without --overwrite)
    shards written with other settings or annotators."""
    if existing.foreign:
        shown = ", ".join(existing.foreign[:5]) + (f" and {len(existing.foreign) - 5} more"
                                                   if len(existing.foreign) > 5 else "")
        raise ResumeConflict(f"{config.output} holds files this project did not write ({shown}); nothing was "
                             "changed: choose an empty or new --output")
    other = sorted(shard_name(i, existing.digits) for i, s in existing.stats.items()
                   if not s.fingerprint.startswith(settings_fp))
    if other and not config.overwrite:
        raise ResumeConflict(
            f"{config.output} holds shards written with other settings or annotators ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); nothing was changed: pass --overwrite to redo them, or "
            "choose another --output"
        )


def check_no_rows_dropped(config: AnnotateConfig, existing: ExistingShards, plan: Plan) -> None:
    """Refuse (without --overwrite) a rerun that would keep fewer rows than the output holds, or
    leave shards past the end of the input behind."""
    beyond = [i for i in existing.paths if i >= plan.shards]
    if config.overwrite or (plan.rows >= existing.rows() and not beyond):
        return
    why = f"--limit {config.limit}" if config.limit is not None else "the input has fewer files than before"
    raise ResumeConflict(
        f"{config.output} holds {existing.rows()} rows and this run would keep {plan.rows} ({why}); nothing was "
        "changed: pass --overwrite to rewrite it with fewer rows, or choose another --output"
    )


def annotate_shards(job: ShardJob, todo: list, config: AnnotateConfig) -> tuple[float, list[str], list[str]]:
    """Annotate the shards on Ray with a progress bar (the stages and retries: pipeline/dispatch.py).

    A shard that still fails after ``--max-shard-retries`` resubmissions is reported and left
    unwritten; the same command again redoes it. Returns (seconds, failed-shard messages,
    sidecars that were not UTF-8).
    """
    uses_model = job.captioner is not None or any(registry.get(n).uses_model for n, _ in job.annotators)
    pool = (dispatch.pool_size(config.concurrency, config.gpus_per_worker, config.cpus_per_worker)
            if uses_model else None)
    failures: list[str] = []
    not_utf8: list[str] = []
    start = time.perf_counter()
    with tqdm(total=sum(s.rows for s in todo), unit="img", desc="annotate", file=sys.stderr) as bar:
        for result in dispatch.run_job(job, todo, uses_model, pool, config.max_shard_retries):
            if result.stat is None:
                failures.append(f"{shard_name(result.spec.index, job.sink.digits)} (failed {result.attempts} "
                                f"times): {result.error}")
                continue
            not_utf8.extend(result.stat.captions_not_utf8)
            bar.update(result.stat.rows)
            bar.set_postfix(error=result.stat.counts.get("error", 0), filtered=result.stat.counts.get("filtered", 0),
                            refresh=False)
    return time.perf_counter() - start, failures, sorted(not_utf8)


def find_duplicates(config: AnnotateConfig, wrote: bool) -> dict[str, Any]:
    """Duplicates across the whole manifest (kept shards included), as a side table; shards stay as
    written. A rerun that wrote nothing keeps the table when it was made with the same distance."""
    made = duplicates.read_summary(config.output)
    if not wrote and made and made.get("max_distance") == config.near_duplicate_distance:
        return {k: made[k] for k in ("exact", "near", "max_distance")}
    return duplicates.write_duplicates(config.output, config.near_duplicate_distance)


def run(config: AnnotateConfig) -> dict[str, Any]:
    """The whole job; returns the summary written to ``_manifest.json``."""
    started = time.perf_counter()
    listing = ListingStats()
    items = stream_inputs(config, listing)
    job = make_job(config)
    settings_fp = job.sink.provenance["settings_fingerprint"]
    check_writable(config.output)
    with output_lock.acquire(config.output) as lock:  # one run per output, before any change
        existing = job.sink.existing(also_ours=DRIVER_FILES)
        check_output(config, existing, settings_fp)
        remove_plans(config.output)  # plan folders of killed runs (this run holds the lock)
        try:
            is_done = (lambda index, fp: False) if config.overwrite else existing.done
            plan = plan_shards(items, config.shard_size, settings_fp, is_done, run_plan_dir(config.output))
            if listing.skipped_links:
                log.warning("skipped %d symlinked folders already listed through another path (loops or repeats): "
                            "%s", len(listing.skipped_links), ", ".join(listing.skipped_links[:5]))
            check_no_rows_dropped(config, existing, plan)
            # Every check passed: from here on the output changes.
            job.sink.on_write_start(existing, config.overwrite, writes=bool(plan.todo))
            ray_info = ray_runtime.connect(config.address, config.num_cpus)
            log.info("%d images in %d shards (%d done before)", plan.rows, plan.shards, len(plan.kept))
            work_s, not_utf8 = 0.0, []
            if plan.todo:
                work_s, failures, not_utf8 = annotate_shards(job, plan.todo, config)
                if failures:
                    error = ShardFailures(
                        f"{len(failures)} of {len(plan.todo)} shards failed (the others are written; run the "
                        "same command again to redo only these):\n  " + "\n  ".join(failures))
                    job.sink.on_write_failed(error)
                    raise error
        finally:
            remove_plans(config.output)
        done_rows = sum(s.rows for s in plan.todo)
        run_info = {
            "ray": ray_info, "shards_written": len(plan.todo), "shards_kept": len(plan.kept),
            "wall_s": round(time.perf_counter() - started, 3), "annotate_s": round(work_s, 3),
            "images_per_s": round(done_rows / work_s, 2) if work_s else None,
            "captions_not_utf8": not_utf8,
        }
        input_info = {"uri": config.input, "list": config.input_list, "images": plan.rows,
                      "ignored_files": listing.ignored, "skipped_links": listing.skipped_links}
        run_info["duplicates"] = find_duplicates(config, bool(plan.todo))
        summary = job.sink.summary(input_info, run_info)
        lock.check()  # a run that lost its lock never declares the manifest complete
        job.sink.on_write_complete(summary)
    return summary


def print_summary(summary: dict[str, Any], output: str) -> None:
    counts = summary["counts"]
    run_info = summary["run"]
    print(f"manifest: {output}  ({counts['rows']} rows: {counts['ok']} ok, "
          f"{counts['error']} error, {counts['filtered']} filtered)")
    if summary.get("captions_truncated"):
        print(f"  {summary['captions_truncated']} captions were longer than --max-caption-chars and were cut "
              "(their rows' caption_original_length says how long)")
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
