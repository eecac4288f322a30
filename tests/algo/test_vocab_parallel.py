"""Vocabulary-parallel losses (``algo.vocab_parallel``) against the full-vocabulary definitions of
``algo.divergences`` applied to the gathered logits: values, metrics and gradients at TP 1, 2, 4, a
vocabulary not divisible by TP (padded columns), top-k with and without a tail, the union of the
teacher's and the student's top-k (duplicates left out), chunked positions."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import WORKERS, torchrun
from megatron_opd.algo.divergences import generalized_jsd, reverse_kl, topk_forward_kl_with_tail
from megatron_opd.algo.token_sets import token_set
from megatron_opd.algo.vocab_parallel import VocabShard, chunked_features, log_mass_outside, log_normalizer

V, V_PAD, N, S, K, CHUNK = 37, 40, 23, 2, 6, 5  # 23 positions in chunks of 5: the last one short
# float64, so that 1e-6 separates a wrong reduction from rounding (fp32 rounding here is ~1e-6 on values ~10)


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V_PAD, generator=g, dtype=torch.float64) * 3
    logits[:, V:] = 0.0  # megatron's padded output rows give exactly 0
    teacher = torch.log_softmax(torch.randn(N, S, V, generator=g, dtype=torch.float64) * 3, -1)
    all_lp, all_ids = torch.sort(teacher, -1, descending=True)
    # the union with the student's own top-k (here: of slightly perturbed logits, as an engine's would be)
    student_ids = torch.topk(logits[:, :V] + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64), K, -1).indices
    union = [token_set("union", all_ids[:, s, :K], all_lp[:, s, :K], student_ids, teacher[:, s].gather(-1, student_ids))
             for s in range(S)]
    return {"logits": logits, "targets": torch.randint(0, V, (N,), generator=g),
            "top_ids": all_ids[..., :K].contiguous(), "top_lp": all_lp[..., :K].contiguous(),
            "all_ids": all_ids, "all_lp": all_lp, "weights": torch.randn(N, 1 + S, generator=g, dtype=torch.float64),
            "union_ids": torch.stack([u[0] for u in union], 1), "union_lp": torch.stack([u[1] for u in union], 1)}


def _divergence(kind, s, i, t):
    if kind == "topk_forward_kl":
        return topk_forward_kl_with_tail(s, i, t)
    if kind == "topk_reverse_kl":  # support matched: both renormalised over the ids
        return reverse_kl(torch.log_softmax(s.gather(-1, i), -1), torch.log_softmax(t, -1))
    return generalized_jsd(torch.log_softmax(s.gather(-1, i), -1), torch.log_softmax(t, -1))


def _reference(data, kind, ids, lps):
    """Features, metrics and gradient from the gathered real-vocabulary logits."""
    logits = data["logits"][:, :V].clone().requires_grad_(True)
    s = torch.log_softmax(logits, -1)
    columns = [s.gather(-1, data["targets"][:, None])[:, 0]]
    present = torch.isfinite(lps)
    for slot in range(S if kind != "sampled_token" else 0):
        i, t = ids[:, slot], lps[:, slot]
        if present.all():
            columns.append(_divergence(kind, s, i, t))
        else:  # position by position over its distinct ids only
            keep = present[:, slot]
            columns.append(torch.cat([_divergence(kind, s[n:n + 1], i[n, keep[n]][None], t[n, keep[n]][None])
                                      for n in range(N)]))
    features = torch.stack(columns, -1)
    (features * data["weights"][:, :features.shape[1]]).sum().backward()
    grad = torch.cat([logits.grad, torch.zeros(N, V_PAD - V, dtype=logits.dtype)], -1)
    entropy = -(s.exp() * s).sum(-1)
    if kind == "sampled_token" or ids.shape[-1] >= V:
        overlap = torch.ones(N, dtype=entropy.dtype)
    else:
        mine = torch.topk(s, ids.shape[-1], -1).indices
        overlap = torch.stack([torch.isin(a[p], b).to(entropy.dtype).mean()
                               for a, p, b in zip(ids[:, 0], present[:, 0], mine)])
    return features.detach(), torch.stack([entropy.detach(), overlap], -1), grad


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.slow
def test_vocab_parallel_losses_equal_the_full_vocabulary_ones(tmp_path, tp):
    data = _inputs()
    assert torch.isneginf(data["union_lp"]).any() and torch.isfinite(data["union_lp"][..., K:]).any()  # both kinds of slot
    save_file(data, str(tmp_path / "inputs.safetensors"))
    torchrun(tp, [str(WORKERS / "vocab_parallel_worker.py"), str(tp), str(tmp_path), str(V), str(CHUNK)])
    width = V_PAD // tp
    for rank in range(tp):
        got = load_file(str(tmp_path / f"out-{rank}.safetensors"))
        for key in sorted(k[:-len(".grad")] for k in got if k.endswith(".grad")):
            kind, name = key.split(".")
            ids, lps = data[f"{'top' if name == 'k' else name}_ids"], data[f"{'top' if name == 'k' else name}_lp"]
            features, metrics, grad = _reference(data, kind, ids, lps)
            assert torch.allclose(got[f"{key}.features"], features, atol=1e-6, rtol=0), key
            assert torch.allclose(got[f"{key}.metrics"], metrics, atol=1e-6, rtol=0), key
            shard_grad = grad[:, rank * width:(rank + 1) * width]
            assert torch.allclose(got[f"{key}.grad"], shard_grad, atol=1e-6, rtol=0), key
            padded = max(0, rank * width + width - V)
            assert not got[f"{key}.grad"][:, width - padded:].any(), "padded columns get no gradient"
            assert got[f"{key}.features"].abs().sum() > 0


def test_chunking_does_not_change_values_or_gradients():
    data = {k: v.float() if v.is_floating_point() else v for k, v in _inputs().items()}  # the training dtype
    results = []
    for chunk in (1, 7, N, 1000):
        logits = data["logits"].clone().requires_grad_(True)
        features, metrics = chunked_features(logits, data["targets"], data["top_ids"], data["top_lp"],
                                             "topk_forward_kl", VocabShard.whole(V), chunk)
        (features * data["weights"]).sum().backward()
        results.append((features.detach(), metrics, logits.grad))
    for features, metrics, grad in results[1:]:
        assert torch.allclose(features, results[0][0], atol=1e-7)
        assert torch.allclose(metrics, results[0][1], atol=1e-7) and torch.allclose(grad, results[0][2], atol=1e-7)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_features(data["logits"], data["targets"], None, None, "sampled_token", VocabShard.whole(V), 0)


def test_the_tail_is_summed_not_subtracted_and_stays_finite():
    """A top-k holding all but ~e^-110 of the student's mass: in fp32, 1 - (top-k mass) is 0 and
    exp(z - max) underflows for every id outside it; the tail, summed outside the top-k and shifted by
    its own max, is exact, and the loss and its gradient stay finite whether or not the teacher's
    tail counts."""
    logits = torch.full((1, 8), -110.0)
    logits[0, :4] = 0.0
    ids = torch.arange(4)[None]
    shard = VocabShard.whole(8)
    lse = log_normalizer(logits, shard)
    assert (1 - (logits[:, :4] - lse[:, None]).exp().sum(-1)).item() <= 0.0  # what subtracting would give
    expected = torch.logsumexp(torch.log_softmax(logits.double(), -1)[0, 4:], -1).item()  # log(4e-110/4) = -110
    assert (log_mass_outside(logits, ids, shard) - lse).item() == pytest.approx(expected, abs=1e-4)
    assert expected == pytest.approx(-110.0, abs=1e-6)
    for teacher_top in ([0.25, 0.25, 0.25, 0.2499], [0.25] * 4):  # a teacher tail of 1e-4, then of 0
        z = logits.clone().requires_grad_(True)
        t_log = torch.log(torch.tensor([[teacher_top]]))
        features, _ = chunked_features(z, torch.zeros(1, dtype=torch.long), ids[:, None], t_log, "topk_forward_kl", shard, 4)
        features[:, 1].sum().backward()
        assert torch.isfinite(features).all() and torch.isfinite(z.grad).all(), teacher_top


def test_chunked_loss_memory_does_not_grow_with_the_length():
    """The loss head's extra resident memory (read from the OS by the trainer's memory probe) stays at a
    few chunks whatever the number of positions: forward, and backward beyond the logits' gradient."""
    from megatron_opd.algo.vocab_parallel import VocabShard, chunked_features, positions_per_chunk
    from megatron_opd.train.memory import MemoryProbe

    width = 75968  # Qwen3's vocabulary over TP2: the size at which the allocator's heap grew with the chunk count
    extras = {}
    for n in (250, 2000):
        logits = torch.randn(n, width, requires_grad=True)
        targets = torch.randint(0, width, (n,))
        probe = MemoryProbe()

        def loss_fn(z, batch, targets=targets, n=n):
            features, _ = chunked_features(z, targets, None, None, "sampled_token", VocabShard.whole(width),
                                           positions_per_chunk(width, 16.0))
            return features[:, 0].sum(), torch.tensor(n), {}

        for _ in range(2):
            loss, _, _ = probe.wrap(loss_fn)(logits, {})
            loss.backward()
        grad_bytes = n * width * 4
        extras[n] = (probe.forward[-1], probe.backward[-1] - grad_bytes)
        assert len(probe.backward) == 2  # one reading per backward pass
    long_logits = 2000 * width * 4  # 580 MiB: growing with the length would show as a fraction of it
    assert extras[2000][0] < extras[250][0] + long_logits / 4, extras
    assert extras[2000][1] < extras[250][1] + long_logits / 4, extras
