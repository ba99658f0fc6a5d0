#!/usr/bin/env python
"""Does the suite notice? Apply deliberate bugs, one at a time, to a copy of the project.

    python tests/mutation_check.py                 # every mutation, its targeted tests (~10 min)
    python tests/mutation_check.py --full          # every mutation, the whole suite each (hours)
    python tests/mutation_check.py --only flip     # mutations whose name contains "flip"
    python tests/mutation_check.py --only hostile: --only flip   # --only repeats: any of them
    python tests/mutation_check.py --list          # each mutation, whether its text is still there once, its tests

Each mutation is one textual edit that breaks a promise the README makes (the kinds of bug a
refactor introduces quietly). The copy is made from this checkout's files (tracked and untracked,
not ignored) in a temporary folder, so the working tree is never touched. A mutation is *caught*
when the tests exit non-zero. The unmutated copy runs first: a red baseline makes every result
meaningless, so it stops the check. Not part of `make test` (`make mutation-check`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    """The test files (or node ids) expected to catch it; ``--full`` runs everything instead."""
    timeout: int | None = None
    """Seconds per pytest run when the bug can make the tests hang (a timeout counts as caught)."""


HOSTILE = "tests/test_annotate_hostile_inputs.py"
STAGES = "tests/test_annotate_stages.py"
S3 = "tests/test_s3.py"
HOSTILE_LOCK_TESTS = tuple(f"{HOSTILE}::{name}" for name in (
    "test_a_second_run_on_a_locked_output_is_refused_naming_the_first",
    "test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message",
    "test_a_lock_from_another_host_is_stale_only_without_a_recent_heartbeat",
    "test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale",
    "test_releasing_a_lock_another_run_took_over_leaves_that_runs_lock",
    "test_a_run_refused_by_the_lock_leaves_the_live_runs_files_alone",
))

MUTATIONS = [
    Mutation("flip image but not its condition", "train/data.py",
             "self._prepare(decode_cell(row, cond_column(c), size), box, flip)",
             "self._prepare(decode_cell(row, cond_column(c), size), box, False)", ("tests/test_train_data.py",)),
    Mutation("stacked conditions in reverse order", "train/data.py",
             "cond = torch.cat([self._prepare(decode_cell(row, cond_column(c), size), box, flip) for c in self.conditions])",
             "cond = torch.cat([self._prepare(decode_cell(row, cond_column(c), size), box, flip) "
             "for c in reversed(self.conditions)])",
             ("tests/test_train_data.py",)),
    Mutation("annotators see a mirrored image", "pipeline/shard.py",  # ShardWorker.prepare
             "                images.append(image)\n",
             "                images.append(np.ascontiguousarray(image[:, ::-1]))\n",
             ("tests/test_annotate_job.py", "tests/test_annotate_flags.py")),
    Mutation("shard written straight to its final name", "manifests/io.py",
             'tmp = join(base, f".tmp-{uuid.uuid4().hex}-{name}")', "tmp = final",
             ("tests/test_manifest_io.py",)),
    Mutation("annotator parameters left out of the settings fingerprint", "pipeline/annotate.py",
             '"params": [a.params.to_dict() for a in annotators],', '"params": [],', ("tests/test_annotate_job.py",)),
    Mutation("flow matching: velocity target reversed", "train/flow.py",
             "noise.float() - latents.float())", "latents.float() - noise.float())",
             ("tests/test_train_flow_units.py", "tests/test_train_families.py")),
    Mutation("flow matching: the family's time shift dropped", "train/flow.py",
             "return shift * u / (1 + (shift - 1) * u)", "return u", ("tests/test_train_flow_units.py",)),
    Mutation("Flux: sequence length of unpacked latents in the shift", "train/families/flow.py",
             "tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)",
             "tokens = latents.shape[-2] * latents.shape[-1]", ("tests/test_train_flow_units.py",)),
    Mutation("cached condition latents: every example gets the first condition", "train/latents.py",
             "self.moments[torch.arange(self.moments.shape[0]), modes][:, None]", "self.moments[:, :1]",
             ("tests/test_train_families.py::test_cached_conditions_pick_each_examples_mode_and_sample_like_the_vae",)),
    Mutation("cached condition latents: maps encoded in [0, 1], not the VAE's [-1, 1]", "train/cache.py",
             "pixels = stacked.view(-1, 3, *stacked.shape[-2:]) * 2.0 - 1.0",
             "pixels = stacked.view(-1, 3, *stacked.shape[-2:])",
             ("tests/test_train_families.py::"
              "test_cached_condition_latents_train_the_same_flux_union_without_encoding_during_steps",)),
    Mutation("fp8 base: the Linear backward forgets the per-channel scale", "train/float8_base.py",
             "grad_x = grad.matmul(dequantise(weight, scale, grad.dtype)).to(ctx.x_dtype)",
             "grad_x = grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype)", ("tests/test_train_fp8_base.py",)),
    Mutation("fp8 base: a dtype cast of the model casts the float8 storage", "train/float8_base.py",
             "stored = {name: self._buffers.pop(name) for name in STORED}", "stored = {}",
             ("tests/test_train_fp8_base.py",)),
    Mutation("flow matching: SD3's shift not read from the base's scheduler", "train/families/flow.py",
             "return float(base.scheduler.config.shift)  # 3.0 for SD3/3.5", "return 1.0",
             ("tests/test_train_flow_units.py::test_the_sd3_loss_draws_its_sigmas_with_the_base_schedulers_shift",)),
    Mutation("Flux: ControlNet residuals routed in the repeating pattern, not the pipeline's interval one",
             "train/families/flow.py",
             "return_dict=False, controlnet_blocks_repeat=False,", "return_dict=False, controlnet_blocks_repeat=True,",
             ("tests/test_train_flow_units.py::"
              "test_flux_training_routes_controlnet_residuals_as_the_flux_controlnet_pipeline_does",)),
    Mutation("fp8 base: float8 range taken as 240 (e4m3fnuz) instead of e4m3fn's 448", "train/float8_base.py",
             "FLOAT8_MAX = 448.0", "FLOAT8_MAX = 240.0",
             ("tests/test_train_fp8_base.py::test_each_channels_largest_weight_lands_on_e4m3s_largest_value_and_"
              "small_weights_keep_their_precision",)),
    Mutation("per-row training randomness ignores the row", "train/data.py",
             "rng = _rng(self.seed, self.epoch, index)", "rng = _rng(self.seed, self.epoch, 0)",
             ("tests/test_train_data.py",)),
    Mutation("raw weights exported instead of the EMA weights", "train/loop.py",
             "run.ema.copy_to(trained_parameters(final))", "pass", ("tests/test_train.py::test_ema_run_exports_the_averaged_weights",)),
    Mutation("EXIF orientation ignored", "pipeline/decode.py",
             "ImageOps.exif_transpose(im, in_place=True)", "pass", ("tests/test_decode.py",)),
    Mutation("ControlNet outputs not zero at the start", "train/models.py",
             "controlnet.train()\n", "controlnet.train()\n    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight)\n",
             ("tests/test_train.py::test_zero_convolutions_make_the_start_exactly_the_base",)),
    Mutation("resume ignores --resolution", "pipeline/config.py",
             'keys = ("resolution", "center_crop",', 'keys = ("center_crop",', ("tests/test_annotate_job.py",)),
    Mutation("training randomness unseeded", "train/data.py",
             "return np.random.default_rng([seed, epoch, index])", "return np.random.default_rng()",
             ("tests/test_train_data.py",)),
    Mutation("random Canny thresholds unseeded", "annotators/canny.py",
             "rng = np.random.default_rng(image_seed(p.seed, image_id))", "rng = np.random.default_rng()",
             ("tests/test_canny_and_registry.py",)),
    Mutation("resume retrains the batches already trained", "train/loop.py",
             "sampler.set_epoch(epoch, skip_batches if epoch == first_epoch else 0)", "sampler.set_epoch(epoch, 0)",
             ("tests/test_train.py::test_resume_matches_an_uninterrupted_run",)),
    Mutation("--proportion_empty_prompts ignored", "train/data.py",
             'caption = "" if rng.random() < self.p_empty else cap_caption(',
             'caption = "" if rng.random() < 0.0 else cap_caption(', ("tests/test_train_data.py",)),
    Mutation("depth maps far = bright", "annotators/depth.py",
             "return (scaled * 255.0).clip(0, 255).astype(np.uint8)",
             "return ((1.0 - scaled) * 255.0).clip(0, 255).astype(np.uint8)", ("tests/test_model_annotators.py",)),
    Mutation("--jpeg-quality ignored", "pipeline/encode.py",
             'save(buf, "JPEG", quality=jpeg_quality,', 'save(buf, "JPEG", quality=95,',
             ("tests/test_annotate_flags.py",)),
    Mutation("--require-detection not passed to annotators", "pipeline/annotate.py",
             'overrides.setdefault("require_detection", True)', "pass", ("tests/test_annotate_models_job.py",)),
    Mutation("project packages not shipped to a joined cluster", "pipeline/ray_runtime.py",
             'runtime_env = None if in_ray_job() else {"py_modules": project_modules()}', "runtime_env = None",
             ("tests/test_ray_cluster.py",)),
    Mutation("--gradient_checkpointing ignored", "train/loop.py",
             "base.family.enable_gradient_checkpointing(controlnet)", "pass", ("tests/test_train.py",)),
    # Messy collections and one run per output (tests/test_annotate_hostile_inputs.py).
    Mutation("hostile: resume ignores file stamps (edits not noticed)", "pipeline/plan.py",  # slice_fingerprint
             "{item.source}\\t{item.stamp}", "{item.source}",
             (f"{HOSTILE}::test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption",)),
    Mutation("hostile: metadata captions left out of the stamp", "pipeline/reader.py",
             '    return hashlib.sha256(caption.encode()).hexdigest()[:16] if caption is not None else ""',
             '    return ""',
             (f"{HOSTILE}::test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption",
              f"{HOSTILE}::test_resume_redoes_the_shard_of_an_edited_metadata_caption")),
    Mutation("hostile: symlinked folders followed without the seen-set", "pipeline/reader.py",  # _LocalTree.enter
             "if key in self.seen or key in self.open or _under(real, self.listed_reals):", "if False:",
             # The two-links test fails at once; the loop test (run only if it passes) lists forever.
             (f"{HOSTILE}::test_two_links_to_one_folder_outside_the_input_list_it_once",
              f"{HOSTILE}::test_a_symlink_loop_lists_each_real_folder_once_and_counts_the_skips"),
             timeout=120),  # a loop then lists forever
    # The loop test no longer catches this one: a loop's link points into the input, which
    # ``listed_reals`` held from the start; only a second link to a folder outside does.
    Mutation("hostile: folders reached through links not remembered", "pipeline/reader.py",
             "            self.seen.add(key)\n            self.listed_reals.add(real)\n", "",
             (f"{HOSTILE}::test_two_links_to_one_folder_outside_the_input_list_it_once",), timeout=120),
    Mutation("hostile: sidecar extension matched case-sensitively", "pipeline/reader.py",
             "sidecars.setdefault((stem, ext.lower()), []).append((name, info))",
             "sidecars.setdefault((stem, ext), []).append((name, info))",
             (f"{HOSTILE}::test_a_sidecar_matches_its_image_whatever_the_case_of_its_extension",)),
    Mutation("hostile: legacy-encoded sidecars not decoded leniently", "pipeline/reader.py",
             'return strict("utf-8-sig"), None\n    except UnicodeDecodeError:\n        pass',
             'return strict("utf-8-sig"), None\n    except UnicodeDecodeError:\n        raise',
             (f"{HOSTILE}::test_a_legacy_encoded_sidecar_keeps_its_image_and_is_reported",)),
    Mutation("hostile: output lock never checked (acquire always succeeds)", "pipeline/output_lock.py",
             "os.link(tmp, path)", "open(path, 'w').write(open(tmp).read())", HOSTILE_LOCK_TESTS),
    Mutation("hostile: every held lock looks stale", "pipeline/output_lock.py",
             "why = stale_reason(held)", 'why = stale_reason(held) or "assumed gone"', HOSTILE_LOCK_TESTS),
    Mutation("hostile: a reused pid keeps a dead run's lock alive", "pipeline/output_lock.py",
             "return started_unix is None or created <= float(started_unix) + 1.0", "return True",
             HOSTILE_LOCK_TESTS),
    Mutation("hostile: release deletes a lock another run took over", "pipeline/output_lock.py",
             'if (read_lock(self.output) or {}).get("token") == self.owner["token"]:', "if True:",
             HOSTILE_LOCK_TESTS),
    # Planning, the checks and ``on_write_start`` (which deletes _manifest.json and temp files)
    # moved above the lock: a run the lock refuses has already changed the live run's output.
    Mutation("hostile: lock taken after planning (a refused run already changed the output)", "pipeline/annotate.py",
             "    with output_lock.acquire(output) as lock:  # one run per output, before any change\n"
             "        planning = time.perf_counter()\n"
             "        existing = job.sink.existing(also_ours=DRIVER_FILES)\n"
             "        check_output(config, existing, job.sink.provenance[\"settings_fingerprint\"])\n",
             "    existing = job.sink.existing(also_ours=DRIVER_FILES)\n"
             "    remove_plans(output)\n"
             "    job.sink.on_write_start(existing, config.overwrite)\n"
             "    check_output(config, existing, job.sink.provenance[\"settings_fingerprint\"])\n"
             "    with output_lock.acquire(output) as lock:  # one run per output, before any change\n"
             "        planning = time.perf_counter()\n",
             HOSTILE_LOCK_TESTS),
    Mutation("hostile: a stale lock removed without checking it is still the stale one", "pipeline/output_lock.py",
             'if (read_lock(output) or {}).get("token") != held.get("token"):', "if False:",
             (f"{HOSTILE}::test_runs_starting_at_once_get_one_lock",)),
    Mutation("hostile: a run that lost its lock still marks the manifest complete", "pipeline/annotate.py",
             "        lock.check()  # a run that lost its lock never declares the manifest complete\n", "",
             (f"{HOSTILE}::test_a_run_whose_lock_was_taken_over_does_not_mark_the_manifest_complete",)),
    Mutation("hostile: a FIFO named like an image is opened", "pipeline/reader.py",
             "        if S_ISREG(stat.st_mode):\n            return stat.st_size", "        if True:\n            return stat.st_size",
             (f"{HOSTILE}::test_a_fifo_named_like_an_image_or_a_sidecar_is_an_error_row_not_a_hang",), timeout=180),
    Mutation("hostile: stale temp files of a killed run left behind", "manifests/sink.py",  # on_write_start
             "        for path in stale:\n            delete_quietly(fs, path)\n", "",
             (f"{HOSTILE}::test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message",)),
    # Stages, plan and stats files, resume and the summary from stats (tests/test_annotate_stages.py).
    Mutation("stages: resume keeps a shard whose stats fingerprint differs from its plan", "manifests/sink.py",
             "return index in self.paths and stats is not None and stats.fingerprint == fingerprint",
             "return index in self.paths and stats is not None",
             (f"{STAGES}::test_a_shard_whose_stats_disagree_with_its_plan_is_redone",
              f"{HOSTILE}::test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption")),
    Mutation("stages: resume reads every shard's footer (stats files ignored)", "manifests/sink.py",  # existing
             "        stats = self._read_stats(fs, base, paths)\n        unstated",
             "        stats = {}\n        unstated",
             (f"{STAGES}::test_resume_and_summary_read_stats_files_not_shards",)),
    Mutation("stages: the summary re-reads every shard (stats files ignored)", "manifests/sink.py",  # summary
             "        stats = self._read_stats(fs, base, paths)\n        for index in sorted(",
             "        stats = {}\n        for index in sorted(",
             (f"{STAGES}::test_resume_and_summary_read_stats_files_not_shards",)),
    Mutation("stages: a failed shard is not retried", "pipeline/dispatch.py",
             "if flight.attempt <= max_retries:", "if False:",
             (f"{HOSTILE}::test_a_poison_shard_crashing_its_model_actor_fails_alone_after_its_retries",)),
    # Every model annotator then runs whole (preprocess, forward, postprocess) in the CPU prepare
    # task, loading its weights there, and the actor gets nothing to do.
    Mutation("stages: forward passes run in the prepare task, not the model actor", "pipeline/shard.py",  # is_model
             "    return annotator.uses_model\n", "    return False\n",
             (f"{STAGES}::test_the_model_actor_runs_only_the_forward_pass",)),
    Mutation("stages: the first failing annotator does not decide the row (a later map is kept)",
             "pipeline/shard.py",  # apply_outcomes
             "            mark(row, outcome.status, outcome.reason)\n            return\n",
             "            mark(row, outcome.status, outcome.reason)\n            continue\n",
             (f"{STAGES}::test_the_first_failing_annotator_decides_the_row_and_no_map_is_kept",
              # a second catcher, end to end (rocket.jpg: the later "no face" would name the reason)
              "tests/test_annotate_models_job.py::test_require_detection_filters_images_without_a_face_or_a_person")),
    Mutation("stages: --input-list order not kept (sorted like a folder)", "pipeline/annotate.py",  # stream_inputs
             "        items = iter_input_list(config.input_list, config.input, stats)\n",
             "        items = iter(sorted(iter_input_list(config.input_list, config.input, stats), key=lambda i: i.source))\n",
             (f"{STAGES}::test_input_list_in_text_with_a_root_and_in_parquet_with_absolute_paths_and_captions",)),
    Mutation("stages: plan files left behind after a run", "pipeline/annotate.py",  # run
             "        finally:\n            remove_plans(output)\n", "        finally:\n            pass\n",
             (f"{STAGES}::test_each_shard_has_a_stats_file_and_the_plan_files_are_gone",)),
    # A rewrite killed between the two files then leaves the old shard under stats that claim the
    # new plan, and resume keeps it (no run is killed there in the job tests: the unit test cuts
    # the shard write off).
    Mutation("stages: stats file written before its shard", "manifests/sink.py",  # ManifestSink.write
             "        write_shard(rows, schema, self.output, shard_name(shard, self.digits))\n"
             "        stats = ShardStats.from_rows(shard, fingerprint, rows, captions_not_utf8, seconds)\n"
             "        fs, base = resolve(self.output)\n"
             "        self._write_stats(fs, base, stats)\n",
             "        stats = ShardStats.from_rows(shard, fingerprint, rows, captions_not_utf8, seconds)\n"
             "        fs, base = resolve(self.output)\n"
             "        self._write_stats(fs, base, stats)\n"
             "        write_shard(rows, schema, self.output, shard_name(shard, self.digits))\n",
             (f"{STAGES}::test_a_shard_write_cut_off_leaves_stats_that_redo_it",)),
    # The file is then taken for a shard to redo, and overwritten, unless another foreign file
    # stops the run; the refusal test's message names it.
    Mutation("stages: a shard-named file without stats or provenance not refused as foreign",
             "manifests/sink.py",  # ManifestSink.existing
             "                foreign.append(PurePosixPath(paths[index]).name)\n",
             "                pass\n",
             ("tests/test_annotate_refusals.py::test_files_of_others_in_the_output_are_refused_untouched",)),
    Mutation("s3: a URI's query lost when a path is joined to it (the plan files of an endpoint_override output)",
             "manifests/io.py",  # join
             '    return "/".join([location.rstrip("/"), *parts]) + mark + query\n',
             '    return "/".join([base.rstrip("/"), *parts])\n', (S3,)),
    Mutation("s3: the stats fallback opens a bucket's shard as a local file", "manifests/sink.py",  # _stats_from_shard
             "        provenance = shard_provenance(path, fs) or {}\n",
             "        provenance = shard_provenance(path) or {}\n", (S3,)),
    Mutation("s3: keys with an empty segment ('a//b.jpg') silently dropped", "pipeline/reader.py",  # _StoreTree.entries
             "                found.extend(self._under_empty_segment(path))\n", "                pass\n",
             (f"{S3}::test_every_listed_object_becomes_a_row",)),
    Mutation("s3: a shard that does not read crashes every rerun, --overwrite too, instead of a refusal naming it",
             "manifests/sink.py",  # ManifestSink.existing
             "                unreadable[index] = footer\n", "                raise OSError(footer)\n",
             (f"{S3}::test_an_unreadable_shard_is_refused_and_overwrite_starts_over",)),
    Mutation("manifest readers: the card's data files take every Parquet file (side tables read as data)",
             "manifests/card.py", 'SHARD_PATTERN = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"', 'SHARD_PATTERN = "**/*.parquet"',
             ("tests/test_manifest_loads_as_dataset.py",)),
    Mutation("manifest readers: the card's default config keeps error rows (no image to decode)", "manifests/card.py",
             '{"default": [["status", "==", STATUS_OK]], "all": None}', '{"default": None, "all": None}',
             ("tests/test_manifest_loads_as_dataset.py",)),
    Mutation("manifest readers: our own card refused as a file of others", "manifests/sink.py",
             "elif info.base_name == CARD_FILE and _is_our_card_file(fs, info.path):", "elif False:",
             ("tests/test_manifest_loads_as_dataset.py",)),
    Mutation("manifest readers: sizes read as float when error rows have none", "manifests/schema.py",
             'PANDAS_INT_DTYPES = {pa.int32(): "Int32", pa.int64(): "Int64"}', 'PANDAS_INT_DTYPES = {pa.int64(): "Int64"}',
             ("tests/test_manifest_readers_types.py",)),
    Mutation("preview: a failed row drawn without its reason", "manifests/preview.py",
             'if c == 0 and row["status"] != STATUS_OK:', "if False:", ("tests/test_manifest_preview.py",)),
    Mutation("Qwen-Image: condition latents not normalised by the VAE's latents_mean / latents_std",
             "train/families/qwenimage.py", "return (sample - mean) * inverse_std", "return sample",
             ("tests/test_train_new_families.py::"
              "test_qwenimage_prompt_and_condition_reach_the_controlnet_as_its_pipeline_passes_them",)),
]


def copy_project(dest: Path) -> Path:
    """This checkout's files (tracked and untracked, minus ignored ones) under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:  # the code moved on: the mutation must be updated, not silently skipped
        raise SystemExit(f"mutation {mutation.name!r}: {mutation.path} holds its text {count} times, not once")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, float, str]:
    """(passed, seconds, last lines) of pytest in the copy; a timeout counts as caught."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, "timed out"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    failed = [line.split(" - ")[0] for line in lines  # the -ra summary names the test (not log lines)
              if line.startswith(("FAILED tests/", "ERROR tests/"))]
    return done.returncode == 0, time.perf_counter() - start, " ".join([*failed[:1], *lines[-1:]])


def list_mutations(chosen: list[Mutation]) -> int:
    """Print each mutation, its file, whether its text occurs exactly once (in this checkout) and
    its tests; non-zero when any is stale."""
    stale = 0
    for m in chosen:
        path = ROOT / m.path
        count = path.read_text().count(m.old) if path.is_file() else 0
        stale += count != 1
        state = "ok" if count == 1 else f"STALE ({count} matches)"
        print(f"{state:17s} {m.name}  [{m.path}]")
        for test in m.tests:
            print(f"{'':17s}   {test}")
    print(f"\n{len(chosen) - stale} of {len(chosen)} mutations apply")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutation")
    p.add_argument("--only", action="append", default=[],
                   help="only mutations whose name contains this text (repeatable: any of them)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    p.add_argument("--list", action="store_true",
                   help="list the (chosen) mutations and whether each one's text occurs exactly once; run nothing")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o.lower() in m.name.lower() for o in args.only)]
    if not chosen:
        raise SystemExit(f"no mutation matches {' or '.join(map(repr, args.only))}")
    if args.list:
        return list_mutations(chosen)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        pristine = copy_project(Path(tmp) / "pristine")
        for m in chosen:  # fail early on stale mutations, before any test runs
            apply(m, copy_project(Path(tmp) / "probe"))
            shutil.rmtree(Path(tmp) / "probe")
        baseline_tests = () if args.full else tuple(sorted({t for m in chosen for t in m.tests}))
        ok, seconds, tail = run_tests(pristine, baseline_tests, args.timeout)
        print(f"baseline (no mutation): {'green' if ok else 'RED'} in {seconds:.0f} s  {tail}", flush=True)
        if not ok:
            print("the unmutated suite fails: fix that first")
            return 1
        caught = 0
        for m in chosen:
            root = Path(tmp) / "mutant"
            shutil.copytree(pristine, root)
            apply(m, root)
            passed, seconds, tail = run_tests(root, () if args.full else m.tests, m.timeout or args.timeout)
            caught += not passed
            print(f"{'caught' if not passed else 'MISSED':7s} {seconds:5.0f} s  {m.name}  [{tail}]", flush=True)
            shutil.rmtree(root)
    print(f"\n{caught} of {len(chosen)} mutations caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
