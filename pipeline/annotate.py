#!/usr/bin/env python
"""Annotate an image collection into a ControlNet training manifest, with Ray.

    python pipeline/annotate.py --input photos/ --output data/manifests/photos --annotators canny
    ray job submit --working-dir . -- python pipeline/annotate.py --input s3://bucket/photos ...

Reads top to bottom: parse flags -> stream the listing -> resolve the output once (every step below
writes through that location) -> plan shards into small plan files (skipping finished ones) -> start
Ray -> annotate shards in stages (pipeline/dispatch.py) -> the duplicates pass -> write
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

import pyarrow as pa
import pyarrow.fs as pafs
from tqdm import tqdm

from annotators import registry
from captioners import registry as caption_registry
from manifests import duplicates
from manifests.flags import DefaultsHelpFormatter, add_dataclass_flags, parsed_fields
from manifests.io import Location, locate, resolve
from manifests.schema import SCHEMA_VERSION, shard_name
from manifests.sink import ExistingShards, ManifestSink, ShardStats
from pipeline import dispatch, output_lock, ray_runtime
from pipeline.config import AnnotateConfig, fingerprint
from pipeline.decode import PrepareSettings
from pipeline.plan import PLAN_DIR, Plan, plan_shards, remove_plans, run_plan_dir
from pipeline.reader import IMAGE_EXTENSIONS, InputItem, ListingStats, iter_input_list, iter_inputs
from pipeline.shard import ShardJob

log = logging.getLogger("annotate")


#: What the driver (not the sink) keeps in the output: the lock, its takeover file, the plan folders.
DRIVER_FILES = (output_lock.LOCK_NAME, output_lock.LOCK_NAME + ".takeover", PLAN_DIR)


#: Rows each task of the duplicates pass reads (its shards' id, status, sha256 and hash: tens of MB).
DUPLICATE_ROWS_PER_TASK = 250_000


class ResumeConflict(RuntimeError):
    """The output folder holds shards written with other settings."""


class ShardFailures(RuntimeError):
    """Some shards' tasks failed; the manifest is left without ``_manifest.json``."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``AnnotateConfig`` field (help: its docstring; default: its default), plus ``-p``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    prepare = [f.name for f in dataclasses.fields(PrepareSettings)]
    job = [f.name for f in dataclasses.fields(AnnotateConfig) if f.name not in prepare]
    actions = add_dataclass_flags(p, AnnotateConfig, dashes=True, names=job)
    actions["annotators"].help = actions["annotators"].help.rstrip(".") + f"; known: {', '.join(registry.available())}"
    # -p fills two fields (annotator and captioner parameters), so it is the one flag written here
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="annotator or captioner parameter, e.g. -p canny.low=50 (repeatable)")
    add_dataclass_flags(p.add_argument_group("image preparation"), AnnotateConfig, dashes=True, names=prepare)
    return p


def parse_args(argv: Sequence[str] | None = None) -> AnnotateConfig:
    """Flags -> a checked ``AnnotateConfig``; a bad flag exits with a message saying what to do."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        values = parsed_fields(args, AnnotateConfig)
        for name in values["annotators"]:
            registry.get(name)
        params = _parse_params(args.param)
        captioner = values["captioner"]
        captioner_params = params.pop(captioner, {}) if captioner else {}
        if captioner:
            caption_registry.parse_params(caption_registry.get(captioner), captioner_params)
        config = AnnotateConfig(**values, annotator_params=params, captioner_params=captioner_params)
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


def make_job(config: AnnotateConfig, output: Location | None = None) -> ShardJob:
    """The worker-side description of the job, with provenance recorded in every shard; its sink writes
    to ``output`` (``config.output`` resolved; resolved here when not given).

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
    sink = ManifestSink(locate(output or config.output), names, provenance)
    return ShardJob(
        input=config.input, prepare=config.prepare_settings(), image_format=config.image_format,
        jpeg_quality=config.jpeg_quality, annotators=tuple((n, overrides[n]) for n in config.annotators),
        batch_size=config.batch_size, sink=sink, weights_dir=config.weights_dir,
        captioner=(config.captioner, dict(config.captioner_params)) if config.captioner else None,
        caption_policy=config.caption_policy, caption_prefix=config.caption_prefix,
        max_caption_chars=config.max_caption_chars,
    )


