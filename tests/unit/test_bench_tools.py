"""What the benchmarks (``tests/bench``) measure with: if these are wrong, every figure
they print is wrong too."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from tests.bench.cpu_budget import (
    COMMANDS,
    REAPED,
    WATCHDOGS,
    WORKERS,
    Budget,
    Member,
    Row,
    Share,
    Snapshot,
    budget,
    comparison,
    table,
    taskq_shares,
)
from tests.bench.deployments import SPLIT, command_lines
from tests.bench.figures import (
    CLOCK_TICKS,
    CpuTicks,
    cpu_ticks,
    family,
    memory_kib,
    parse_stat,
    percentile,
    reset_peak,
)

MIB = 1024 * 1024


def test_a_deployment_is_one_process_per_plus_separated_command_line() -> None:
    assert command_lines("serve") == [["serve"]]
    assert command_lines("serve --processes 2") == [["serve", "--processes", "2"]]
    assert command_lines(SPLIT) == [
        ["serve", "--roles", "api,scheduler"],
        ["serve", "--roles", "consumer"],
        ["serve", "--roles", "consumer"],
    ]


@pytest.mark.parametrize("deployment", ["", "serve +", "+ serve", "serve + + serve"])
def test_a_deployment_with_an_empty_process_is_refused(deployment: str) -> None:
    with pytest.raises(ValueError, match="empty process"):
        command_lines(deployment)


def test_percentiles_are_nearest_rank_as_the_peer_benchmarks_compute_them() -> None:
    values = [float(n) for n in range(100, 0, -1)]  # 100 .. 1, unordered on purpose
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7


def test_a_reset_peak_forgets_memory_used_and_freed_before_it() -> None:
    me = os.getpid()
    held = b"x" * (64 * MIB)  # touched: resident
    del held  # a large block goes back to the system at once
    assert memory_kib(me, "VmHWM") - memory_kib(me) > 48 * 1024
    reset_peak(me)
    assert memory_kib(me, "VmHWM") - memory_kib(me) < 8 * 1024


async def test_a_family_is_a_process_and_its_python_descendants_not_the_commands() -> None:
    python_child = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(30)"])
    command_child = await anyio.open_process(["sleep", "30"], stdin=subprocess.DEVNULL)
    me = os.getpid()
    try:
        members = family(me)
        assert members[0] == me
        assert python_child.pid in members
        assert command_child.pid not in members
    finally:
        for child in (python_child, command_child):
            child.kill()
            await child.wait()


def test_cpu_times_are_read_past_a_process_name_holding_parentheses_and_spaces() -> None:
    stat = (
        "4242 (sh) (x y) S 1 4242 4242 0 -1 4194560 120 0 0 0 "
        "7 3 20 11 20 0 1 0 98765 2400000 200 18446744073709551615"
    )
    assert parse_stat(stat) == CpuTicks(own=10, reaped=31, started=98765)


async def test_a_child_s_cpu_reaches_its_parent_only_once_reaped() -> None:
    """Why long-lived children (consumer processes, watchdogs) are read directly."""
    burn = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    burn += "print('burnt', flush=True)\nsys.stdin.read()"
    me = os.getpid()
    before = cpu_ticks(me)
    child = await anyio.open_process([sys.executable, "-c", burn])
    assert child.stdout is not None and child.stdin is not None and before is not None
    with anyio.fail_after(30):
        await child.stdout.receive()
        burnt = cpu_ticks(child.pid)
        assert burnt is not None and burnt.own >= 0.3 * CLOCK_TICKS - 1
        running = cpu_ticks(me)
        assert running is not None and running.reaped == before.reaped
        await child.stdin.aclose()
        await child.wait()
    after = cpu_ticks(me)
    assert after is not None and after.reaped - before.reaped >= burnt.own
    await child.aclose()


def _serve(*args: str) -> tuple[str, ...]:
    return (".venv/bin/python3", ".venv/bin/taskq", "serve", *args)


WATCHDOG = (".venv/bin/python3", "-I", "/src/app/process_groups.py", "1.0", "TASKQ_WATCHDOG=x")


def test_taskq_serve_is_an_api_scheduler_parent_and_its_consumer_processes() -> None:
    members = {
        10: Member(1, _serve()),
        11: Member(10, _serve("--supervised")),
        12: Member(10, _serve("--supervised")),
        13: Member(11, WATCHDOG),
        14: Member(12, WATCHDOG),
    }
    assert taskq_shares([10], members) == [
        Share("api+scheduler (parent of consumers)", WORKERS, 10),
        Share("consumer 1 (own)", WORKERS, 11),
        Share(REAPED, COMMANDS, 11, reaped=True),
        Share(WATCHDOGS, WORKERS, 13),
        Share("consumer 2 (own)", WORKERS, 12),
        Share(REAPED, COMMANDS, 12, reaped=True),
        Share(WATCHDOGS, WORKERS, 14),
    ]


def test_a_taskq_process_with_a_watchdog_of_its_own_runs_the_commands_itself() -> None:
    members = {
        20: Member(1, _serve("--roles", "api,scheduler")),
        30: Member(1, _serve("--roles=consumer", "--processes", "1")),
        31: Member(30, WATCHDOG),
        40: Member(1, _serve("--roles", "consumer")),
        41: Member(40, _serve("--supervised")),
        42: Member(41, WATCHDOG),
    }
    rows = {(share.row, share.pid) for share in taskq_shares([20, 30, 40], members)}
    assert rows == {
        ("api+scheduler", 20),
        ("consumer (own)", 30),
        (REAPED, 30),
        (WATCHDOGS, 31),
        ("consumer (parent of consumers)", 40),
        ("consumer 1 (own)", 41),
        (REAPED, 41),
        (WATCHDOGS, 42),
    }


def _ticks(own: int, reaped: int = 0, started: int = 1) -> CpuTicks:
    return CpuTicks(own=own, reaped=reaped, started=started)


def test_a_budget_counts_the_phase_only_per_task_and_sums_a_row_over_its_processes() -> None:
    shares = [
        Share("consumer 1 (own)", WORKERS, 11),
        Share(REAPED, COMMANDS, 11, reaped=True),
        Share(WATCHDOGS, WORKERS, 13),
        Share(REAPED, COMMANDS, 12, reaped=True),
        Share("restarted", WORKERS, 14),
    ]
    before = Snapshot(
        0.0,
        machine_busy=1000,
        processes={11: _ticks(500, 40), 12: _ticks(7, 60), 13: _ticks(9), 14: _ticks(5)},
    )
    after = Snapshot(
        4.0,
        machine_busy=1000 + 100 + 50 + 20 + 1 + 3,
        processes={
            11: _ticks(500 + 100, 40 + 50),
            12: _ticks(7, 60 + 20),
            13: _ticks(9 + 1),
            14: _ticks(3, started=2),  # another process under the same pid
        },
    )
    measured = budget("taskq", 100, 4.0, shares, before, after, cores=2)
    ms = 1000 / CLOCK_TICKS / 100
    assert measured.rows == [
        Row("consumer 1 (own)", WORKERS, [11], 100 * ms),
        Row(WATCHDOGS, WORKERS, [13], 1 * ms),
        Row(REAPED, COMMANDS, [11, 12], (50 + 20) * ms),
    ]
    assert measured.total_ms == pytest.approx(171 * ms)
    assert measured.elsewhere_ms == pytest.approx(3 * ms)
    assert measured.ceiling == pytest.approx(2 * 1000 / (171 * ms))
    assert measured.notes == ["restarted: process 14 did not live through the phase"]


def test_a_table_left_aligns_names_and_right_aligns_figures() -> None:
    assert table(["role", "ms/task"], [["client", "0.5"], ["api+scheduler", "12.25"]]) == [
        "role           ms/task",
        "client             0.5",
        "api+scheduler    12.25",
    ]


def test_the_comparison_divides_each_part_by_celery_s() -> None:
    def system(label: str, workers: float, commands: float) -> Budget:
        rows = [Row("w", WORKERS, [1], workers), Row("c", COMMANDS, [2], commands)]
        return Budget(label, 1000, 2.0, rows, 0.0, cores=2)

    lines = comparison([system("taskq serve", 3.0, 1.0)], system("celery", 1.5, 0.5))
    cells = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert cells["scheduler+workers"] == ["3.000", "1.500", "2.00x"]
    assert cells["commands"] == ["1.000", "0.500", "2.00x"]
    assert cells["client"] == ["0.000", "0.000", "-"]
    assert cells["total"] == ["4.000", "2.000", "2.00x"]
    assert cells["ceiling"] == ["/s", "500", "1000", "0.50x"]
    assert cells["measured"] == ["/s", "500", "500", "1.00x"]
    assert lines[-1] == "  (#1 = taskq serve; celery = celery)"
