"""The CLI's side of chained tasks: ``--chain-success`` / ``--chain-failure`` on create
and update, and the chain and its triggers in what ``get`` and ``runs`` print."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

import asyncclick as click

P = ParamSpec("P")
T = TypeVar("T")


def chain_options(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``--chain-success ID``, ``--chain-failure ID`` (repeatable) and ``--no-chain``."""
    options = [
        click.option(
            "--chain-success",
            "chain_success",
            multiple=True,
            metavar="ID",
            help="Queue task ID when a run completes (repeatable; on update, replaces the list).",
        ),
        click.option(
            "--chain-failure",
            "chain_failure",
            multiple=True,
            metavar="ID",
            help="Queue task ID when a run fails for good, after its last attempt (repeatable).",
        ),
        click.option("--no-chain", is_flag=True, help="Remove the chain (update)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def chain_body(
    current: dict[str, Any] | None,
    *,
    chain_success: tuple[str, ...],
    chain_failure: tuple[str, ...],
    no_chain: bool,
) -> dict[str, Any] | None:
    """The task's ``chain`` with the options given over ``current`` (each list given
    replaces that list); ``None`` when none was given (nothing to change), ``{}`` to clear."""
    if no_chain:
        return {}
    if not chain_success and not chain_failure:
        return None
    chain = dict(current or {})
    if chain_success:
        chain["on_success"] = list(chain_success)
    if chain_failure:
        chain["on_failure"] = list(chain_failure)
    return chain


def chain_summary(chain: dict[str, Any] | None) -> str:
    """``on success: b, c; on failure: d``, or ``-``."""
    if not chain:
        return "-"
    parts = [
        f"on {event.removeprefix('on_')}: {', '.join(cast(list[str], ids))}"
        for event, ids in chain.items()
        if ids
    ]
    return "; ".join(parts) or "-"


def chain_notes(run: dict[str, Any]) -> list[str]:
    """What triggered a run and what its end triggered, a line each."""
    notes: list[str] = []
    by = run.get("triggered_by")
    if by:
        notes.append(f"triggered by {by['task_id']} run {by['run_id']}")
    for target in cast(list[dict[str, Any]], run.get("triggered") or []):
        queued = f" (run {target['run_id']})" if target.get("run_id") else ""
        notes.append(f"chain: {target['task_id']} {target['outcome']}{queued}")
    return notes


def triggered_by_note(run: dict[str, Any]) -> str:
    """A run list's note on what queued a run by chain, if anything did."""
    by = run.get("triggered_by")
    return f"chain: by {by['task_id']}" if by else ""
