"""What the benches that measure one role on its own share: tasks stored due now, and
rounds alternating this checkout with another one (``--versus DIR``)."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from app.ports import Store
from app.schemas import TaskCreate
from app.service import TaskService

CHECKOUT = Path(__file__).resolve().parents[2]
CREATE_BATCH = 500


async def store_due_now(store: Store, count: int) -> None:
    """Store ``count`` tasks running ``true``, due now (ids ``t000000`` on), in bulk creates."""
    service = TaskService(store)
    now = datetime.now(UTC)
    for first in range(0, count, CREATE_BATCH):
        await service.create_each(
            [
                TaskCreate(id=f"t{n:06}", name="bench", command="true", scheduled_at=now)
                for n in range(first, min(count, first + CREATE_BATCH))
            ]
        )


def sides(versus: Path | None) -> dict[str, Path]:
    """The checkouts to measure: this one, and ``versus`` if given."""
    return {"this": CHECKOUT} | ({} if versus is None else {"other": versus})


def alternating(rounds: int, names: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(round, side) in the order to measure them: each round measures every side, the
    side that goes first alternating from round to round."""
    for round_number in range(1, rounds + 1):
        for name in names if round_number % 2 else list(reversed(names)):
            yield round_number, name


def print_means(per_side: Mapping[str, list[float]], where: Mapping[str, Path], what: str) -> None:
    """The mean of each side's figures (microseconds of ``what``) and, with two, their ratio."""
    means = {side: statistics.mean(values) for side, values in per_side.items()}
    for side, mean in means.items():
        print(f"  {side:5} mean {mean * 1e6:.0f} us CPU {what} ({where[side]})")
    if "other" in means:
        print(f"  this / other: {means['this'] / means['other']:.3f}x")
