"""torchrun worker: build the student at TP x PP from HF dirs and dump full logits for given ids."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_opd.model import build_model, gather_logits, load_hf_config, load_hf_weights
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import init_distributed
from megatron_opd.records import TokenBatch

tp, pp, out_dir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
hf_dirs = sys.argv[4:]
init_distributed(tp, pp)
input_ids = torch.load(out_dir / "input_ids.pt", weights_only=True)
for hf_dir in hf_dirs:
    bundle = build_model(load_hf_config(hf_dir), vocab_divisible_by=2, initialize=False)  # as the trainer builds it
    load_hf_weights(bundle, hf_dir)

    def collect(logits_shard, batch):
        return logits_shard.sum() * 0, torch.tensor(1), {"logits": gather_logits(logits_shard, bundle.vocab_size)}

    micro = [TokenBatch(input_ids[i : i + 2]) for i in range(0, len(input_ids), 2)]
    results = run_pipeline(bundle.chunks, micro, collect, forward_only=True)
    if results and dist.get_rank() == dist.get_world_size() - 1:
        logits = torch.cat([r["logits"] for r in results])
        save_file({"logits": logits.cpu().contiguous()}, str(out_dir / f"{Path(hf_dir).name}.safetensors"))
        layer = bundle.model.decoder.layers[0]
        kinds = {"core_attention": f"{type(layer.self_attention.core_attention).__module__}."
                                   f"{type(layer.self_attention.core_attention).__name__}"}
        (out_dir / f"{Path(hf_dir).name}.json").write_text(json.dumps({"padded_vocab": bundle.padded_vocab_size, "modules": kinds,
                                                                "backend": dist.get_backend()}))

from megatron_opd.platform import destroy  # noqa: E402

destroy()
