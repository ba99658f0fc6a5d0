#!/usr/bin/env python
"""Does the suite notice? Apply deliberate bugs, one at a time, to a copy of the project.

    python tests/mutation_check.py                 # every mutation, its targeted tests (~10 min)
    python tests/mutation_check.py --full          # every mutation, the whole suite each (hours)
    python tests/mutation_check.py --only flip     # mutations whose name contains "flip"
    python tests/mutation_check.py --only hostile: --only flip   # --only repeats: any of them

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
             "cond = torch.cat([self._prepare(c, box, flip) for c in conds])",
             "cond = torch.cat([self._prepare(c, box, False) for c in conds])", ("tests/test_train_data.py",)),
    Mutation("stacked conditions in reverse order", "train/data.py",
             "conds = [decode_rgb(row[cond_column(c)]) for c in self.conditions]",
             "conds = [decode_rgb(row[cond_column(c)]) for c in reversed(self.conditions)]",
             ("tests/test_train_data.py",)),
    Mutation("annotators see a mirrored image", "pipeline/shard.py",
             "pending.append((row, image))",
             "pending.append((row, np.ascontiguousarray(image[:, ::-1])))",
             ("tests/test_annotate_job.py", "tests/test_annotate_flags.py")),
    Mutation("shard written straight to its final name", "manifests/io.py",
             'tmp = join(base, f".tmp-{uuid.uuid4().hex}-{name}")', "tmp = final",
             ("tests/test_manifest_io.py",)),
    Mutation("annotator parameters left out of the settings fingerprint", "pipeline/annotate.py",
             '{"settings": provenance["settings"], "params": [a.params.to_dict() for a in annotators]}',
             '{"settings": provenance["settings"]}', ("tests/test_annotate_job.py",)),
    Mutation("per-row training randomness ignores the row", "train/data.py",
             "rng = _rng(self.seed, self.epoch, index)", "rng = _rng(self.seed, self.epoch, 0)",
             ("tests/test_train_data.py",)),
    Mutation("raw weights exported instead of the EMA weights", "train/loop.py",
             "ema.copy_to(final.parameters())", "pass", ("tests/test_train.py::test_ema_run_exports_the_averaged_weights",)),
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
             'caption = "" if rng.random() < self.p_empty else (row["caption"] or "")',
             'caption = "" if rng.random() < 0.0 else (row["caption"] or "")', ("tests/test_train_data.py",)),
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
             "controlnet.enable_gradient_checkpointing()", "pass", ("tests/test_train.py",)),
    # Messy collections and one run per output (tests/test_annotate_hostile_inputs.py).
    Mutation("hostile: resume ignores file stamps (edits not noticed)", "pipeline/shard.py",
             'listed = "\\n".join(f"{i.source}\\t{i.stamp}" for i in items)',
             'listed = "\\n".join(f"{i.source}" for i in items)',
             (f"{HOSTILE}::test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption",)),
    Mutation("hostile: metadata captions left out of the stamp", "pipeline/reader.py",
             'hashlib.sha256(caption.encode()).hexdigest()[:16] if caption is not None else "",', '"",',
             (f"{HOSTILE}::test_resume_redoes_the_shard_of_an_overwritten_image_or_an_edited_caption",
              f"{HOSTILE}::test_resume_redoes_the_shard_of_an_edited_metadata_caption")),
    Mutation("hostile: symlinked folders followed without the seen-set", "pipeline/reader.py",
             "if (stat.st_dev, stat.st_ino) in seen:", "if False:",
             (f"{HOSTILE}::test_a_symlink_loop_lists_each_real_folder_once_and_counts_the_skips",),
             timeout=120),  # a loop then lists forever
    Mutation("hostile: folders reached through links not remembered", "pipeline/reader.py",
             "seen.add((stat.st_dev, stat.st_ino))\n            stack.append(link)", "stack.append(link)",
             (f"{HOSTILE}::test_a_symlink_loop_lists_each_real_folder_once_and_counts_the_skips",
              f"{HOSTILE}::test_two_links_to_one_folder_outside_the_input_list_it_once"), timeout=120),
    Mutation("hostile: sidecar extension matched case-sensitively", "pipeline/reader.py",
             "posixpath.splitext(f.path)[1].lower()): f for f in regular}",
             "posixpath.splitext(f.path)[1]): f for f in regular}",
             (f"{HOSTILE}::test_a_sidecar_matches_its_image_whatever_the_case_of_its_extension",)),
    Mutation("hostile: legacy-encoded sidecars not decoded leniently", "pipeline/reader.py",
             'return data.decode("utf-8-sig"), None\n    except UnicodeDecodeError:\n        pass',
             'return data.decode("utf-8-sig"), None\n    except UnicodeDecodeError:\n        raise',
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
    Mutation("hostile: lock taken after planning (a refused run already changed the output)", "pipeline/annotate.py",
             "    with output_lock.acquire(config.output) as lock:  # one run per output, before any change\n"
             "        todo, done = plan_shards(config, listing, job)\n",
             "    todo, done = plan_shards(config, listing, job)\n"
             "    with output_lock.acquire(config.output) as lock:  # one run per output, before any change\n",
             HOSTILE_LOCK_TESTS),
    Mutation("hostile: a stale lock removed without checking it is still the stale one", "pipeline/output_lock.py",
             'if (read_lock(output) or {}).get("token") != held.get("token"):', "if False:",
             (f"{HOSTILE}::test_runs_starting_at_once_get_one_lock",)),
    Mutation("hostile: a run that lost its lock still marks the manifest complete", "pipeline/annotate.py",
             "        lock.check()  # a run that lost its lock never declares the manifest complete\n", "",
             (f"{HOSTILE}::test_a_run_whose_lock_was_taken_over_does_not_mark_the_manifest_complete",)),
    Mutation("hostile: a FIFO named like an image is opened", "pipeline/reader.py",
             "kind = None if S_ISREG(stat.st_mode) else", "kind = None if True else",
             (f"{HOSTILE}::test_a_fifo_named_like_an_image_or_a_sidecar_is_an_error_row_not_a_hang",), timeout=180),
    Mutation("hostile: stale temp files of a killed run left behind", "pipeline/annotate.py",
             "    remove_stale_temp_files(config.output)\n", "",
             (f"{HOSTILE}::test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message",)),
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
    tail = [line for line in done.stdout.splitlines() if line.strip()][-1:]
    return done.returncode == 0, time.perf_counter() - start, " ".join(tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutation")
    p.add_argument("--only", action="append", default=[],
                   help="only mutations whose name contains this text (repeatable: any of them)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o.lower() in m.name.lower() for o in args.only)]
    if not chosen:
        raise SystemExit(f"no mutation matches {' or '.join(map(repr, args.only))}")
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
