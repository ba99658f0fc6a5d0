"""A simulated GPU node: how busy each annotation design keeps one GPU, measured on a CPU machine.

    flock /tmp/cpu.lock .venv/bin/python bench/gpu_pipeline_sim.py [--images 1024] [--shard-size 32]
        [--profile hed|openpose|both] [--designs new,old,raydata] [--window N] [--workdir DIR]

Local Ray starts with *declared* resources (8 CPUs, 1 GPU) on this 2-core machine; the annotator
(``bench/sim_annotators.py``, a ``SplitAnnotator`` with ``uses_model = True``) sleeps for each
part's cost, so eight "CPUs" overlap on two real cores and the forward sleep stands in for the GPU.
Costs measured on this machine (docs: /work/shared/design.md, "Measured here"):

- ``hed``: preprocess 5.9 ms (decode+resize 4.5 + JPEG encode 1.4, both stage 1), forward 4 ms per
  image, postprocess 7.3 ms (post-processing+PNG 6 + Parquet write 1.3 folded in);
- ``openpose``: the same stage 1, forward 2 ms per image, postprocess 329.3 ms (323 ms of peak
  finding and drawing + PNG 5 + Parquet 1.3); run on ``--images // 16`` images in shards of
  ``--shard-size // 8`` so the old design stays under a minute.

Every 4th shard (index % 4 == 3) is 3x heavier: its generated images are pure cyan, which the
annotator recognises. The images are 64x64 PNGs at ``--resolution 64`` (their real decode is
cheap; the sleeps carry the cost).

Designs, all on the same generated collection and shard slices, through the project's code:

- ``new``: ``pipeline.annotate.run`` (prepare tasks -> ``ModelWorker.forward`` actor -> finish
  tasks, ``pipeline/dispatch.py``), reusing the already started Ray; its manifest is checked.
- ``old``: each shard whole by ``ShardWorker(job)(spec)`` in a ``ray.remote(num_gpus=1)`` actor
  (one per GPU), the next shard going to whichever actor is free.
- ``raydata``: Ray Data with default settings, one row (and block) per shard, ``batch_size=1``, so
  a shard is still committed whole, once: ``map_batches(prepare)`` (CPU tasks) ->
  ``map_batches(ModelStage, compute=ActorPoolStrategy(size=1), num_gpus=1)`` (Ray 2.60's spelling of
  ``concurrency=1``) -> ``map_batches(finish)`` (CPU tasks: postprocess, PNG, Parquet shard commit).
  Ray Data logs that it pickles the ``prepared`` column (Python objects); that is expected.

Measured per design: makespan (dispatch start to last shard committed, model-actor start-up
included), the ideal (total forward sleep, one GPU), their ratio, GPU busy (the union of forward
calls' intervals, from the annotator's logs, over the makespan), and where the GPU idled: before
its first forward (actor start, first shard's stage 1), between shards while a prepared shard was
already waiting (dispatch latency) or while none was (starved by stage 1), and after its last
forward (the last shards' stage 3). ``--window N`` replaces the dispatch window of
``dispatch.run_job`` (``cpus + 2 * actors``) for an experiment, without editing the pipeline.
Ray start-up and the workers' first imports are excluded: a warm-up (imports in every CPU worker, then a
16-image staged job) runs first, so each design finds the same worker pool.

Measured here (2 real cores shared with other work, 2026-11-26; run-to-run spread about +-10%):

    hed 1024 images/32 shards  makespan  x ideal  GPU busy  (steady)  GPU idle per shard hand-over
      new (staged)                9.21 s    1.50x     67.1%    94.1%   12 ms
      old (do-everything actor)  31.71 s    5.16x     19.5%    20.9%   -
      Ray Data, defaults         14.46 s    2.35x     42.8%    59.4%   86 ms
    hed 4096 images: new 28.95 s, 1.18x, 85.3% busy (93.9% steady); Ray Data 39.23 s, 1.60x, 63.0%
    openpose 64 images/16 shards: new 8.00 s (1.74x the 4.60 s CPU floor), old 35.26 s (0.6% GPU busy),
      Ray Data 10.36 s

So Ray Data with defaults is not kept: it was slower than the Ray core pipeline in every run (1.1-1.7x
the makespan), because every block crosses the model actor (the prepared shard too: a Ray Data
pipeline is one chain) and the actor spent ~80-170 ms between calls moving blocks in and out. The
targets (>= 85% busy, <= 1.25x ideal) hold for the new design once the job is long enough to
amortise ~2-3.5 s of start (model actor up) and tail (the last shard's stage 3): not at 1024 images,
yes at 4096. Window experiments (a scratch copy of ``dispatch.py``, hed 1024, steady busy): window 4:
75-77% (7-9 of 31 hand-overs starved); 7: 94-95%; 10 (``cpus + 2 * actors``, the default): 91-95%;
20: 94%. Queueing 2 forward calls per actor instead of 1: 97.6-97.9%, hand-over 4-5 ms instead of
10-20 ms (the driver's round trip between two forwards disappears).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import time
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIM = "bench.sim_annotators:SimAnnotator"
DECLARED_CPUS, DECLARED_GPUS = 8, 1
HEAVY_EVERY = 4
TARGET_BUSY, TARGET_RATIO = 0.85, 1.25
RESOLUTION = 64


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    prepare_ms: float
    forward_ms: float
    post_ms: float
    heavy_factor: float = 3.0


PROFILES = {
    "hed": Profile("hed", prepare_ms=4.5 + 1.4, forward_ms=4.0, post_ms=6.0 + 1.3),
    "openpose": Profile("openpose", prepare_ms=4.5 + 1.4, forward_ms=2.0, post_ms=323.0 + 5.0 + 1.3),
}


@dataclasses.dataclass
class Run:
    """One design's run: driver times and the annotator's call logs."""

    design: str
    start: float
    end: float
    log_dir: Path
    output: Path
    note: str = ""


# ---------------------------------------------------------------------------- collection and Ray


def is_heavy(shard: int) -> bool:
    return shard % HEAVY_EVERY == HEAVY_EVERY - 1


def image_name(i: int) -> str:
    return f"img_{i:05d}.png"


def make_collection(folder: Path, count: int, shard_size: int) -> None:
    """``count`` 64x64 PNGs: noise, or pure cyan (heavy) in every 4th shard."""
    from bench.sim_annotators import HEAVY_RGB

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        if is_heavy(i // shard_size):
            pixels = np.broadcast_to(np.array(HEAVY_RGB, np.uint8), (RESOLUTION, RESOLUTION, 3))
        else:
            pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / image_name(i))


def start_ray(workdir: Path) -> None:
    """Local Ray on 127.0.0.1 with declared 8 CPUs and 1 GPU (as pipeline/ray_runtime.py does it)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=DECLARED_CPUS, num_gpus=DECLARED_GPUS,
             include_dashboard=False, logging_level=logging.WARNING)
    warm_up(workdir / "warm-up")


