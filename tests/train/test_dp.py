"""Data parallelism trains what one rank trains: the same step of samples at TP2 x PP1 x DP2 and
TP1 x PP2 x DP2 gives the TP1 x PP1 x DP1 losses, token counts and gradient norms over three optimizer
steps (OPD sampled-token, OPD top-k forward KL, SFT) and the same loss after them."""
import json

import pytest

from helpers import WORKERS, torchrun

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2)]


@pytest.mark.slow
def test_dp2_layouts_train_like_one_rank(tmp_path, tiny_hf):
    for tp, pp, dp in LAYOUTS:
        torchrun(tp * pp * dp, [str(WORKERS / "dp_worker.py"), str(tp), str(pp), str(dp), str(tmp_path),
                                str(tiny_hf["qwen3"])])
    reports = {layout: json.loads((tmp_path / "dp-{}x{}x{}.json".format(*layout)).read_text()) for layout in LAYOUTS}
    reference = reports[(1, 1, 1)]
    assert list(reference) == ["opd_sampled_token", "opd_topk_forward_kl", "sft", "after"]
    assert reference["sft"]["tokens"] == 9 + 14 + 4 + 11 + 7 + 16 + 6 + 10  # every completion token, once
    assert reference["after"]["loss"] != reference["sft"]["loss"]  # the steps changed the weights
    for layout in LAYOUTS[1:]:
        for step, want in reference.items():
            got = reports[layout][step]
            assert got["tokens"] == want["tokens"], (layout, step)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (layout, step)
            if "grad_norm" in want:
                assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), (layout, step)
