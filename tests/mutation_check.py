#!/usr/bin/env python
"""Does the suite notice? Apply deliberate bugs, one at a time, to a copy of the project.

    python tests/mutation_check.py                 # every mutation, its targeted tests (~10 min)
    python tests/mutation_check.py --full          # every mutation, the whole suite each (hours)
    python tests/mutation_check.py --only flip     # mutations whose name contains "flip"

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
    p.add_argument("--only", default="", help="only mutations whose name contains this text")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if not chosen:
        raise SystemExit(f"no mutation matches {args.only!r}")
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
            passed, seconds, tail = run_tests(root, () if args.full else m.tests, args.timeout)
            caught += not passed
            print(f"{'caught' if not passed else 'MISSED':7s} {seconds:5.0f} s  {m.name}  [{tail}]", flush=True)
            shutil.rmtree(root)
    print(f"\n{caught} of {len(chosen)} mutations caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