def warm_up(workdir: Path) -> None:
    """Import the project in every CPU worker, then run a small staged job: the first design measured
    then finds Ray's worker pool as the later ones do (a spare idle worker for its actor; without
    this it alone starts a fresh process for its actor, about 1.2 s here, as every design would on a
    Ray started for the job)."""
    import ray

    @ray.remote(num_cpus=1)
    def imports() -> int:
        import bench.sim_annotators  # noqa: F401
        import pipeline.shard  # noqa: F401

        time.sleep(1.0)  # hold the CPU so each task lands in its own worker
        return os.getpid()

    pids = ray.get([imports.remote() for _ in range(DECLARED_CPUS)])
    make_collection(workdir / "collection", 16, 8)
    run_new(workdir / "collection", workdir / "new", PROFILES["hed"], 8, None)
    print(f"warm-up: {len(set(pids))} CPU workers imported the project; a 16-image staged job ran")


# ---------------------------------------------------------------------------- the three designs


def sim_params(profile: Profile, log_dir: Path) -> dict[str, Any]:
    return {"prepare_ms": profile.prepare_ms, "forward_ms": profile.forward_ms, "post_ms": profile.post_ms,
            "heavy_factor": profile.heavy_factor, "log_dir": str(log_dir)}


def config_for(collection: Path, output: Path, profile: Profile, log_dir: Path, shard_size: int):
    from pipeline.config import AnnotateConfig

    return AnnotateConfig(input=str(collection), output=str(output), annotators=(SIM,),
                          annotator_params={SIM: sim_params(profile, log_dir)}, resolution=RESOLUTION,
                          shard_size=shard_size, overwrite=True)


