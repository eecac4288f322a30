"""bf16 training the way megatron-core does it (Float16Module, mixed-precision optimizer with fp32 main
params), on CPU: five OPD steps agree with fp32 within bf16 tolerance, and the engine gets exactly the
trained weights."""
import json

import pytest

from helpers import REPO, WORKERS, torchrun


@pytest.mark.slow
def test_bf16_trains_like_fp32_and_syncs_the_trained_weights(tmp_path):
    student = REPO / "assets" / "tiny" / "student_init"  # the tiny world's Qwen3 (tied embeddings)
    for dtype in ("float32", "bfloat16"):
        torchrun(2, [str(WORKERS / "bf16_worker.py"), "2", "1", dtype, str(tmp_path), str(student)])
    fp32 = json.loads((tmp_path / "float32-tp2pp1.json").read_text())
    bf16 = json.loads((tmp_path / "bfloat16-tp2pp1.json").read_text())
    assert fp32["param_dtypes"] == ["torch.float32"] and fp32["optimizer"] == ["FP32Optimizer"]
    assert bf16["param_dtypes"] == ["torch.bfloat16"] and bf16["optimizer"] == ["Float16OptimizerWithFloat16Params"]
    assert bf16["main_dtypes"] == ["torch.float32"]
    assert bf16["main_params_round_to_model"] and bf16["main_params_carry_more_than_bf16"]
    assert len(bf16["loss"]) == len(fp32["loss"]) == 5
    assert fp32["loss"][2] < fp32["loss"][1] < fp32["loss"][0]  # the sampled-token steps train
    for step, (a, b) in enumerate(zip(fp32["loss"], bf16["loss"]), 1):
        assert b == pytest.approx(a, rel=2e-2), (step, a, b)
    assert bf16["engine_params_compared"] > 10 and bf16["engine_mismatched_params"] == []
