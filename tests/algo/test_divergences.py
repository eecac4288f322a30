"""The divergences (algo/divergences.py) against hand-computed values, bounds and autograd gradchecks."""
import math

import pytest
import torch

from megatron_opd.algo.divergences import generalized_jsd, kl, reverse_kl, topk_forward_kl_with_tail
from megatron_opd.algo.policy_loss import policy_gradient_loss

P_T = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)


P_S = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)


def topk_reverse_kl_support_matched(student_log: torch.Tensor, top_ids: torch.Tensor, top_teacher_log: torch.Tensor) -> torch.Tensor:
    """Reference: KL(S' || T') with both distributions renormalised over the teacher's top-k ("local
    support matching", Fu et al. 2026), from the full student log-probs: a differentiable loss, since a
    top-k "reward" that does not depend on the sampled token has zero expected policy gradient
    (miles #2362; test_support_matched_topk_has_signal_a_topk_reward_has_none). The loss itself
    (``loss.kind=topk_reverse_kl``) is computed on vocabulary shards by ``algo/vocab_parallel.py``,
    which tests/algo/test_vocab_parallel.py checks against this same definition."""
    return reverse_kl(torch.log_softmax(student_log.gather(-1, top_ids), -1), torch.log_softmax(top_teacher_log, -1))


def test_hand_computed_kl():
    # KL(S||T) = 0.5 ln(5/7) + 0.4 ln 2 = 0.10902; KL(T||S) = 0.7 ln 1.4 + 0.2 ln 0.5 = 0.09690
    assert reverse_kl(P_S.log(), P_T.log()).item() == pytest.approx(0.5 * math.log(5 / 7) + 0.4 * math.log(2), abs=1e-12)
    assert round(reverse_kl(P_S.log(), P_T.log()).item(), 3) == 0.109
    assert round(kl(P_T.log(), P_S.log()).item(), 3) == 0.097  # forward KL(T||S)
    assert reverse_kl(P_S.log(), P_S.log()).item() == 0.0


def test_topk_divergences_hand_computed():
    ids = torch.tensor([0, 1])  # teacher top-2 of P_T: 0.7, 0.2 (tail 0.1); student there: 0.5, 0.4 (tail 0.1)
    fkl = topk_forward_kl_with_tail(P_S.log(), ids, P_T.log()[ids])
    assert fkl.item() == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.4) + 0.0, abs=1e-9)
    # support matched: renormalised over {0, 1}: T' = (7/9, 2/9), S' = (5/9, 4/9)
    rkl = topk_reverse_kl_support_matched(P_S.log(), ids, P_T.log()[ids])
    assert rkl.item() == pytest.approx(5 / 9 * math.log(5 / 7) + 4 / 9 * math.log(4 / 2), abs=1e-9)
    full = torch.arange(3)  # top-k over the whole vocabulary: exact KLs
    assert topk_forward_kl_with_tail(P_S.log(), full, P_T.log()).item() == pytest.approx(kl(P_T.log(), P_S.log()).item(), abs=1e-6)
    assert topk_reverse_kl_support_matched(P_S.log(), full, P_T.log()).item() == pytest.approx(reverse_kl(P_S.log(), P_T.log()).item(), abs=1e-12)


def test_jsd_bounds_and_zero():
    g = torch.Generator().manual_seed(0)
    for beta in (0.1, 0.5, 0.9):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        s = torch.log_softmax(torch.randn(200, 7, generator=g, dtype=torch.float64) * 4, -1)
        t = torch.log_softmax(torch.randn(200, 7, generator=g, dtype=torch.float64) * 4, -1)
        jsd = generalized_jsd(s, t, beta)
        assert (jsd >= -1e-12).all() and (jsd <= bound + 1e-12).all()
        assert generalized_jsd(s, s, beta).abs().max() < 1e-12
        disjoint = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
        assert generalized_jsd(disjoint[0], disjoint[1], beta).item() == pytest.approx(bound, abs=1e-12)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.0)


def test_gradcheck_every_differentiable_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64, generator=g), -1)
    ids = torch.topk(teacher, 3, -1).indices
    top_t = teacher.gather(-1, ids)
    checks = {
        "reverse_kl": lambda x: reverse_kl(torch.log_softmax(x, -1), teacher),
        "forward_kl": lambda x: kl(teacher, torch.log_softmax(x, -1)),
        "topk_fkl": lambda x: topk_forward_kl_with_tail(torch.log_softmax(x, -1), ids, top_t),
        "topk_rkl": lambda x: topk_reverse_kl_support_matched(torch.log_softmax(x, -1), ids, top_t),
        "jsd": lambda x: generalized_jsd(torch.log_softmax(x, -1), teacher, 0.3),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (logits,)), name
    lp = torch.randn(2, 5, dtype=torch.float64, generator=g).clamp(max=-0.1).requires_grad_(True)
    old = (lp.detach() + 0.1 * torch.randn(2, 5, dtype=torch.float64, generator=g))
    adv = torch.randn(2, 5, dtype=torch.float64, generator=g)
    mask = torch.ones(2, 5, dtype=torch.float64)
    # ratios stay inside the clip range here, away from the kinks where the loss is not differentiable
    assert torch.autograd.gradcheck(lambda x: policy_gradient_loss(x, old, adv, mask, 0.5, 0.5, dual_clip=3.0)[0], (lp,))


def test_support_matched_topk_has_signal_a_topk_reward_has_none():
    logits = torch.log(P_S).clone().requires_grad_(True)
    ids = torch.tensor([0, 1])
    loss = topk_reverse_kl_support_matched(torch.log_softmax(logits, -1), ids, P_T.log()[ids])
    grad = torch.autograd.grad(loss, logits)[0]
    assert grad.abs().max() > 1e-3  # student and teacher disagree on the support: a real gradient
    # a per-position "reward" that does not depend on the sampled token (e.g. the top-k KL value used
    # as an advantage) has zero expected policy gradient: sum_y p(y) r grad log p(y) = r grad sum p = 0
    r = loss.detach()
    student = torch.log_softmax(logits, -1)
    expected_pg = torch.autograd.grad((student.exp().detach() * r * student).sum(), logits)[0]
    assert expected_pg.abs().max() < 1e-12


def test_topk_forward_kl_full_vocab_and_tiny_tails_have_finite_gradients():
    """A top-k covering the vocabulary (or leaving ~0 mass outside) must give finite gradients."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64, generator=g) * 8, -1)
    for k in (6, 5):
        ids = torch.topk(teacher, k, -1).indices
        loss = topk_forward_kl_with_tail(torch.log_softmax(logits, -1), ids, teacher.gather(-1, ids)).sum()
        grad = torch.autograd.grad(loss, logits)[0]
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), k
    full = torch.arange(6).expand(4, 6)
    exact = kl(teacher, torch.log_softmax(logits, -1))  # forward KL(T||S)
    assert torch.allclose(topk_forward_kl_with_tail(torch.log_softmax(logits, -1), full, teacher), exact)