def check_writable(output: str | Location) -> None:
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
    if existing.unreadable and not config.overwrite:
        index, why = min(existing.unreadable.items())
        more = f" (and {len(existing.unreadable) - 1} more)" if len(existing.unreadable) > 1 else ""
        raise ResumeConflict(
            f"{config.output}: shard {shard_name(index, existing.digits)}{more} has no stats file and does not read "
            f"as a shard ({why}); nothing was changed: delete it (a rerun redoes only it), or pass --overwrite")
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


def annotate_shards(job: ShardJob, todo: list, config: AnnotateConfig
                    ) -> tuple[float, list[str], list[str], dict[int, ShardStats]]:
    """Annotate the shards on Ray with a progress bar (the stages and retries: pipeline/dispatch.py).

    A shard that still fails after ``--max-shard-retries`` resubmissions is reported and left
    unwritten; the same command again redoes it. Returns (seconds, failed-shard messages,
    sidecars that were not UTF-8, the written shards' stats by index).
    """
    uses_model = job.captioner is not None or any(registry.get(n).uses_model for n, _ in job.annotators)
    pool = (dispatch.pool_size(config.concurrency, config.gpus_per_worker, config.cpus_per_worker)
            if uses_model else None)
    failures: list[str] = []
    not_utf8: list[str] = []
    written: dict[int, ShardStats] = {}
    start = time.perf_counter()
    with tqdm(total=sum(s.rows for s in todo), unit="img", desc="annotate", file=sys.stderr) as bar:
        for result in dispatch.run_job(job, todo, uses_model, pool, config.max_shard_retries):
            if result.stat is None:
                failures.append(f"{shard_name(result.spec.index, job.sink.digits)} (failed {result.attempts} "
                                f"times): {result.error}")
                continue
            not_utf8.extend(result.stat.captions_not_utf8)
            written[result.spec.index] = result.stat
            bar.update(result.stat.rows)
            bar.set_postfix(error=result.stat.counts.get("error", 0), filtered=result.stat.counts.get("filtered", 0),
                            refresh=False)
    return time.perf_counter() - start, failures, sorted(not_utf8), written


def shards_digest(stats: dict[int, ShardStats]) -> str:
    """What a duplicates table is computed from: every shard's index, fingerprint, rows, counts and
    write time (from the stats files), so a shard that was redone or changed gives another digest."""
    return fingerprint([[i, s.fingerprint, s.rows, s.counts, s.seconds] for i, s in sorted(stats.items())])


def run_duplicates_pass(config: AnnotateConfig, output: Location, source: str) -> dict[str, Any]:
    """Duplicates across the whole manifest (kept shards included), as a side table made by Ray tasks
    (pipeline/dispatch.py); shards stay as written. Call only when ``duplicates_up_to_date`` is None."""
    return duplicates.write_duplicates(output, config.near_duplicate_distance, computed_from=source,
                                       run_tasks=dispatch.run_tasks,
                                       shards_per_task=max(1, DUPLICATE_ROWS_PER_TASK // config.shard_size))


def duplicates_up_to_date(config: AnnotateConfig, output: Location, source: str) -> dict[str, Any] | None:
    """The counts of the existing duplicates table when it was made from these shards (``source``)
    with this distance, else None (the pass must run). A table that does not read (cut short, not
    Parquet) is made again, as before the pass could be skipped, rather than blocking every rerun."""
    try:
        made = duplicates.read_summary(output)
    except (OSError, pa.ArrowException, ValueError) as exc:
        log.warning("duplicates: the table at %s does not read (%s); making it again", output,
                    " ".join(str(exc).split()))
        return None
    if made and made.get("max_distance") == config.near_duplicate_distance and made.get("computed_from") == source:
        return {k: made[k] for k in ("exact", "near", "max_distance")}
    return None


@dataclasses.dataclass
class Annotated:
    """What the annotate step of one run did: its plan, the shards it wrote, where Ray ran, timings."""

    plan: Plan
    plan_s: float
    """Listing and planning (the lock taken, the output checked, the plan files written)."""
    ray: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "not started", "address": None})
    work_s: float = 0.0
    not_utf8: list[str] = dataclasses.field(default_factory=list)
    written: dict[int, ShardStats] = dataclasses.field(default_factory=dict)


