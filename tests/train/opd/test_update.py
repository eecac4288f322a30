"""``opd_loss`` (the glue from a micro-batch to algo/) against plain-torch references, on vocabulary
shards at TP1 and TP4 (padded vocabulary columns included), values and gradients."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import WORKERS, torchrun

V, V_PAD, B, L, K = 10, 12, 3, 7, 10  # top-k = the whole vocabulary: every divergence is exact


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V_PAD, generator=g) * 2
    logits[..., V:] = 0.0  # megatron's padded rows give exactly 0, which a softmax must not see
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L)
    for b, start in enumerate((2, 3, 1)):
        mask[b, start: L - b] = 1.0  # prompt, completion, right padding
    teacher_table = torch.log_softmax(torch.randn(B, L, V, generator=g), -1)
    top_lp, top_ids = torch.sort(teacher_table, -1, descending=True)
    batch = {"input_ids": ids, "loss_mask": mask,
             "sampler_lp": (torch.log_softmax(logits[..., :V], -1).roll(1, 1).gather(-1, ids[..., None])[..., 0] - 0.1) * mask,
             "teacher_lp": teacher_table.roll(1, 1).gather(-1, ids[..., None])[..., 0] * mask,
             "task_adv": torch.zeros(B), "loss_w": torch.tensor([1.0, 0.5, 2.0]), "opd_weight": torch.ones(B),
             "top_ids": top_ids.roll(1, 1)[:, :, None], "top_lp": top_lp.roll(1, 1)[:, :, None], "top_w": torch.ones(B, L, 1)}
    return logits, batch


def _reference(kind, logits, batch):
    """Per-token loss sum and gradient, written out directly from the definitions."""
    logits = logits.clone().requires_grad_(True)
    s = torch.log_softmax(logits[:, :-1, :V], -1)
    targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    lp = s.gather(-1, targets[..., None])[..., 0]
    tis = torch.exp(lp.detach() - batch["sampler_lp"][:, 1:]).clamp(max=2.0)
    w = batch["loss_w"][:, None] * mask
    order = batch["top_ids"][:, 1:, 0]
    t = torch.empty_like(s).scatter_(-1, order, batch["top_lp"][:, 1:, 0])  # the teacher's full log-probs
    if kind == "sampled_token":  # ratio 1 at one epoch: -A * rho with rho's gradient, times TIS
        adv = (batch["teacher_lp"][:, 1:] - lp.detach()).clamp(-20, 20) * mask
        per = -adv * torch.exp(lp - lp.detach()) * tis
    elif kind == "topk_forward_kl":
        per = (t.exp() * (t - s)).sum(-1) * tis
    elif kind == "topk_reverse_kl":
        per = (s.exp() * (s - t)).sum(-1) * tis
    else:
        m = torch.log(0.5 * s.exp() + 0.5 * t.exp())
        per = (0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)) * tis
    loss = (per * w).sum()
    loss.backward()
    entropy = (-(s.exp() * s).sum(-1) * mask).sum().item()
    return loss.item(), logits.grad, (lp.detach() - batch["teacher_lp"][:, 1:]).mul(mask).sum().item(), entropy


@pytest.mark.parametrize("tp", [1, 4])  # TP4: a shard of real ids only, one of 1 real + 2 padded
@pytest.mark.slow
def test_opd_loss_matches_the_definitions_on_vocab_shards(tmp_path, tp):
    logits, batch = _batch()
    save_file({"logits": logits, **{k: v.contiguous() for k, v in batch.items()}}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab": V}))
    torchrun(tp, [str(WORKERS / "opd_loss_worker.py"), str(tp), str(tmp_path)])
    tokens = batch["loss_mask"][:, 1:].sum().item()
    for rank in range(tp):
        results = json.loads((tmp_path / f"results-{rank}.json").read_text())
        grads = load_file(str(tmp_path / f"grads-{rank}.safetensors"))
        for kind, got in results.items():
            loss, grad, kl, entropy = _reference(kind, logits, batch)
            assert got["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), kind
            assert got["tokens"] == tokens and got["kl_sum"] == pytest.approx(kl, rel=1e-5, abs=1e-6)
            assert got["entropy_sum"] == pytest.approx(entropy, rel=1e-5), kind
            shard = V_PAD // tp
            assert torch.allclose(grads[kind], grad[..., rank * shard:(rank + 1) * shard], atol=1e-6), kind
            assert not grads[kind][..., V - rank * shard:].abs().sum() if rank * shard + shard > V else True
        assert results["topk_forward_kl"]["topk_overlap_sum"] == pytest.approx(tokens)  # k = V: full overlap
