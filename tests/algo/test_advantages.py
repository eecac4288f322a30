"""Per-token advantages (algo/advantages.py): the sampled-token estimator's gradient is the exact reverse-KL gradient; GRPO, discounting, teacher mixing and the GKD lambda by hand."""
import math

import pytest
import torch

from megatron_opd.algo.advantages import (
    combined_advantage,
    grpo_advantages,
    mix_teacher_logprobs,
    on_policy_prompts,
    sampled_token_advantage,
)
from megatron_opd.algo.divergences import reverse_kl


def test_sampled_token_estimator_gradient_equals_exact_reverse_kl_gradient():
    """E_{y~S}[-(log T(y) - log S(y)) grad log S(y)] = grad KL(S||T), checked by Monte Carlo."""
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -0.5, 1.2, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.tensor([1.0, 0.5, -0.3, 0.2, -2.0], dtype=torch.float64), -1)
    exact = torch.autograd.grad(reverse_kl(torch.log_softmax(logits, -1), teacher), logits)[0]
    n = 400_000
    student = torch.log_softmax(logits, -1)
    y = torch.multinomial(student.detach().exp(), n, replacement=True)
    adv = sampled_token_advantage(teacher[y][None], student.detach()[y][None], torch.ones(1, n, dtype=torch.float64))[0]
    per_sample = -(adv * student[y])
    estimate = torch.autograd.grad(per_sample.mean(), logits)[0]
    # standard error of the mean of each gradient coordinate
    jac = -adv[:, None] * (torch.nn.functional.one_hot(y, 5).double() - student.detach().exp()[None])
    stderr = jac.std(0) / math.sqrt(n)
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-9).all(), (estimate, exact, stderr)
    assert exact.abs().max() > 20 * stderr.max()  # the test has power: the gradient is far from 0


def test_advantages_grpo_discount_mix_and_gkd_lambda():
    t = torch.tensor([[-0.1, -0.2, -0.3]])
    s = torch.tensor([[-0.5, -0.2, -1.3]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert sampled_token_advantage(t, s, m).tolist() == [[pytest.approx(0.4), 0.0, 0.0]]
    assert sampled_token_advantage(t, s, torch.ones(1, 3), discount=0.5).tolist()[0] == pytest.approx([0.4 + 0.25 * 1.0, 0.5, 1.0])
    assert sampled_token_advantage(t, s, torch.ones(1, 3), clamp=0.3).tolist()[0] == pytest.approx([0.3, 0.0, 0.3])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = grpo_advantages(rewards)
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5) and adv[1].abs().max() == 0
    assert combined_advantage(torch.tensor([1.0, -1.0]), torch.ones(2, 3), 0.5).tolist() == [[1.5] * 3, [-0.5] * 3]
    w1, w2 = torch.tensor([0.25, 1.0]), torch.tensor([0.75, 0.0])
    assert mix_teacher_logprobs([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -5.0])], [w1, w2]).tolist() == [-2.5, -2.0]
    with pytest.raises(ValueError, match="sum to 1"):
        mix_teacher_logprobs([torch.zeros(2)], [torch.tensor([0.5, 1.0])])
    assert on_policy_prompts(1000, 0.0, torch.Generator().manual_seed(0)).sum() == 0
    assert on_policy_prompts(1000, 1.0, torch.Generator().manual_seed(0)).all()
    for count, lam, expected in [(8, 0.5, 4), (7, 0.5, 4), (32, 0.25, 8), (3, 0.1, 0)]:  # stratified: exactly round(lam n)
        masks = [on_policy_prompts(count, lam, torch.Generator().manual_seed(s)) for s in range(20)]
        assert all(int(m.sum()) == expected for m in masks)
        assert len({tuple(m.tolist()) for m in masks}) > 1 or expected in (0, count)  # which ones: drawn per step

