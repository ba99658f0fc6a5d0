"""All of the job's Ray glue: tasks, the model-actor pool, dispatch and retries.

CPU-only jobs run one task per shard (``annotate_shard``: every stage in one call). Jobs with a
model annotator run in three stages so the GPU never waits on the CPU::

    prepare task (CPU)  ->  ModelWorker.forward (actor, GPU)  ->  finish task (CPU, commits the shard)

Prepared shards queue ahead of the actors, and the next one goes to whichever actor is free (one
shard in flight per actor, so a heavy shard never holds up work another actor could take). The
driver only ever fetches small receipts; the images and maps flow between stages through Ray's
object store. Work goes out in a bounded window (never all shards at once, so ``ray.wait`` and
the object store stay small however many shards there are). A shard that fails at any stage
(its task raised, its worker or actor died) starts again from stage 1, up to ``max_retries``
times (a crashed actor restarts and reloads its weights); a shard that keeps failing is reported
alone, by name, and the others go on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Any, Callable, Iterator

from manifests.sink import ShardStats
from pipeline.plan import ShardSpec
from pipeline.shard import INPUT_NOTE, ModelWorker, ShardJob, annotate_shard, finish_shard, prepare_shard

log = logging.getLogger("annotate")


@dataclasses.dataclass
class ShardResult:
    """What became of one shard: its stats, or why it failed after every attempt."""

    spec: ShardSpec
    stat: ShardStats | None
    error: str | None = None
    attempts: int = 1


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """Model workers and what each one holds, and the CPUs each prepare/finish task asks for."""

    actors: int
    cpus: float
    gpus: float
    task_cpus: float = 1.0


def pool_size(concurrency: int | None, gpus_per_worker: float | None, cpus_per_worker: int) -> PoolSize:
    """``concurrency`` actors, else one per GPU (or per ``gpus_per_worker`` share), else one per
    CPU worker's worth of CPUs; warns when the cluster cannot hold them all."""
    import ray

    resources = ray.cluster_resources()
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if concurrency is not None:
        size = concurrency
    elif gpus > 0:
        size = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        # On CPUs, leave room for the prepare and finish tasks beside the actors.
        size = max(1, int(resources.get("CPU", 1) // (2 * cpus_per_worker)))
    if size * gpus > resources.get("GPU", 0):
        log.warning("%d workers x %g GPU exceed the cluster's %s GPU: the extra workers wait for an autoscaler "
                    "to add nodes", size, gpus, resources.get("GPU", 0))
    return share_cpus(size, cpus_per_worker, gpus, float(resources.get("CPU", 1)))


def share_cpus(actors: int, cpus_per_worker: int, gpus: float, total_cpus: float) -> PoolSize:
    """Leave CPUs for the prepare and finish tasks: actors that would take every CPU would wait
    forever for stages that cannot be scheduled, so their reservation shrinks (with a warning)."""
    actor_cpus: float = cpus_per_worker
    task_cpus = 1.0 if total_cpus >= 2 else total_cpus / 2
    if actors * actor_cpus > total_cpus - task_cpus:
        actor_cpus = max(0.01, (total_cpus - task_cpus) / actors)
        log.warning("%d workers x %d CPU leave no CPU for the prepare/finish tasks on %g CPUs: each worker "
                    "reserves %.2f CPU instead", actors, cpus_per_worker, total_cpus, actor_cpus)
    return PoolSize(actors, actor_cpus, gpus, task_cpus)


def run_job(job: ShardJob, todo: list[ShardSpec], uses_model: bool, pool: PoolSize | None,
            max_retries: int) -> Iterator[ShardResult]:
    """Annotate ``todo`` on the connected Ray cluster; yields each shard's result as it ends."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    job_ref = ray.put(job)
    if not uses_model:
        task = ray.remote(num_cpus=1, max_retries=0)(annotate_shard)  # retries are the dispatcher's
        yield from run_as_tasks(lambda spec: task.remote(job_ref, spec), todo, 2 * cpus, max_retries)
        return
    assert pool is not None
    # A crashed actor restarts (reloading its weights); the dispatcher resubmits its shard.
    actor_cls = ray.remote(num_cpus=pool.cpus, num_gpus=pool.gpus, max_restarts=-1,
                           max_task_retries=0)(ModelWorker)
    actors = [actor_cls.remote(job) for _ in range(pool.actors)]  # by value: a restart needs its arguments
    prepare = ray.remote(num_cpus=pool.task_cpus, max_retries=0, num_returns=3)(prepare_shard)
    finish = ray.remote(num_cpus=pool.task_cpus, max_retries=0)(finish_shard)
    stages = Stages(
        prepare=lambda spec: prepare.remote(job_ref, spec),
        forward=lambda actor, index, inputs: actors[actor].forward.options(num_returns=2).remote(index, inputs),
        finish=lambda spec, prepared, outputs: finish.remote(job_ref, spec, prepared, outputs),
    )
    # Shards in flight across all stages: enough to keep every CPU and actor busy, bounded so the
    # object store holds a few shards' images, not the collection's.
    yield from run_staged(stages, pool.actors, todo, cpus + 2 * pool.actors, max_retries)


def run_as_tasks(submit: Callable[[ShardSpec], Any], todo: list[ShardSpec], window: int,
                 max_retries: int) -> Iterator[ShardResult]:
    """Run each shard as one task ``submit(spec)``, at most ``window`` at a time."""
    stages = Stages(prepare=None, forward=None, finish=None, whole=submit)
    yield from run_staged(stages, 0, todo, window, max_retries)


@dataclasses.dataclass
class Stages:
    """How to submit each stage (each returns Ray object refs; see ``run_staged``)."""

    prepare: Callable[[ShardSpec], Any] | None
    """spec -> (receipt, prepared, inputs) refs."""
    forward: Callable[[int, int, Any], Any] | None
    """(actor, shard index, inputs ref) -> (receipt, outputs) refs."""
    finish: Callable[[ShardSpec, Any, Any], Any] | None
    """(spec, prepared ref, outputs ref) -> stats ref."""
    whole: Callable[[ShardSpec], Any] | None = None
    """spec -> stats ref: the whole shard in one task (replaces the three stages)."""


@dataclasses.dataclass
class _Flight:
    """One shard on its way through the stages."""

    spec: ShardSpec
    attempt: int
    stage: str = "prepare"
    prepared: Any = None
    inputs: Any = None
    actor: int | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours the task names in its errors)."""
    return _ANSI.sub("", text)


def failure_reason(exc: BaseException) -> str:
    """One plain line saying why a shard failed: the exception its task raised (type and message, and
    the input file when the shard code noted it), not Ray's wrapper; for a worker or actor that died,
    Ray's own first line. The full traceback goes to the log."""
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception raised inside the task
    root = cause if isinstance(cause, BaseException) else exc
    lines = [line.strip() for line in plain(_message(root)).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if root is exc:  # Ray's own error: drop the task's name and process ("ray::annotate_shard() (pid=..)")
        message = re.sub(r"^ray::\S+\(\)\s*(\(pid=[^)]*\))?\s*", "", message)
    notes = getattr(root, "__notes__", None)
    files = [n for n in notes if isinstance(n, str) and n.startswith(INPUT_NOTE)] if isinstance(notes, list) else []
    message = _clip(" ".join(message.split()), REASON_CHARS)
    reason = f"{type(root).__name__}: {message}" if message else type(root).__name__
    if files:  # after the clip: a long message never pushes the file out of the line
        reason += f" ({_clip(' '.join(files[-1].split()), REASON_CHARS)})"
    return reason


#: Most characters of the message (and of the input file) in a failed shard's line.
REASON_CHARS = 400


def _message(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's own ``__str__`` raises (the shard's line must
    still be printed, not replaced by a traceback of the reporting)."""
    try:
        return str(exc)
    except Exception as inner:  # noqa: BLE001 - any failure of a foreign __str__
        return f"<message unavailable: its str() raised {type(inner).__name__}>"


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when it was cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def run_staged(stages: Stages, actors: int, todo: list[ShardSpec], window: int,
               max_retries: int) -> Iterator[ShardResult]:
    """Move every shard through the stages with at most ``window`` shards in flight and one
    forward call per actor; retry a failed shard from the start; yield each shard's outcome once."""
    import ray

    queue: collections.deque[tuple[ShardSpec, int]] = collections.deque((spec, 1) for spec in todo)
    waiting: collections.deque[_Flight] = collections.deque()  # prepared, for the next free actor
    free = collections.deque(range(actors))
    pending: dict[Any, _Flight] = {}  # the ref the driver waits on -> its shard
    in_flight = 0

    def start(flight: _Flight) -> None:
        if stages.whole is not None:
            flight.stage = "whole"
            pending[stages.whole(flight.spec)] = flight
        else:
            receipt, flight.prepared, flight.inputs = stages.prepare(flight.spec)
            pending[receipt] = flight

    while queue or pending or waiting:
        while queue and in_flight < window:
            spec, attempt = queue.popleft()
            start(_Flight(spec, attempt))
            in_flight += 1
        while waiting and free:
            flight = waiting.popleft()
            flight.stage, flight.actor = "forward", free.popleft()
            receipt, outputs = stages.forward(flight.actor, flight.spec.index, flight.inputs)
            flight.inputs = outputs  # the inputs ref is dropped: the actor has them
            pending[receipt] = flight
        [ref], _ = ray.wait(list(pending), num_returns=1)
        flight = pending.pop(ref)
        if flight.stage == "forward":
            free.append(flight.actor)
        try:
            value = ray.get(ref)
        except Exception as exc:  # the task raised, or its worker or actor died
            in_flight -= 1
            if flight.attempt <= max_retries:
                queue.appendleft((flight.spec, flight.attempt + 1))  # a restarted actor, or another, tries again
                continue
            log.error("shard %d failed %d times; the last failure:\n%s", flight.spec.index, flight.attempt,
                      plain(_message(exc)))
            yield ShardResult(flight.spec, None, failure_reason(exc), flight.attempt)
            continue
        if flight.stage == "prepare":
            flight.actor = None
            waiting.append(flight)
        elif flight.stage == "forward":
            flight.stage = "finish"
            pending[stages.finish(flight.spec, flight.prepared, flight.inputs)] = flight
            flight.prepared = flight.inputs = None
        else:
            in_flight -= 1
            yield ShardResult(flight.spec, value, attempts=flight.attempt)


def run_tasks(fn: Callable[..., Any], calls: list[tuple], window: int | None = None) -> list[Any]:
    """``fn(*args)`` for each of ``calls`` as Ray tasks (one CPU each, at most ``window`` in flight,
    default twice the cluster's CPUs); the results in order. A task whose worker died is retried by
    Ray (the duplicates pass's tasks overwrite their own files, so a retry is safe); one that raised
    fails the call with its error."""
    import ray

    if not calls:
        return []
    total = float(ray.cluster_resources().get("CPU", 1))
    # Half a CPU on a one-CPU Ray, as the shard tasks ask (share_cpus), so a task always fits.
    task = ray.remote(num_cpus=1.0 if total >= 2 else total / 2, max_retries=2)(fn)
    window = window or 2 * max(1, int(total))
    results: list[Any] = [None] * len(calls)
    pending: dict[Any, int] = {}
    queue = collections.deque(enumerate(calls))
    while queue or pending:
        while queue and len(pending) < window:
            index, args = queue.popleft()
            pending[task.remote(*args)] = index
        [ref], _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(ref)] = ray.get(ref)
    return results
