"""One rank of an ``opd bench scale`` point (run by torchrun; see ``bench/scale.py``): the loss head's
memory at TP ranks, or the step batch's bytes received at DP ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def distribute_point(spec: dict) -> None:
    """DP ranks (TP1 x PP1): rank 0 builds one step of ``samples`` rollouts with teacher top-k and sends
    each replica its share through ``train.batches.distribute``; every rank reports the bytes it received."""
    from megatron_opd.platform import destroy, init_distributed
    from megatron_opd.records import Prompt, Rollout, SampleScores, TokenScores
    from megatron_opd.train.batches import distribute
    from megatron_opd.train.opd.step_maker import build_step_batch

    dp = int(os.environ["WORLD_SIZE"])
    info = init_distributed(1, 1, dp)
    batch, total = None, 0
    if info.rank == 0:
        g = torch.Generator().manual_seed(0)
        vocab, top_k = spec["vocab"], spec["top_k"]
        prompts, rollouts, scored = [], [], []
        for i in range(spec["samples"]):
            p, c = int(torch.randint(16, 49, (1,), generator=g)), int(torch.randint(8, 129, (1,), generator=g))
            prompts.append(Prompt(torch.randint(0, vocab, (p,), generator=g).tolist(), "d", row=i))
            rollouts.append(Rollout(prompts[-1].ids, torch.randint(0, vocab, (c,), generator=g).tolist(),
                                    (-torch.rand(c, generator=g)).tolist(), "stop", "step-0", i))
            top = TokenScores(-torch.rand(c, generator=g), torch.randint(0, vocab, (c, top_k), generator=g),
                              -torch.rand(c, top_k, generator=g))
            scored.append(SampleScores({"t": top}, {"t": torch.ones(c)}))
        batch = build_step_batch(prompts, rollouts, scored, "token", top_k)
        total = _wire_bytes(batch)
    share = distribute(batch, dp)
    received = 0 if info.rank == 0 else _wire_bytes(share)
    Path(spec["out"], f"rank-{info.rank}.json").write_text(json.dumps(
        {"received_bytes": received, "step_bytes": total, "samples": len(share)}))
    destroy()


def _wire_bytes(batch) -> int:
    from megatron_opd.records import encode_header

    header, tensors = batch.to_wire()
    return encode_header(header).numel() + sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("mode") == "distribute":
        distribute_point(spec)
    else:
        memory_point(spec)


def memory_point(spec: dict) -> None:
    from megatron_opd.algo.divergences import topk_forward_kl_with_tail
    from megatron_opd.algo.vocab_parallel import chunked_features, positions_per_chunk
    from megatron_opd.platform import destroy, init_distributed
    from megatron_opd.train.opd.update import tp_vocab_shard

    vocab, tokens, top_k, path = spec["vocab"], spec["tokens"], spec["top_k"], spec["path"]
    tp = int(os.environ["WORLD_SIZE"])
    info = init_distributed(tp, 1)
    width = -(-vocab // (128 * tp)) * 128  # megatron pads the vocabulary to a multiple of 128 x TP
    chunk = positions_per_chunk(width, spec["chunk_mib"])
    g = torch.Generator().manual_seed(0)  # the same targets and teacher on every TP rank, as in training
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    teacher_ids = torch.stack([torch.randperm(vocab, generator=g)[:top_k] for _ in range(8)])[torch.arange(tokens) % 8]
    teacher_lp = torch.log_softmax(torch.randn(tokens, top_k, generator=g), -1) - 0.5  # 40% of the mass in the tail
    logits = torch.randn(tokens, width, generator=torch.Generator().manual_seed(1 + info.rank))  # this rank's columns

    def run(n: int) -> None:
        shard = logits[:n].detach().requires_grad_(True)
        if path == "gathered":
            full = torch.log_softmax(shard[:, :vocab], -1)
            loss = topk_forward_kl_with_tail(full, teacher_ids[:n], teacher_lp[:n]).sum() + full.gather(
                -1, targets[:n, None]).sum()
        else:
            features, _ = chunked_features(shard, targets[:n], teacher_ids[:n, None], teacher_lp[:n, None],
                                           "topk_forward_kl", tp_vocab_shard(width, vocab), chunk)
            loss = features.sum()
        loss.backward()
        del shard, loss

    run(min(tokens, chunk))  # warm-up: kernels, thread pools, the collectives' buffers
    before = _status_kib("VmRSS")
    _reset_peak()
    run(tokens)
    extra = (_status_kib("VmHWM") - before) * 1024
    Path(spec["out"], f"rank-{info.rank}.json").write_text(json.dumps(
        {"shard_bytes": logits.numel() * logits.element_size(), "extra_bytes": extra}))
    destroy()


if __name__ == "__main__":
    main()
