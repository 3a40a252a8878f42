"""hierloc.geometry.hyperbolic at the scale of a global gazetteer: the pairwise distance never builds a (B, N, D)
tensor (the accuracy and gradient tests are in tests/geometry/test_hyperbolic.py).

The memory is measured in a fresh process, around the call alone: the peak RSS of the test session (ru_maxrss) would
depend on every test that ran before, and a fork's ru_maxrss starts from its parent's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

# The call's own peak, measured in a fresh interpreter: the kernel's high-water mark (VmHWM) is reset to the current
# RSS just before the call where Linux allows it (/proc/self/clear_refs, "5"), so peak - before is what the call
# added; where it does not, the process's peak since start is reported instead (inputs and torch included).
_SCRIPT = """
import json, re, torch
from hierloc.geometry import hyperbolic
torch.set_num_threads(1)  # the same work whatever the machine (and two spinning threads on a busy one are slower)

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))  # KiB

def ball_points(n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, dim, generator=gen)
    v /= v.norm(dim=-1, keepdim=True)
    return v * torch.rand(n, 1, generator=gen) * (1.0 - hyperbolic.ball_eps(torch.float32))

x, y = ball_points(64, 128, 0), ball_points(200_000, 128, 1)
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    reset = status("VmHWM") <= before + 1024
except OSError:
    reset = False
out = hyperbolic.pairwise_sqdist(x, y)
peak = status("VmHWM")
print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(out).all()), "reset": reset,
                  "before_kib": before, "peak_kib": peak}))
"""


@pytest.mark.integration  # a fresh interpreter at the scale of a global gazetteer
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_entity_table_never_materialises_a_broadcast_tensor():
    # A (B, N, D) float32 temporary would take 64 * 200_000 * 128 * 4 bytes = 6.5 GB; the matrix form needs the
    # (B, N) output (51 MB) and a few temporaries of that size or of y's (102 MB).
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [64, 200_000] and result["finite"]
    if result["reset"]:
        added_gb = (result["peak_kib"] - result["before_kib"]) / 2**20
        assert added_gb < 1.0, f"pairwise_sqdist added {added_gb:.2f} GB at its peak"
    else:  # no reset: the fresh process's peak, torch and the inputs included
        assert result["peak_kib"] / 2**20 < 4.0
