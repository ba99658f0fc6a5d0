"""Ray glue: run shard specs on tasks or on a pool of model actors, dispatching to whoever is free.

Shards go out in a bounded window (never all at once, so ``ray.wait`` and the object store stay
small however many shards there are): one shard in flight per model actor, so a free actor gets
the next shard at once and an actor busy with a heavy shard is not handed more; a few per CPU for
tasks. A shard whose task or actor fails is resubmitted up to ``max_retries`` times (a crashed
actor restarts and reloads its weights); a shard that keeps failing is reported alone, by name,
and the others go on.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class ShardResult:
    """What became of one shard: its stats, or why it failed after every attempt."""

    spec: dict[str, Any]
    stat: dict[str, Any] | None
    error: str | None = None
    attempts: int = 1


def run_on_actors(actor_factory: Callable[[], Any], size: int, todo: list[dict], max_retries: int,
                  ) -> Iterator[ShardResult]:
    """Run ``todo`` on ``size`` actors (made by ``actor_factory``, each with a ``run(spec)`` method),
    one shard in flight per actor; yields results as shards finish."""
    actors = [actor_factory() for _ in range(size)]
    yield from _dispatch(todo, list(range(size)), lambda spec, slot: actors[slot].run.remote(spec), max_retries)


def run_as_tasks(task: Any, job_ref: Any, todo: list[dict], window: int, max_retries: int) -> Iterator[ShardResult]:
    """Run ``todo`` as Ray tasks ``task.remote(job_ref, spec)``, at most ``window`` at a time."""
    yield from _dispatch(todo, list(range(window)), lambda spec, _slot: task.remote(job_ref, spec), max_retries)


def _dispatch(todo: list[dict], slots: list[int], submit: Callable[[dict, int], Any],
              max_retries: int) -> Iterator[ShardResult]:
    """Keep every slot busy with the next shard; retry failures; yield each shard's outcome once."""
    import ray

    queue: collections.deque[tuple[dict, int]] = collections.deque((spec, 1) for spec in todo)
    free = collections.deque(slots)
    pending: dict[Any, tuple[dict, int, int]] = {}
    while queue or pending:
        while queue and free:
            spec, attempt = queue.popleft()
            slot = free.popleft()
            pending[submit(spec, slot)] = (spec, attempt, slot)
        [ref], _ = ray.wait(list(pending), num_returns=1)
        spec, attempt, slot = pending.pop(ref)
        free.append(slot)
        try:
            stat = ray.get(ref)
        except Exception as exc:  # the task raised, or its worker or actor died
            if attempt <= max_retries:
                queue.appendleft((spec, attempt + 1))  # a restarted actor, or another slot, tries again
                continue
            first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
            yield ShardResult(spec, None, f"{type(exc).__name__}: {first_line.strip()[:300]}", attempts=attempt)
            continue
        yield ShardResult(spec, stat, attempts=attempt)
