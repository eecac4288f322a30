"""torchrun worker: ``algo.vocab_parallel.chunked_features`` on this TP rank's vocabulary shard of
fixed logits, for each loss kind; writes the features, metrics and the gradient of the shard under a
fixed weighting of the features."""
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from megatron_opd.algo.vocab_parallel import chunked_features
from megatron_opd.platform import destroy, init_distributed
from megatron_opd.train.opd.update import tp_vocab_shard

tp, out_dir, vocab, chunk = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
info = init_distributed(tp, 1)
data = load_file(str(out_dir / "inputs.safetensors"))
width = data["logits"].shape[-1] // tp
rank = info.rank
out = {}
for kind in ("sampled_token", "topk_forward_kl", "topk_reverse_kl", "jsd"):
    for name, ids, lps in (("k", data["top_ids"], data["top_lp"]), ("all", data["all_ids"], data["all_lp"]),
                           ("union", data["union_ids"], data["union_lp"])):
        if kind == "sampled_token" and name != "k":
            continue
        shard = data["logits"][:, rank * width:(rank + 1) * width].clone().requires_grad_(True)
        top = (None, None) if kind == "sampled_token" else (ids, lps)
        features, metrics = chunked_features(shard, data["targets"], *top, kind, tp_vocab_shard(width, vocab), chunk)
        (features * data["weights"][:, :features.shape[1]]).sum().backward()
        out.update({f"{kind}.{name}.features": features.detach(), f"{kind}.{name}.metrics": metrics,
                    f"{kind}.{name}.grad": shard.grad})
save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / f"out-{rank}.safetensors"))
destroy()