def fresh_dirs(base: Path) -> tuple[Path, Path]:
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    return base / "logs", base / "manifest"


@contextlib.contextmanager
def timed_dispatch(clock: dict[str, float], window: int | None) -> Iterator[None]:
    """Time ``dispatch.run_job`` inside ``annotate.run`` (and, with ``window``, replace its window)."""
    from pipeline import dispatch

    real_run_job, real_run_staged = dispatch.run_job, dispatch.run_staged

    def run_job(*args: Any, **kwargs: Any) -> Iterator[Any]:
        clock["start"] = time.time()
        yield from real_run_job(*args, **kwargs)
        clock["end"] = time.time()

    def run_staged(stages: Any, actors: int, todo: list, default_window: int, max_retries: int) -> Iterator[Any]:
        clock["window"] = window if window is not None else default_window
        return real_run_staged(stages, actors, todo, clock["window"], max_retries)

    dispatch.run_job, dispatch.run_staged = run_job, run_staged
    try:
        yield
    finally:
        dispatch.run_job, dispatch.run_staged = real_run_job, real_run_staged


def run_new(collection: Path, base: Path, profile: Profile, shard_size: int, window: int | None) -> Run:
    """The staged job, through ``pipeline.annotate.run``; its manifest is checked."""
    from pipeline.annotate import run

    log_dir, output = fresh_dirs(base)
    clock: dict[str, float] = {}
    with timed_dispatch(clock, window):
        summary = run(config_for(collection, output, profile, log_dir, shard_size))
    counts = summary["counts"]
    note = (f"_manifest.json: {counts['rows']} rows, {counts['ok']} ok, {len(summary['shards'])} shards; "
            f"window {clock.get('window', '(dispatch replaced)')}")
    return Run("new", clock["start"], clock["end"], log_dir, output, note)


def remove_plans(output: str) -> None:
    from pipeline.plan import remove_plans as remove

    remove(output)


def job_and_specs(collection: Path, output: Path, profile: Profile, log_dir: Path, shard_size: int):
    """The job (its sink writing to ``output``, made ready) and the shard specs ``annotate.run`` plans."""
    from pipeline.annotate import make_job
    from pipeline.plan import plan_shards, run_plan_dir
    from pipeline.reader import ListingStats, iter_inputs

    config = config_for(collection, output, profile, log_dir, shard_size)
    job = make_job(config)
    plan = plan_shards(iter_inputs(str(collection), ListingStats()), shard_size,
                       job.sink.provenance["settings_fingerprint"], lambda index, fp: False,
                       run_plan_dir(str(output)))
    job.sink.on_write_start(job.sink.existing(), overwrite=True)
    return job, plan.todo


def run_old(collection: Path, base: Path, profile: Profile, shard_size: int) -> Run:
    """Each shard whole (read .. Parquet) by ``ShardWorker(job)(spec)`` in a GPU actor, one per GPU."""
    import ray

    from pipeline.shard import ShardWorker

    log_dir, output = fresh_dirs(base)
    job, todo = job_and_specs(collection, output, profile, log_dir, shard_size)
    start = time.time()
    actor_cls = ray.remote(num_gpus=1, max_restarts=0)(ShardWorker)
    actors = [actor_cls.remote(job) for _ in range(int(ray.cluster_resources().get("GPU", 1)))]
    queue, free = collections.deque(todo), collections.deque(range(len(actors)))
    pending: dict[Any, int] = {}
    while queue or pending:
        while queue and free:  # the next shard to whichever actor is free
            actor = free.popleft()
            pending[actors[actor].run.remote(queue.popleft())] = actor
        [ref], _ = ray.wait(list(pending), num_returns=1)
        free.append(pending.pop(ref))
        ray.get(ref)
    end = time.time()
    for actor in actors:
        ray.kill(actor)
    remove_plans(str(output))
    return Run("old", start, end, log_dir, output, f"{len(actors)} do-everything actor(s)")


