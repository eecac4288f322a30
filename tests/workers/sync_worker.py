"""torchrun worker: load an HF model at TP x PP, perturb it, sync to a server, probe the mismatch."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.model import build_model, export_hf_weights, load_hf_config, load_hf_weights
from megatron_opd.platform import init_distributed
from megatron_opd.wire.client import SGLangClient
from megatron_opd.train.weight_export import DiskSink, DistributedSink, mismatch_probe

tp, pp, hf_dir, url, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5]), sys.argv[6]
init_distributed(tp, pp)
bundle = build_model(load_hf_config(hf_dir), vocab_divisible_by=8)
load_hf_weights(bundle, hf_dir)
with torch.no_grad():  # the "trained" student differs from what the server started with
    for p in bundle.model.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
rank = dist.get_rank()
client = SGLangClient(url) if rank == 0 else None
if mode == "disk":
    report = DiskSink([client] if client else [], out / "sync", bucket_bytes=1 << 16).push(bundle, "7")
else:
    flattened = mode == "distributed_flat"  # SGLang's load_format="flattened_bucket"
    sink = DistributedSink([client] if client else [], bucket_bytes=1 << 16, flattened=flattened)
    report = sink.push(bundle, "9" if flattened else "8")
    sink.close()

# mismatch probe on a fixed batch: server log-probs vs the megatron student's recomputed ones
seqs = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
probe = mismatch_probe(bundle, client, seqs)
exported = {name: t.clone() for name, t in export_hf_weights(bundle)}
if rank == 0:
    torch.save(exported, out / "trainer_weights.pt")
    (out / "report.json").write_text(json.dumps({"tensors": report.tensors, "bytes": report.bytes,
                                                  "mb_per_s": report.mb_per_s, "probe": probe}))

from megatron_opd.platform import destroy  # noqa: E402

destroy()
