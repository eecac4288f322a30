"""`opd bench gpu`'s arithmetic and its refusal on a machine without CUDA (the run itself is
tools/gpu_check.sh's, on a GPU)."""
import pytest
import torch

from helpers import opd
from megatron_opd.bench.gpu import mfu, peak_bf16_tflops


def test_the_bf16_peak_is_found_by_the_device_name_longest_match_first():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_bf16_tflops("NVIDIA A10") == 125.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.0 and peak_bf16_tflops("NVIDIA L4") == 121.0
    assert peak_bf16_tflops("Some Future GPU") is None
    assert mfu(494.5e12, 989.0) == pytest.approx(0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_gpu_without_cuda_stops_at_once_saying_why(tmp_path):
    done = opd("bench", "gpu", "--out", str(tmp_path), check=False)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was made
