"""The CPU layer for megatron-core: scoped device rewriting, CPU-backed RNG tracker, layout checks."""
import subprocess
import sys

import pytest
import torch

from megatron_opd.platform.dist import ParallelLayoutError, check_layout

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")

SCRIPT = r"""
import torch
from megatron_opd.platform.cpu_compat import cpu_compat, install_cpu_patches

try:
    torch.zeros(2, device="cuda"); print("outside: no error")
except (RuntimeError, AssertionError):
    print("outside: cuda refused")
with cpu_compat():
    a = torch.zeros(2, device="cuda")
    b = torch.ones(3).cuda()
    c = torch.empty(4, device=torch.cuda.current_device())
    d = torch.ones(2).to("cuda:0", torch.float64)
    print("inside:", a.device, b.device, c.device, d.device, d.dtype, torch.ones(1).type())
print("after:", torch.ones(1).type())

from megatron.core.tensor_parallel import random as mrandom
from megatron_opd.platform import init_distributed
info = init_distributed(1, 1, seed=123)  # a lone process: private gloo rendezvous on 127.0.0.1
print("backend:", info.backend, info.world_size)
tracker = mrandom.get_cuda_rng_tracker()
torch.manual_seed(5); expected_outer = torch.rand(3)
torch.manual_seed(5)
with tracker.fork():
    first = torch.rand(3)
outer = torch.rand(3)
with tracker.fork():
    second = torch.rand(3)
print("outer_untouched:", torch.equal(outer, expected_outer))
print("tracker_advances:", not torch.equal(first, second))
mrandom.model_parallel_cuda_manual_seed(123)
with tracker.fork():
    again = torch.rand(3)
print("tracker_reproducible:", torch.equal(first, again))
"""


def test_cuda_calls_land_on_cpu_only_inside_the_scope():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert lines["outside"].strip() == "cuda refused"
    assert lines["inside"].split() == ["cpu", "cpu", "cpu", "cpu", "torch.float64", "torch.cuda.FloatTensor"]
    assert lines["after"].strip() == "torch.FloatTensor"
    assert lines["backend"].split() == ["gloo", "1"]
    assert lines["outer_untouched"].strip() == "True"  # forked model-parallel RNG leaves the default stream alone
    assert lines["tracker_advances"].strip() == "True"
    assert lines["tracker_reproducible"].strip() == "True"


def test_layout_must_match_process_count():
    check_layout(8, 2, 2, 2)
    with pytest.raises(ParallelLayoutError, match=r"tp\(2\) x pp\(2\) x dp\(1\) = 4 does not match the 2 process"):
        check_layout(2, 2, 2, 1)
    with pytest.raises(ParallelLayoutError, match="must be >= 1"):
        check_layout(1, 0, 1, 1)
