"""Chained tasks: a task's ``chain`` names the tasks its run queues when it ends for good.

A run ends for good when no attempt follows it: it completed, or it failed with no
retry left. Its ``chain.on_success`` or ``chain.on_failure`` targets are then triggered
in the same atomic commit that records the end (``TaskChange.chained``), so a crash
can neither lose nor double a trigger: either the end and every trigger are stored, or
none is and the end is recorded again. Each target is read, planned (``trigger``) and
committed at the revision it was read at; a target that changed meanwhile makes the
whole commit conflict and be planned again.

A target that is idle gets a queued run, as ``execute`` would give it; one that is
busy follows its ``overlap`` policy: ``queue`` remembers the trigger (``chain_waiting``)
and queues its run once the active run has ended (``release_waiting``), ``forbid``
records a skipped run. A target that no longer exists is recorded as ``missing``. The
triggering run records each outcome (``Run.triggered``); each run queued by a chain
records what queued it (``Run.triggered_by``).

At create and update, ``check_chain`` refuses a chain naming a task that does not exist,
one that loops (following ``on_success`` and ``on_failure`` through the stored tasks)
and one reaching more than ``MAX_CHAIN_REACH`` tasks. Two updates at once can still
close a loop that neither check saw; each triggered run counts the chain's steps so far
(``TriggeredBy.hops``), and past ``MAX_CHAIN_REACH`` of them the chain stops.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec

from app.domain import (
    ENTROPY,
    Chain,
    ChainOutcome,
    ChainTriggered,
    DomainError,
    Entropy,
    OverlapPolicy,
    Run,
    RunStatus,
    Task,
    Transition,
    TriggeredBy,
    UnreadableTask,
    ended_runs,
    fired_ahead,
    queue_run,
    skipped_run,
    touch,
)
from app.ports import TaskChange, TaskStore

log = logging.getLogger(__name__)

MAX_CHAIN_REACH = 1000
"""Tasks a chain may reach, following its edges through the stored tasks: beyond that
it is refused (checking it would cost a read per task at every change). A run whose
chain has already taken more steps than this (``TriggeredBy.hops``) triggers nothing
more (``ChainOutcome.STOPPED``): only a loop is that long."""


class ChainRefused(DomainError):
    """A chain names a task that does not exist, loops, or reaches too many tasks."""


def chain_targets(chain: Chain | None) -> list[str]:
    """Every task ``chain`` names, once each, in order."""
    if chain is None:
        return []
    return list(dict.fromkeys([*chain.on_success, *chain.on_failure]))


def find_cycle(start: str, edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A shortest path of ``edges`` from ``start`` back to ``start`` (both ends listed),
    or ``None`` when there is none. Terminates whatever the graph (other cycles too)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in edges.get(node, ()):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return None


async def check_chain(store: TaskStore, task_id: str, chain: Chain | None) -> None:
    """Refuse (``ChainRefused``) a chain for task ``task_id`` that names a task that does
    not exist, loops back to ``task_id``, or reaches more than ``MAX_CHAIN_REACH`` tasks."""
    targets = chain_targets(chain)
    if not targets:
        return
    edges: dict[str, list[str]] = {task_id: targets}
    missing: list[str] = []
    unreadable: list[str] = []
    frontier = deque(targets)
    while frontier:
        node = frontier.popleft()
        if node in edges:
            continue
        if len(edges) >= MAX_CHAIN_REACH:
            raise ChainRefused(
                f"the chain of {task_id!r} reaches more than {MAX_CHAIN_REACH} tasks"
            )
        try:
            task = await store.get_task(node)
        except UnreadableTask:
            unreadable.append(node)  # its own chain cannot be read: it ends here
            task = None
        else:
            if task is None:
                missing.append(node)
        if task is None:
            edges[node] = []
            continue
        edges[node] = chain_targets(task.chain)
        frontier.extend(edges[node])
    gone = [target for target in targets if target in missing]
    if gone:
        raise ChainRefused(f"chain target(s) of {task_id!r} do not exist: {', '.join(gone)}")
    if spoiled := [target for target in targets if target in unreadable]:
        raise ChainRefused(
            f"chain target(s) of {task_id!r} are stored, but their documents cannot be "
            f"read: {', '.join(spoiled)}"
        )
    cycle = find_cycle(task_id, edges)
    if cycle is not None:
        raise ChainRefused(f"the chain of {task_id!r} loops: {' -> '.join(cycle)}")


def ended_for_good(transition: Transition) -> Run | None:
    """The run ``transition`` ends with no attempt after it: completed, or failed with no
    retry queued. A cancelled or skipped run triggers nothing."""
    for run in ended_runs(transition):
        if run.status == RunStatus.COMPLETED:
            return run
        if run.status == RunStatus.FAILED and not any(
            later.status == RunStatus.QUEUED and later.attempt > run.attempt
            for later in transition.runs
        ):
            return run
    return None


def _targets_of(transition: Transition) -> tuple[Run, list[str]] | None:
    ended = ended_for_good(transition)
    before = transition.before
    if ended is None or before is None or before.chain is None:
        return None
    chain = before.chain
    targets = chain.on_success if ended.status == RunStatus.COMPLETED else chain.on_failure
    return (ended, list(targets)) if targets else None


def release_waiting(transition: Transition, *, entropy: Entropy = ENTROPY) -> Transition:
    """``transition`` with the run a chain deferred queued once the task is idle again."""
    after = transition.after
    if after is None or after.chain_waiting is None or after.active_run is not None:
        return transition
    waiting = msgspec.structs.replace(after, chain_waiting=None)
    queued = queue_run(waiting, transition.at, entropy=entropy, triggered_by=after.chain_waiting)
    return dataclasses.replace(
        transition,
        after=queued.after,
        runs=(*transition.runs, *queued.runs),
        schedule=queued.schedule,
    )


def involves_chain(transition: Transition) -> bool:
    """Whether committing ``transition`` triggers a chain or releases a deferred trigger
    (it must then be committed through ``chained_change``)."""
    after = transition.after
    released = after is not None and after.chain_waiting is not None and after.active_run is None
    return released or _targets_of(transition) is not None


def trigger(
    target: Task,
    active: Run | None,
    by: TriggeredBy,
    now: datetime,
    *,
    entropy: Entropy = ENTROPY,
) -> tuple[Transition, ChainTriggered]:
    """What a chain's trigger does to ``target`` (``active``: its active run, if any; a
    fire dispatched ahead whose run cannot be read cannot be withdrawn, so the target
    counts as busy)."""
    if target.active_run is None or (fired_ahead(target, now) and active is not None):
        queued = queue_run(target, now, active, entropy=entropy, triggered_by=by)
        done = ChainTriggered(
            task_id=target.id, outcome=ChainOutcome.QUEUED, run_id=queued.run.run_id
        )
        return queued, done
    if target.overlap == OverlapPolicy.QUEUE and target.chain_waiting is None:
        return touch(target, now, chain_waiting=by), ChainTriggered(
            task_id=target.id, outcome=ChainOutcome.DEFERRED
        )
    why = (
        "a run triggered by a chain already waits"
        if target.chain_waiting is not None
        else f"overlap: run {target.active_run.run_id} had not ended"
    )
    skipped = skipped_run(
        target,
        now,
        f"chain: triggered by {by.task_id}/{by.run_id}, skipped: {why}",
        now,
        entropy,
        triggered_by=by,
    )
    noted = touch(target, now)
    done = ChainTriggered(task_id=target.id, outcome=ChainOutcome.SKIPPED, run_id=skipped.run_id)
    return dataclasses.replace(noted, runs=(skipped,)), done


async def chained_change(
    store: TaskStore, transition: Transition, *, entropy: Entropy = ENTROPY
) -> tuple[Transition, list[Transition]]:
    """``transition`` as it must be committed (a deferred trigger released, its ended run
    recording what it triggered) and the transitions of the targets it triggers, each
    planned from the target as read now."""
    transition = release_waiting(transition, entropy=entropy)
    found = _targets_of(transition)
    if found is None:
        return transition, []
    ended, targets = found
    hops = 1 if ended.triggered_by is None else ended.triggered_by.hops + 1
    if hops > MAX_CHAIN_REACH:
        # No chain that passed check_chain is this long without a loop: cut it here.
        log.warning(
            "chain of %r stopped after %d steps: it loops (run %s)",
            transition.task_id,
            hops - 1,
            ended.run_id,
        )
        stopped = [ChainTriggered(task_id=t, outcome=ChainOutcome.STOPPED) for t in targets]
        return _noting(transition, ended, stopped), []
    by = TriggeredBy(task_id=transition.task_id, run_id=ended.run_id, hops=hops)
    now = transition.at
    planned: list[Transition] = []
    triggered: list[ChainTriggered] = []
    read = await _read_targets(store, targets)
    for target_id, (target, active) in zip(targets, read, strict=True):
        if target is None or target_id == transition.task_id:
            # Itself: only a chain changed under a concurrent check can name it.
            outcome = ChainOutcome.MISSING if target is None else ChainOutcome.SKIPPED
            triggered.append(ChainTriggered(task_id=target_id, outcome=outcome))
            continue
        change, done = trigger(target, active, by, now, entropy=entropy)
        planned.append(change)
        triggered.append(done)
    return _noting(transition, ended, triggered), planned


def _noting(transition: Transition, ended: Run, triggered: list[ChainTriggered]) -> Transition:
    """``transition`` with its ended run recording what it ``triggered``."""
    noted = msgspec.structs.replace(ended, triggered=triggered)
    runs = tuple(noted if run.run_id == ended.run_id else run for run in transition.runs)
    return dataclasses.replace(transition, runs=runs)


async def _read_targets(
    store: TaskStore, task_ids: Sequence[str]
) -> list[tuple[Task | None, Run | None]]:
    """Each target and its active run, read together: every target in one round trip,
    then those with an active run with it in one more; one whose active run changed in
    between is read again on its own. An active run that is gone or cannot be read
    (``UnreadableRun``) is ``None``."""
    tasks = await store.get_tasks(task_ids)
    pairs = [
        (task.id, task.active_run.run_id)
        for task in tasks
        if task is not None and task.active_run is not None
    ]
    both = await store.get_tasks_and_runs(pairs)
    read = {task_id: pair for (task_id, _), pair in zip(pairs, both, strict=True)}
    found: list[tuple[Task | None, Run | None]] = []
    for task_id, task in zip(task_ids, tasks, strict=True):
        if task is None or task.active_run is None:
            found.append((task, None))
            continue
        fresh, run = read[task_id]
        if fresh is None or fresh.active_run is None:
            found.append((fresh, None))
        elif run is not None and run.run_id == fresh.active_run.run_id:
            found.append((fresh, run))
        elif fresh.active_run.run_id == task.active_run.run_id:
            # Still its active run, but gone or unreadable: reading it again cannot help.
            found.append((fresh, None))
        else:  # its active run changed between the two reads: read it again
            found.extend(await _read_targets(store, [task_id]))
    return found


def change_of(transition: Transition, targets: Sequence[Transition]) -> TaskChange:
    """The one atomic change committing ``transition`` with its chain's ``targets``."""
    return dataclasses.replace(
        TaskChange.of(transition), chained=tuple(TaskChange.of(t) for t in targets)
    )