SPEC_COLUMNS = ("index", "fingerprint", "rows", "plan")  # a ShardSpec as plain columns (Arrow, not pickle)


def _specs(batch: dict[str, np.ndarray]) -> list[Any]:
    from pipeline.plan import ShardSpec

    return [ShardSpec(int(i), str(f), int(r), str(p)) for i, f, r, p in zip(*(batch[c] for c in SPEC_COLUMNS))]


def _rd_prepare(batch: dict[str, np.ndarray], job: Any) -> dict[str, np.ndarray]:
    from pipeline.shard import prepare_shard

    prepared, inputs = zip(*(prepare_shard(job, spec)[1:] for spec in _specs(batch)))
    return {**{c: batch[c] for c in SPEC_COLUMNS}, "prepared": _objects(prepared), "inputs": _objects(inputs)}


class _RdModelStage:
    """Ray Data's callable class holding the model: ``ModelWorker.forward`` per shard."""

    def __init__(self, job: Any, log_dir: str) -> None:
        from pipeline.shard import ModelWorker

        self.worker = ModelWorker(job)
        self.log = Path(log_dir) / f"call-{os.getpid()}.log"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        outputs = [self.worker.forward(index, inputs)[1] for index, inputs in zip(batch["index"], batch["inputs"])]
        with open(self.log, "a") as f:  # the call's time inside the actor, beside the forward calls' time
            f.write(f"call {start:.6f} {time.time():.6f} 0 \n")
        return {**{c: batch[c] for c in SPEC_COLUMNS}, "prepared": batch["prepared"], "outputs": _objects(outputs)}


def _rd_finish(batch: dict[str, np.ndarray], job: Any) -> dict[str, np.ndarray]:
    from pipeline.shard import finish_shard

    stats = [finish_shard(job, spec, prepared, outputs)
             for spec, prepared, outputs in zip(_specs(batch), batch["prepared"], batch["outputs"])]
    return {"rows": np.array([s.rows for s in stats])}