def plan_run(config: AnnotateConfig, job: ShardJob, items: Iterator[InputItem], existing: ExistingShards,
             listing: ListingStats, output: Location, planning: float) -> Annotated:
    """Cut the listing into shards (plan files for those not done yet) and refuse a rerun that would
    drop rows; then, every check passed, make the output ready for this run's shards."""
    is_done = (lambda index, fp: False) if config.overwrite else existing.done
    plan = plan_shards(items, config.shard_size, job.sink.provenance["settings_fingerprint"], is_done,
                       run_plan_dir(output))
    plan_s = time.perf_counter() - planning
    log.info("listing and planning took %.1f s: %d images in %d shards (%d done before)",
             plan_s, plan.rows, plan.shards, len(plan.kept))
    if listing.skipped_links:
        log.warning("skipped %d symlinked folders already listed through another path (loops or repeats): "
                    "%s", len(listing.skipped_links), ", ".join(listing.skipped_links[:5]))
    check_no_rows_dropped(config, existing, plan)
    # Every check passed: from here on the output changes.
    job.sink.on_write_start(existing, config.overwrite, writes=bool(plan.todo))
    return Annotated(plan, plan_s)


def annotate_planned(config: AnnotateConfig, job: ShardJob, done: Annotated) -> None:
    """Start Ray and annotate the planned shards, if any (a rerun of a complete manifest starts nothing)."""
    todo = done.plan.todo
    if not todo:
        return
    done.ray = ray_runtime.connect(config.address, config.num_cpus)
    done.work_s, failures, done.not_utf8, done.written = annotate_shards(job, todo, config)
    if failures:
        error = ShardFailures(
            f"{len(failures)} of {len(todo)} shards failed (the others are written; run the "
            "same command again to redo only these):\n  " + "\n  ".join(failures))
        job.sink.on_write_failed(error)
        raise error


def find_or_keep_duplicates(config: AnnotateConfig, output: Location, source: str,
                            run_info: dict[str, Any]) -> dict[str, Any]:
    """The duplicates table's counts: kept when made from these shards, else made again (on Ray, which
    starts here when no shard needed it); records the pass's time in ``run_info``."""
    found = duplicates_up_to_date(config, output, source)
    if found is not None:
        log.info("duplicates: kept the table made from these shards (no shard changed)")
        return found
    if run_info["ray"]["mode"] == "not started":
        run_info["ray"] = ray_runtime.connect(config.address, config.num_cpus)
    duplicates_start = time.perf_counter()
    found = run_duplicates_pass(config, output, source)
    run_info["duplicates_s"] = round(time.perf_counter() - duplicates_start, 3)
    return found


def run_record(config: AnnotateConfig, done: Annotated, listing: ListingStats) -> tuple[dict, dict]:
    """The ``input`` and ``run`` parts of the summary (``wall_s`` is filled in last)."""
    plan = done.plan
    done_rows = sum(s.rows for s in plan.todo)
    run_info = {
        "ray": done.ray, "shards_written": len(plan.todo), "shards_kept": len(plan.kept),
        "wall_s": None, "plan_s": round(done.plan_s, 3), "annotate_s": round(done.work_s, 3),
        "images_per_s": round(done_rows / done.work_s, 2) if done.work_s else None,
        "captions_not_utf8": done.not_utf8,
    }
    input_info = {"uri": config.input, "list": config.input_list, "images": plan.rows,
                  "ignored_files": listing.ignored, "skipped_links": listing.skipped_links}
    return input_info, run_info


def run(config: AnnotateConfig) -> dict[str, Any]:
    """The whole job; returns the summary written to ``_manifest.json``."""
    started = time.perf_counter()
    listing = ListingStats()
    items = stream_inputs(config, listing)
    output = locate(config.output)  # once per run: on S3 each resolve builds a new filesystem client
    job = make_job(config, output)
    check_writable(output)
    with output_lock.acquire(output) as lock:  # one run per output, before any change
        planning = time.perf_counter()
        existing = job.sink.existing(also_ours=DRIVER_FILES)
        check_output(config, existing, job.sink.provenance["settings_fingerprint"])
        remove_plans(output)  # plan folders of killed runs (this run holds the lock)
        # Ray starts only when there is work for it (shards to annotate, or a duplicates pass to
        # redo): a rerun of a complete manifest decides "nothing to do" from the listing and the
        # stats files alone.
        try:
            done = plan_run(config, job, items, existing, listing, output, planning)
            annotate_planned(config, job, done)
        finally:
            remove_plans(output)
        input_info, run_info = run_record(config, done, listing)
        source = shards_digest({**{i: existing.stats[i] for i in done.plan.kept}, **done.written})
        run_info["duplicates"] = find_or_keep_duplicates(config, output, source, run_info)
        run_info["wall_s"] = round(time.perf_counter() - started, 3)
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
          f"{speed if speed is not None else '-'} images/s; listing and planning {run_info.get('plan_s', '-')} s; "
          f"wall {run_info['wall_s']} s")


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
