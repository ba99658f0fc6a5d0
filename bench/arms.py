"""Training arms for the fill-task benches: runs set up by the trainer itself, stepped in one process.

Shared by bench/reward_finetune.py and bench/control_methods.py. An ``Arm`` is a trainer run
(``train.loop.set_up`` on the trainer's own flags) advanced a few optimiser steps at a time with the loop's
``micro_step``/``after_step``, so several arms can take turns on one machine and a slow or fast spell of a
shared CPU falls on all of them; each arm's clock counts its own steps only (data loading included).
``peak_memory`` measures one arm's peak memory in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOREVER = 10 ** 7
"""An arm's --max_train_steps: a constant schedule, stopped by the bench's clock, never by the step count."""

CALIBRATE = """
import json, resource, sys
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
from train.train import main
import train.loop, train.models  # everything the trainer imports, before the baseline
print("BASELINE_KB", rss_kb())
assert main(json.loads(sys.argv[1])) == 0
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
"""Run by ``peak_memory``: the trainer on the given flags, then the process's peak RSS; also the RSS once the
trainer's modules are imported (before any model loads), so the growth from there can be reported."""


def annotate(work: Path, name: str, count: int, seed: int) -> str:
    """``count`` 64 px circles drawn with ``seed`` (files named ``name``_N.png, so each set's manifest ids are its
    own), annotated with Canny into a manifest (local Ray)."""
    from pipeline import ray_runtime
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig
    from demo.circles import write_circles

    write_circles(work / name, count, size=64, seed=seed, prefix=name)
    run(AnnotateConfig(input=str(work / name), output=str(work / f"{name}_manifest"), resolution=64, shard_size=500))
    ray_runtime.shutdown()
    return str(work / f"{name}_manifest")


def peak_memory(flags: list[str]) -> dict[str, float]:
    """A fresh process training on ``flags`` (a few steps): its peak RSS (MB) and the peak's growth over the RSS
    once the trainer is imported (MB)."""
    done = subprocess.run([sys.executable, "-c", CALIBRATE, json.dumps(flags)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    found = {line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines()
             if line.startswith(("MAXRSS_KB", "BASELINE_KB"))}
    return {"peak_mb": found["MAXRSS_KB"] / 1024, "growth_mb": (found["MAXRSS_KB"] - found["BASELINE_KB"]) / 1024}


class Arm:
    """One arm's training run, set up by the trainer itself and advanced a segment at a time."""

    def __init__(self, flags: list[str], out: Path):
        """``flags``: the trainer's command line (its --output_dir is ``out``)."""
        from train.loop import Meter, set_up
        from train.train import parse_args

        self.out = out
        self.run = set_up(parse_args(flags))
        self.meter = Meter(first_step=0)
        self.batches = self.epochs()
        self.seconds, self.steps = 0.0, 0

    def epochs(self):
        """The trainer's batches, epoch after epoch (as ``run_steps`` draws them)."""
        for epoch in range(self.run.epochs):
            self.run.dataset.set_epoch(epoch)
            self.run.sampler.set_epoch(epoch, 0)
            yield from self.run.loader

    def advance(self, seconds: float, until_step: int | None = None) -> None:
        """Optimiser steps, as the trainer's loop makes them, for ``seconds`` more of this arm's clock (at least
        one step), stopping early once ``until_step`` steps are done."""
        from train.loop import after_step, micro_step

        end = self.seconds + seconds
        while self.seconds < end and (until_step is None or self.steps < until_step):
            began = time.perf_counter()
            finite = micro_step(self.run, next(self.batches), 0, True, self.meter)
            after_step(self.run, self.meter, finite)
            self.seconds += time.perf_counter() - began
            self.steps += 1

    @property
    def module(self):
        """The trained module itself (accelerate's wrapper removed)."""
        return self.run.accelerator.unwrap_model(self.run.controlnet)

    def export(self, name: str = "controlnet") -> str:
        """The ControlNet's weights (``save_pretrained``) in ``out``/``name``."""
        folder = self.out / name
        self.module.save_pretrained(folder)
        return str(folder)


def alternate(arms: dict[str, Arm], budget: float, segment: float, marks: Sequence[float] = (),
              at_mark: Callable[[str, Arm, float], None] | None = None) -> None:
    """Give each arm ``segment`` seconds in turn (a, b, a, b, ...) until each has trained ``budget`` seconds; a turn
    also ends at each of ``marks`` (seconds of the arm's own clock, ``budget`` included), where
    ``at_mark(name, arm, mark)`` is called once per arm and mark."""
    stops = sorted({m for m in marks if 0 < m < budget} | {budget})
    passed: dict[str, set[float]] = {name: set() for name in arms}
    while any(arm.seconds < budget for arm in arms.values()):
        for name, arm in arms.items():
            due = [stop for stop in stops if stop > arm.seconds]
            if due:
                arm.advance(min(segment, due[0] - arm.seconds))
            for stop in stops:
                if at_mark is not None and arm.seconds >= stop and stop not in passed[name]:
                    passed[name].add(stop)
                    at_mark(name, arm, stop)
        print(" | ".join(f"{n} {a.steps} steps {a.seconds / 60:.1f} min" for n, a in arms.items()), flush=True)
