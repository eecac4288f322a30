"""Data parallelism trains what one rank trains: the same step of samples at TP2 x PP1 x DP2 and
TP1 x PP2 x DP2 gives the TP1 x PP1 x DP1 losses, token counts and gradient norms over three optimizer
steps (OPD sampled-token, OPD top-k forward KL, SFT) and the same loss after them."""
import pytest

from helpers import assert_trains_like, train_at_layouts

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2)]


@pytest.mark.slow
def test_dp2_layouts_train_like_one_rank(tmp_path, tiny_hf):
    layouts = [(tp, pp, dp, 1) for tp, pp, dp in LAYOUTS]
    reports = train_at_layouts(tmp_path, tiny_hf["qwen3"], layouts)
    for layout in layouts[1:]:
        assert_trains_like(reports[layout], reports[layouts[0]], layout)
