"""MKL's reproducible mode (`e4t.seeding.reproducible_cpu_math`), in fresh processes: MKL reads it once, at start."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import sys, torch
from e4t.seeding import reproducible_cpu_math
if sys.argv[1] == "late":
    torch.ones(4, 4) @ torch.ones(4, 4)                     # MKL started before the call
state = reproducible_cpu_math()
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
go, x, w = (torch.randn(s, generator=g) for s in ((1, 1280, 1, 1), (1, 2560, 1, 1), (1280, 2560, 1, 1)))
# the input gradient of a convolution on a 1x1 map, one sample: the MKL SGEMM whose order varied run to run
grads = [torch.ops.aten.convolution_backward(go, x, w, [1280], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                             [True, False, False])[0] for _ in range(30)]
print(state, sum(not torch.equal(grads[0], g) for g in grads))
"""


def run(when):
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, when], capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONPATH": ROOT}, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL")
def test_reproducible_cpu_math_fixes_mkl_when_called_first_and_says_when_too_late():
    state, differ = run("first")
    if state == "None":
        pytest.skip("this torch build does not show MKL's state (only Linux builds do)")
    assert (state, differ) == ("True", 0)           # 30 repeats, two threads: bit-identical
    assert run("late")[0] == "False"
