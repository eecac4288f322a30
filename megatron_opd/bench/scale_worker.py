"""One rank of ``opd bench scale``'s memory point (run by torchrun; see ``bench/scale.py``)."""

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


def main() -> None:
    from megatron_opd.algo.divergences import topk_forward_kl_with_tail
    from megatron_opd.algo.vocab_parallel import chunked_features, positions_per_chunk
    from megatron_opd.platform import destroy, init_distributed
    from megatron_opd.train.opd_loss import tp_vocab_shard

    spec = json.loads(sys.argv[1])
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
