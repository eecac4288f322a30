"""Token sets for the top-k losses (teacher / student / union), by hand."""
import math

import pytest
import torch

from megatron_opd.algo.token_sets import ids_to_score, teacher_at, token_set
from megatron_opd.config import ConfigError, load_recipe
from helpers import REPO

INF = float("-inf")


def test_union_marks_the_student_ids_the_teacher_already_has():
    t_ids = torch.tensor([[4, 1], [0, 2]])
    t_lp = torch.tensor([[-0.25, -2.5], [-0.75, -0.875]])
    s_ids = torch.tensor([[1, 3], [5, 6]])
    at_s = torch.tensor([[-2.5, -4.0], [-3.0, -3.5]])
    ids, lp = token_set("union", t_ids, t_lp, s_ids, at_s)
    assert ids.tolist() == [[4, 1, 1, 3], [0, 2, 5, 6]]
    assert lp.tolist() == [[-0.25, -2.5, INF, -4.0], [-0.75, -0.875, -3.0, -3.5]]  # id 1 counted once
    assert token_set("student", t_ids, t_lp, s_ids, at_s)[0] is s_ids
    assert token_set("teacher", t_ids, t_lp, None, None)[1] is t_lp
    with pytest.raises(ValueError, match="needs the student's top-k"):
        token_set("union", t_ids, t_lp, None, None)


def test_teacher_log_probs_are_picked_per_position_from_one_answer():
    student_top = torch.tensor([[7, 2], [2, 9], [9, 7]])
    scored = ids_to_score(student_top)
    assert scored == [2, 7, 9]
    answer = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]])  # [T, (2, 7, 9)]
    assert teacher_at(scored, answer, student_top).tolist() == [[-2.0, -1.0], [-4.0, -6.0], [-9.0, -8.0]]


def test_union_loss_by_hand():
    """Forward KL with the tail over the union {a, b, c} of the teacher's {a, b} and the student's {b, c}."""
    from megatron_opd.algo.vocab_parallel import VocabShard, per_position_losses

    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0]], dtype=torch.float64)  # ids 0..3
    t_ids, t_lp = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    s_ids, at_s = torch.tensor([[2, 0]]), torch.log(torch.tensor([[0.15, 0.5]], dtype=torch.float64))
    ids, lp = token_set("union", t_ids, t_lp, s_ids, at_s)
    features, _ = per_position_losses(logits, torch.tensor([2]), ids[:, None], lp[:, None], "topk_forward_kl",
                                      VocabShard.whole(4), metrics=False)
    s = torch.log_softmax(logits[0], -1).exp().tolist()
    t = {0: 0.5, 1: 0.3, 2: 0.15}
    tail_t, tail_s = 1 - sum(t.values()), s[3]
    want = sum(p * math.log(p / s[i]) for i, p in t.items()) + tail_t * math.log(tail_t / tail_s)
    assert features[0, 1].item() == pytest.approx(want, rel=1e-12)
    reverse, _ = per_position_losses(logits, torch.tensor([2]), ids[:, None], lp[:, None], "topk_reverse_kl",
                                     VocabShard.whole(4), metrics=False)
    z = sum(s[i] for i in t)
    zt = sum(t.values())
    want_r = sum(s[i] / z * math.log((s[i] / z) / (t[i] / zt)) for i in t)
    assert reverse[0, 1].item() == pytest.approx(want_r, rel=1e-12)


def test_token_set_validation_names_the_field():
    recipe = REPO / "recipes" / "tiny" / "opd_arith.yaml"
    with pytest.raises(ConfigError, match="loss.token_set 'union' is for the top-k losses"):
        load_recipe(recipe, ["loss.kind=sampled_token", "loss.token_set=union"])
    with pytest.raises(ConfigError, match="set teachers.stream false"):
        load_recipe(recipe, ["loss.kind=topk_forward_kl", "loss.top_k=4", "loss.token_set=student", "teachers.stream=true"])
    cfg = load_recipe(recipe, ["loss.kind=jsd", "loss.top_k=4", "loss.token_set=union", "teachers.stream=false"])
    assert cfg.loss.token_set == "union"
