"""graftfl.core.allocator: freed buffers stay with the process, unless the user chose glibc's thresholds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graftfl.core.allocator import USER_VARIABLES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Three 3 MiB buffers alive at once, then freed: glibc's default thresholds give the freed top of
# the heap back to the kernel, and the next round faults every page in again.
PROBE = """
import resource, sys
from graftfl.core.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rounds(count):
    for _ in range(count):
        held = [bytearray(3 << 20) for _ in range(3)]
        del held
rounds(3)
before = faults()
rounds(20)
print(applied, (faults() - before) / 20)
"""


def probe(mode: str, **env) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={**clean, **env})
    applied, faults = out.stdout.split()
    return applied, float(faults)


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    _, default_faults = probe("default")
    applied, tuned_faults = probe("tuned")
    assert applied == "True"
    assert default_faults > 1000  # 9 MiB a round come back from the kernel: the cost this module removes
    assert tuned_faults < default_faults / 20


def test_thresholds_the_user_set_are_kept():
    applied, faults = probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    assert faults > 1000  # the user's (small) trim threshold still gives memory back
