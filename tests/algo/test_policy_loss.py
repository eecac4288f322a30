"""The clipped policy-gradient loss (algo/policy_loss.py): PPO clip, dual clip, truncated importance sampling, masks."""
import pytest
import torch

from megatron_opd.algo.policy_loss import policy_gradient_loss


def test_ppo_clip_dual_clip_and_tis_edge_cases():
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 5.0]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0, -2.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    loss, metrics = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.2)
    # ratio 1: -A; ratio 1.5 > 1.2 with A > 0: clipped at 1.2; ratio 0.5 < 0.8 with A < 0: clipped at 0.8;
    # ratio 5 with A < 0: unclipped (pessimistic) -5 * -1 = 5
    assert loss[0].tolist() == pytest.approx([-2.0, -2.4, 1.6, 5.0])
    loss.sum().backward()
    assert lp.grad[0, 1] == 0 and lp.grad[0, 2] == 0 and lp.grad[0, 0] != 0  # clipped tokens carry no gradient
    assert metrics["clipped_tokens"].item() == 3
    dual, _ = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.2, dual_clip=3.0)
    assert dual[0, 3].item() == pytest.approx(3.0)  # bounded by -c A
    sampler = torch.log(torch.tensor([[0.5, 1.0, 1.0, 1.0]], dtype=torch.float64))
    tis, m = policy_gradient_loss(lp, old, adv, mask, 0.2, 0.2, sampler_logprobs=sampler, tis_cap=1.5)
    assert tis[0, 0].item() == pytest.approx(-2.0 * 1.5)  # weight exp(0 - log 0.5) = 2, capped at 1.5
    assert m["tis_weight_sum"].item() == pytest.approx(1.5 + 3)
    masked, _ = policy_gradient_loss(lp, old, adv, torch.tensor([[1.0, 0, 0, 1.0]], dtype=torch.float64))
    assert masked[0, 1] == 0 and masked[0, 2] == 0