def _objects(values: Any) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def run_ray_data(collection: Path, base: Path, profile: Profile, shard_size: int) -> Run:
    """Ray Data, default settings; one row per shard keeps each shard one commit."""
    import ray.data

    log_dir, output = fresh_dirs(base)
    job, todo = job_and_specs(collection, output, profile, log_dir, shard_size)
    ray.data.DataContext.get_current().enable_progress_bars = False  # output only; no effect on scheduling
    start = time.time()
    ds = ray.data.from_items([dataclasses.asdict(spec) for spec in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_rd_prepare, fn_kwargs={"job": job}, batch_size=1)
    ds = ds.map_batches(_RdModelStage, fn_constructor_kwargs={"job": job, "log_dir": str(log_dir)}, batch_size=1,
                        num_gpus=1, compute=ray.data.ActorPoolStrategy(size=1))  # = concurrency=1, now deprecated
    ds = ds.map_batches(_rd_finish, fn_kwargs={"job": job}, batch_size=1)
    rows = sum(int(row["rows"]) for row in ds.iter_rows())
    end = time.time()
    remove_plans(str(output))
    return Run("raydata", start, end, log_dir, output, f"{rows} rows committed through Ray Data")


# ---------------------------------------------------------------------------- checks and figures


def check_output(run: Run, count: int) -> list[str]:
    """Problems with the shards a design wrote: every image once, status ok, a map each."""
    files = sorted(glob.glob(str(run.output / "part-*.parquet")))
    if not files:
        return [f"{run.design}: no shard written under {run.output}"]
    table = pq.ParquetDataset(files).read(columns=["source", "status", "cond_sim"])
    problems = []
    sources = table["source"].to_pylist()
    if sorted(sources) != [image_name(i) for i in range(count)]:
        problems.append(f"{run.design}: {len(sources)} rows for {count} images ({len(set(sources))} distinct)")
    statuses = collections.Counter(table["status"].to_pylist())
    if statuses != {"ok": count}:
        problems.append(f"{run.design}: statuses {dict(statuses)}")
    if any(m is None or not m["bytes"] for m in table["cond_sim"].to_pylist()):
        problems.append(f"{run.design}: rows without a cond_sim map")
    return problems


def read_logs(log_dir: Path) -> dict[str, list[tuple[float, float, list[str]]]]:
    """kind -> [(start, end, ids)] from every process's log."""
    calls: dict[str, list[tuple[float, float, list[str]]]] = collections.defaultdict(list)
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            kind, start, end, _, ids = line.split(" ")
            calls[kind].append((float(start), float(end), ids.split(",")))
    return calls


def union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


@dataclasses.dataclass
class Figures:
    design: str
    makespan: float
    ideal: float
    cpu_floor: float
    """Stage 1 and 3 sleeps spread over the CPUs left beside the model actor."""
    busy: float
    steady_busy: float
    """GPU busy between the first forward's start and the last one's end."""
    startup: float
    tail: float
    dispatch_idle: float
    starved_idle: float
    starved_gaps: int
    gaps: int
    waiting: list[int]
    actor_spawned: float
    """When the model actor's process started, from the dispatch start."""
    actor_ready: float
    """When its ``setup()`` (the weight load) ended."""
    call_gap: float | None = None
    """Ray Data only: mean time between the model actor's calls (block (de)serialization, scheduling)."""


def figures(run: Run, profile: Profile, count: int, shard_size: int) -> Figures:
    """Makespan, ideal, GPU busy and where the GPU idled, from the driver's clock and the call logs."""
    from pipeline.reader import row_id

    shard_of = {row_id(image_name(i)): i // shard_size for i in range(count)}
    weight = sum(profile.heavy_factor if is_heavy(i // shard_size) else 1.0 for i in range(count))
    calls = read_logs(run.log_dir)
    forwards = [(s, e, shard_of[ids[0]]) for s, e, ids in calls["forward"]]
    intervals = [(s, e) for s, e, _ in forwards]
    busy = union_length(intervals, run.start, run.end)
    prepared: dict[int, float] = collections.defaultdict(float)  # shard -> end of its last preprocess
    for _, end, ids in calls["prepare"]:
        prepared[shard_of[ids[0]]] = max(prepared[shard_of[ids[0]]], end)
    per_shard: dict[int, list[float]] = {}  # shard -> [first forward start, last forward end]
    for start, end, shard in forwards:
        span = per_shard.setdefault(shard, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    order = sorted(per_shard, key=lambda k: per_shard[k][0])
    dispatch_idle = starved_idle = 0.0
    starved_gaps = 0
    waiting = []
    for before, after in zip(order, order[1:]):
        gap_start, gap_end = per_shard[before][1], per_shard[after][0]
        # Shards whose stage 1 had ended but whose forward had not started, when this forward started.
        waiting.append(sum(1 for k in order if prepared[k] <= gap_end and per_shard[k][0] > gap_end))
        gap = max(0.0, gap_end - gap_start)
        starved = min(gap, max(0.0, prepared[after] - gap_start))
        starved_gaps += starved > 0.002
        starved_idle += starved
        dispatch_idle += gap - starved
    first = min(s for s, _, _ in forwards)
    last = max(e for _, e, _ in forwards)
    [(spawned, ready, _)] = calls["setup"]  # one model actor
    actor_calls = sorted((s, e) for s, e, _ in calls["call"])
    call_gap = (float(np.mean([b[0] - a[1] for a, b in zip(actor_calls, actor_calls[1:])]))
                if len(actor_calls) > 1 else None)
    return Figures(
        design=run.design, makespan=run.end - run.start, ideal=profile.forward_ms * weight / 1000,
        cpu_floor=(profile.prepare_ms + profile.post_ms) * weight / 1000 / (DECLARED_CPUS - DECLARED_GPUS),
        busy=busy / (run.end - run.start), steady_busy=union_length(intervals, first, last) / (last - first),
        startup=first - run.start, tail=run.end - last, dispatch_idle=dispatch_idle, starved_idle=starved_idle,
        starved_gaps=starved_gaps, gaps=len(order) - 1, waiting=waiting, actor_spawned=spawned - run.start,
        actor_ready=ready - run.start, call_gap=call_gap)


def print_figures(rows: list[Figures]) -> None:
    print(f"  {'design':8} {'makespan':>9} {'ideal':>7} {'ratio':>6} {'GPU busy':>9} {'steady':>7} | GPU idle: "
          f"{'start':>6} {'dispatch':>9} {'starved':>8} {'tail':>6} | shards prepared+waiting at each forward")
    for f in rows:
        waits = (f"min {min(f.waiting)} median {int(np.median(f.waiting))} max {max(f.waiting)}; "
                 f"{f.starved_gaps}/{f.gaps} gaps starved") if f.waiting else "-"
        print(f"  {f.design:8} {f.makespan:8.2f}s {f.ideal:6.2f}s {f.makespan / f.ideal:5.2f}x {f.busy:8.1%} "
              f"{f.steady_busy:7.1%} | {'':9} {f.startup:5.2f}s {f.dispatch_idle:8.2f}s {f.starved_idle:7.2f}s "
              f"{f.tail:5.2f}s | {waits}")
    for f in rows:
        extra = (f"; {f.call_gap * 1000:.0f} ms on average between two calls of the model actor (Ray Data moving "
                 "blocks in and out)") if f.call_gap is not None else ""
        print(f"  {f.design}: model actor process started {f.actor_spawned:.2f}s after dispatch, ready (setup done) "
              f"{f.actor_ready:.2f}s, first forward {f.startup:.2f}s; {f.dispatch_idle / max(1, f.gaps) * 1000:.1f} ms "
              f"GPU idle per shard hand-over{extra}")


def print_verdict(rows: dict[str, Figures], profile: Profile, images: int) -> None:
    new = rows.get("new")
    for other in ("old", "raydata"):
        if new and other in rows:
            o = rows[other]
            print(f"  new vs {other}: makespan {new.makespan / o.makespan:.2f}x ({o.makespan / new.makespan:.2f}x "
                  f"faster), GPU busy {new.busy:.1%} vs {o.busy:.1%}")
    if not new:
        return
    floor = max(new.ideal, new.cpu_floor)
    if new.cpu_floor > new.ideal:
        print(f"  {profile.name}: CPU-bound (stage 1+3 sleeps / {DECLARED_CPUS - DECLARED_GPUS} free CPUs = "
              f"{new.cpu_floor:.2f}s > GPU ideal {new.ideal:.2f}s): new makespan is {new.makespan / floor:.2f}x "
              "that CPU floor; the GPU targets do not apply")
        return
    busy_ok, ratio_ok = new.busy >= TARGET_BUSY, new.makespan / new.ideal <= TARGET_RATIO
    print(f"  target GPU busy >= {TARGET_BUSY:.0%}: {'met' if busy_ok else 'NOT met'} ({new.busy:.1%}); "
          f"makespan <= {TARGET_RATIO}x ideal: {'met' if ratio_ok else 'NOT met'} ({new.makespan / new.ideal:.2f}x); "
          f"steady state (first to last forward): {new.steady_busy:.1%} busy")
    if busy_ok and ratio_ok:
        return
    idle = new.makespan * (1 - new.busy)
    print(f"  limits: of {idle:.2f}s GPU idle, {new.startup:.2f}s before the first forward (the model actor's "
          f"process up at {new.actor_spawned:.2f}s, setup done at {new.actor_ready:.2f}s), {new.dispatch_idle:.2f}s "
          f"between shards while one was prepared and waiting (hand-over: driver round trip, finish submit, inputs "
          f"into the actor), {new.starved_idle:.2f}s starved ({new.starved_gaps} gaps with no shard prepared), "
          f"{new.tail:.2f}s after the last forward (the last shard's stage 3)")
    fixed, steady = new.startup + new.tail, new.steady_busy  # makespan ~ ideal / steady + fixed
    if steady <= TARGET_BUSY or 1 / steady >= TARGET_RATIO:
        print(f"  the steady state itself ({steady:.1%} busy) misses the targets")
        return
    need = max(fixed / (1 / TARGET_BUSY - 1 / steady), fixed / (TARGET_RATIO - 1 / steady))  # GPU seconds
    print(f"  the start and tail ({fixed:.2f}s) do not grow with the job: at {steady:.1%} steady busy both targets "
          f"hold from about {need:.0f}s of GPU work, ~{need / (new.ideal / images):.0f} images like these per GPU")


# ---------------------------------------------------------------------------- main


def bench_profile(profile: Profile, images: int, shard_size: int, designs: list[str], workdir: Path,
                  window: int | None) -> list[str]:
    """Run the designs on one generated collection; print their figures; return output problems."""
    collection = workdir / profile.name / "collection"
    make_collection(collection, images, shard_size)
    shards = -(-images // shard_size)
    print(f"\n== {profile.name}: {images} images, {shards} shards of {shard_size} ({sum(map(is_heavy, range(shards)))} "
          f"3x heavy); per image prepare {profile.prepare_ms} ms, forward {profile.forward_ms} ms, post "
          f"{profile.post_ms} ms; Ray: {DECLARED_CPUS} CPUs, {DECLARED_GPUS} GPU declared")
    rows: dict[str, Figures] = {}
    problems: list[str] = []
    for design in designs:
        base = workdir / profile.name / design
        try:
            if design == "new":
                run = run_new(collection, base, profile, shard_size, window)
            elif design == "old":
                run = run_old(collection, base, profile, shard_size)
            else:
                run = run_ray_data(collection, base, profile, shard_size)
        except Exception as exc:  # report and go on with the other designs
            import traceback

            traceback.print_exc()
            problems.append(f"{profile.name}/{design}: {type(exc).__name__}: {exc}")
            continue
        problems.extend(f"{profile.name}/{p}" for p in check_output(run, images))
        print(f"  {design}: {run.note}")
        rows[design] = figures(run, profile, images, shard_size)
    print_figures(list(rows.values()))
    print_verdict(rows, profile, images)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="images of the hed profile (openpose: 1/16 of it)")
    p.add_argument("--shard-size", type=int, default=32, help="images per shard (openpose: 1/8 of it)")
    p.add_argument("--profile", choices=("hed", "openpose", "both"), default="both")
    p.add_argument("--designs", default="new,old,raydata", help="comma-separated: new, old, raydata")
    p.add_argument("--window", type=int, default=None,
                   help="experiment: shards in flight in the new design (default: dispatch.run_job's cpus + 2*actors)")
    p.add_argument("--workdir", default="/tmp/gpu_pipeline_sim")
    args = p.parse_args(argv)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if set(designs) - {"new", "old", "raydata"}:
        p.error(f"--designs: unknown {sorted(set(designs) - {'new', 'old', 'raydata'})}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # annotate.run's progress bar: noise here
    start_ray(Path(args.workdir))
    problems: list[str] = []
    workdir = Path(args.workdir)
    for name in (("hed", "openpose") if args.profile == "both" else (args.profile,)):
        images, shard_size = args.images, args.shard_size
        if name == "openpose":
            images, shard_size = max(1, images // 16), max(1, shard_size // 8)
        problems += bench_profile(PROFILES[name], images, shard_size, designs, workdir, args.window)
    print("\noutputs checked: " + ("every design wrote every image once, status ok, with a map"
                                   if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
