"""torchrun worker: build a Qwen3-MoE student at (tp, pp, ep), load its HF weights, save its logits on fixed
tokens (the last stage) and its exported HF weights (rank 0). With a sixth argument ``replay`` the forward
replays the experts in ``routed.pt`` [b, s, layers, k] (routing replay), and each rank saves how many tokens
each of its experts received, per layer; with ``aux`` the model runs a training forward-backward with the
load-balancing and z losses on and rank 0 saves the routers' losses (``router_losses.json``)."""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_opd.model import build_model, export_hf_weights, load_hf_config, load_hf_weights
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import init_distributed
from megatron_opd.records import TokenBatch

tp, pp, ep, hf_dir, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
replay, aux = sys.argv[6:] == ["replay"], sys.argv[6:] == ["aux"]
init_distributed(tp, pp, int(os.environ["WORLD_SIZE"]) // (tp * pp), ep=ep)
from megatron.core import parallel_state as ps  # noqa: E402


@dataclass
class RoutedBatch(TokenBatch):
    routed: torch.Tensor


losses = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001) if aux else {}
# as the trainer builds it: no random init, every weight loaded next (a weight left unloaded breaks the logits)
bundle = build_model(load_hf_config(hf_dir), vocab_divisible_by=8, initialize=False, moe_enable_routing_replay=replay,
                     **losses)
load_hf_weights(bundle, hf_dir)
for chunk in bundle.chunks:
    chunk.eval()
input_ids = torch.load(out / "input_ids.pt", weights_only=True)
batch = RoutedBatch(input_ids, torch.load(out / "routed.pt", weights_only=True)) if replay else TokenBatch(input_ids)
seen = []
received = {}  # global layer number -> tokens per local expert, as the experts' forward was given them
for module in bundle.chunks[0].modules():
    if type(module).__name__ == "MoELayer":
        def count(experts, args, layer=module.layer_number):
            received[layer] = args[1].tolist()
        module.experts.register_forward_pre_hook(count)


def keep_logits(logits, batch):
    logits = logits.detach()
    if tp > 1:  # each TP rank holds a slice of the vocabulary
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, -1)
    rows, width = input_ids.shape  # less the column run_pipeline pads for sequence parallelism at TP 2
    seen.append(logits[:rows, :width, :bundle.vocab_size].clone())
    return logits.sum() * 0, torch.tensor(1), {}


if aux:
    import json

    from megatron_opd.model.moe import router_losses

    for chunk in bundle.chunks:
        chunk.train()
    run_pipeline(bundle.chunks, [batch], lambda logits, b: (logits.float().mean(), torch.tensor(1), {}), forward_only=False)
    found = router_losses(1)
    if dist.get_rank() == 0:
        (out / "router_losses.json").write_text(json.dumps(found))
    from megatron_opd.platform import destroy

    destroy()
    sys.exit(0)
run_pipeline(bundle.chunks, [batch], keep_logits, forward_only=True)
if replay:
    import json

    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank(),
             ps.get_tensor_model_parallel_rank())
    (out / "received-pp{}-ep{}-dp{}-tp{}.json".format(*ranks)).write_text(json.dumps(received))
if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
    save_file({"logits": seen[0].contiguous()}, str(out / "logits.safetensors"))
exported = [(name, t.clone()) for name, t in export_hf_weights(bundle)]
if dist.get_rank() == 0:
    (out / "names.txt").write_text("\n".join(n for n, _ in exported))
    save_file({n: t.contiguous() for n, t in exported if n != "lm_head.weight" or not bundle.hf_config.tie_word_embeddings},
              str(out / "exported.safetensors"))

from megatron_opd.platform import destroy  # noqa: E402

destroy()
