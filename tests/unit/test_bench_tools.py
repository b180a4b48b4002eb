"""What the benchmarks (``tests/bench``) measure with: if these are wrong, every figure
they print is wrong too."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from tests.bench.deployments import SPLIT, command_lines
from tests.bench.figures import family, memory_kib, percentile, reset_peak

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
