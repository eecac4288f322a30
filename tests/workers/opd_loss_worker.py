"""torchrun worker: ``opd_loss`` on vocab shards (TP ranks) of fixed logits, for each loss kind; every
rank writes its loss, metric sums and the gradient of its logits shard."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_opd.config import LossConfig
from megatron_opd.platform import init_distributed
from megatron_opd.platform.cpu_compat import cpu_compat
from megatron_opd.records import MicroBatch
from megatron_opd.train.opd.update import opd_loss

tp, out_dir = int(sys.argv[1]), Path(sys.argv[2])
info = init_distributed(tp, 1)
data = load_file(str(out_dir / "inputs.safetensors"))
vocab = int(json.loads((out_dir / "meta.json").read_text())["vocab"])
full = data.pop("logits")  # [B, L, V_pad]: the padded columns are 0, as megatron's are
rows, length = data["input_ids"].shape
micro = MicroBatch(**data, seq_len=torch.full((rows,), length), on_policy=torch.ones(rows, dtype=torch.uint8))  # all sampled
shard = full.shape[-1] // tp
rank = info.rank
results = {}
tensors = {}
for kind in ("sampled_token", "topk_forward_kl", "topk_reverse_kl", "jsd"):
    cfg = LossConfig(kind=kind, top_k=0 if kind == "sampled_token" else data["top_ids"].shape[-1])
    logits = full[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    with cpu_compat():  # as inside the pipeline schedule, where the loss runs
        loss, tokens, metrics = opd_loss(cfg, vocab, logits, micro)
        loss.backward()
    results[kind] = {"loss": loss.item(), "tokens": tokens.item(), **{k: float(v) for k, v in metrics.items()}}
    tensors[kind] = logits.grad.contiguous()
save_file(tensors, str(out_dir / f"grads-{rank}.safetensors"))
(out_dir / f"results-{rank}.json").write_text(json.dumps(results))

from megatron_opd.platform import destroy  # noqa: E402

destroy()
