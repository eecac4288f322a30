"""torchrun worker: load an HF model at TP x PP, perturb it, sync to a server, probe the mismatch."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.model import build_model, export_hf_weights, load_hf_config, load_hf_weights, real_vocab_logprobs
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import init_distributed
from megatron_opd.rollout.http_client import SGLangClient
from megatron_opd.train.weight_sync import sync_weights_via_disk

tp, pp, hf_dir, url, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
init_distributed(tp, pp)
bundle = build_model(load_hf_config(hf_dir), vocab_divisible_by=8)
load_hf_weights(bundle, hf_dir)
with torch.no_grad():  # the "trained" student differs from what the server started with
    for p in bundle.model.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
rank = dist.get_rank()
client = SGLangClient(url) if rank == 0 else None
report = sync_weights_via_disk(bundle, [client] if client else [], "7", out / "sync")

# the student's own log-probs on a fixed batch, recomputed by megatron
seqs = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))


def collect(logits_shard, batch):
    lp = real_vocab_logprobs(logits_shard[:, :-1], batch["input_ids"][:, 1:], bundle.vocab_size)
    return lp.sum() * 0, torch.tensor(1), {"logprobs": lp}


results = run_pipeline(bundle.chunks, [{"input_ids": seqs}], collect, forward_only=True)
if results:
    torch.save(results[0]["logprobs"], out / f"student_logprobs_rank{rank}.pt")
exported = {name: t.clone() for name, t in export_hf_weights(bundle)}
if rank == 0:
    torch.save(exported, out / "trainer_weights.pt")
    (out / "report.json").write_text(json.dumps({"tensors": report.tensors, "bytes": report.bytes, "mb_per_s": report.mb_per_s}))
    torch.save(seqs, out / "seqs.pt")
