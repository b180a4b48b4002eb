"""``tune_allocator``: a service process keeps big blocks out of the heap (glibc), each in
a fresh interpreter, so the test process's allocator is left as it is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.supervisor import MMAP_THRESHOLD, _is_glibc

pytestmark = pytest.mark.skipif(not _is_glibc(), reason="glibc's allocator only")

# Frees a mapped block (glibc then raises its threshold to that size), allocates one a
# little above MMAP_THRESHOLD, and prints how many blocks that mapped (mallinfo2).
PROBE = f"""
import ctypes, sys
from app.supervisor import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    tune_allocator()
freed = bytes(4 * {MMAP_THRESHOLD}); del freed
before = libc.mallinfo2().hblks
kept = bytes({MMAP_THRESHOLD} + 65536)
print(libc.mallinfo2().hblks - before)
"""


def mapped_blocks(mode: str, **env: str) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    finished = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=environment | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(finished.stdout)


def test_a_big_block_is_mapped_even_after_a_bigger_one_was_freed() -> None:
    assert mapped_blocks("plain") == 0, "glibc's own threshold rose: the probe shows it"
    assert mapped_blocks("tuned") == 1


def test_the_environment_s_own_threshold_is_left_alone() -> None:
    assert mapped_blocks("tuned", MALLOC_MMAP_THRESHOLD_=str(8 * MMAP_THRESHOLD)) == 0
