"""Mixture-of-experts students (Qwen3-MoE) on top of mbridge's bridge, for :mod:`megatron_opd.model.bridge`.

Without transformer-engine megatron-core runs the experts as a ``SequentialMLP``
(``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight``, j local to this EP rank); mbridge maps only the
grouped-GEMM names (``mlp.experts.linear_fc1.weight{j}``), so the bridge methods here map the sequential ones,
number the experts globally over the expert-parallel ranks, and gather them for export.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron_opd.model.hf_config import num_experts
from megatron_opd.wire.client import RoutedShape

LOCAL_EXPERT = ".mlp.experts.local_experts."


def _renumbered(name: str, offset: int) -> str:
    """A SequentialMLP expert weight's name with its expert index moved by ``offset``."""
    head, tail = name.split(LOCAL_EXPERT)
    local, rest = tail.split(".", 1)
    return f"{head}{LOCAL_EXPERT}{int(local) + offset}.{rest}"


def expert_hf_names(name: str) -> list[str]:
    """HF names of a (global-numbered) SequentialMLP expert weight: fc1 = [gate; up], fc2 = down."""
    layer = name.split(".")[2]
    expert = name.split(LOCAL_EXPERT)[1].split(".")[0]
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    if name.endswith("linear_fc1.weight"):
        return [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"]
    if name.endswith("linear_fc2.weight"):
        return [f"{prefix}.down_proj.weight"]
    raise NotImplementedError(f"Unsupported parameter name: {name}")


def _moe_local_to_global(self: Any, model: torch.nn.Module, consider_ep: bool = True) -> dict[str, str]:
    names = super(type(self), self)._weight_name_mapping_mcore_local_to_global(model, consider_ep)
    if not consider_ep or self.mpu.ep_size == 1:
        return names
    offset = self.config.num_moe_experts // self.mpu.ep_size * self.mpu.ep_rank
    return {k: _renumbered(v, offset) if LOCAL_EXPERT in v else v for k, v in names.items()}


def _moe_mlp_names(self: Any, name: str) -> list[str]:
    if LOCAL_EXPERT in name:
        return expert_hf_names(name)
    return super(type(self), self)._weight_name_mapping_mlp(name)


def _moe_adjust_tied(self: Any) -> None:  # mbridge's Qwen2-MoE bridge ignores tie_word_embeddings
    if getattr(self.hf_config, "tie_word_embeddings", False):
        self._DIRECT_MAPPING["output_layer.weight"] = "model.embed_tokens.weight"


def _moe_tied_keys(self: Any) -> list[str]:
    return ["model.embed_tokens.weight"] if getattr(self.hf_config, "tie_word_embeddings", False) else []


MOE_BRIDGE_METHODS = {
    "_weight_name_mapping_mcore_local_to_global": _moe_local_to_global,
    "_weight_name_mapping_mlp": _moe_mlp_names,
    "_adjust_mapping_for_shared_weights": _moe_adjust_tied,
    "_get_hf_shared_weight_keys": _moe_tied_keys,
}


def moe_overrides(hf_config: Any, te: bool) -> dict[str, Any]:
    """megatron-core's MoE settings for a Qwen3-MoE config. HF routes by softmax over all experts, then top-k,
    renormalised over the k when ``norm_topk_prob``: megatron's top-k on the logits then a softmax over the k
    is the renormalised form (``moe_router_pre_softmax=False``), a softmax before the top-k the other."""
    if not num_experts(hf_config):
        return {}
    return dict(
        num_moe_experts=num_experts(hf_config),
        moe_router_pre_softmax=not getattr(hf_config, "norm_topk_prob", False),
        moe_router_dtype="fp32",  # HF's router softmax is in float32
        moe_shared_expert_overlap=False,
        moe_grouped_gemm=te,  # without transformer-engine: SequentialMLP (mapped above)
        moe_token_dispatcher_type="alltoall" if te else "allgather",  # gloo has no all_to_all
        # megatron-core refuses the allgather dispatcher with varying shapes (it gathers the EP ranks' tokens);
        # model.forward.run_pipeline still says when one pipeline run's micro-batches differ in shape
        **({} if te else {"variable_seq_lengths": False}),
    )


def router_without_te() -> None:
    """megatron-core 0.16.1's router GEMM names ``te_general_gemm``, defined only when transformer-engine
    imports: without it, ``None`` selects its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def export_expert(bridge: Any, local_name: str, param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Local expert j of every EP rank r is global expert j + r * experts_per_rank; at TP > 1 each expert is split
    over the TP ranks too (expert TP = TP), merged first."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        shards = [torch.empty_like(param) for _ in range(tp)]
        torch.distributed.all_gather(shards, param.contiguous(), group=ps.get_tensor_model_parallel_group())
        param = bridge._weight_merge_across_tp(local_name, shards, param)
    ep = ps.get_expert_model_parallel_world_size()
    per_rank = bridge.config.num_moe_experts // ep
    gathered = [torch.empty_like(param) for _ in range(ep)]
    torch.distributed.all_gather(gathered, param.contiguous(), group=ps.get_expert_model_parallel_group())
    for rank, tensor in enumerate(gathered):
        yield from zip(*bridge._weight_to_hf_format(_renumbered(local_name, rank * per_rank), tensor))


def routed_shape(hf_config: Any) -> RoutedShape:
    """What an MoE student's routed experts look like per token (routing replay asks the engine for them)."""
    return RoutedShape(hf_config.num_hidden_layers, hf_config.num_experts_per_tok, num_experts(hf_config))


def replay_routing(chunk: torch.nn.Module, routed: torch.Tensor | None) -> None:
    """Routing replay (megatron-core's ``RouterReplay``, built with ``moe_enable_routing_replay``): every router of
    ``chunk`` takes its layer's experts from ``routed`` [b, s, layers, top_k] (global layer index, the sampler's
    choice) in place of its own top-k; the router's scores still weight them (and carry the gradient). A token
    routed k times to one expert is padding: it gets experts 0..k-1. ``routed`` None: the routers choose again."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = [m for m in chunk.modules() if getattr(m, "router_replay", None) is not None]
    if routed is None:
        for router in routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
        return
    if not routers:
        raise ValueError("routing replay: this student's routers were not built to replay (a dense model, or "
                         "train.routing_replay off when the model was built)")
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    if get_model_config(chunk).sequence_parallel:  # the routers see this TP rank's shard of the sequence
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        shard = routed.shape[1] // tp
        routed = routed[:, rank * shard:(rank + 1) * shard]
    b, s, layers, k = routed.shape
    experts = routed.long().transpose(0, 1).reshape(s * b, layers, k)  # megatron's token order: [s, b] flattened
    if k > 1:
        padding = (experts == experts[..., :1]).all(-1, keepdim=True)
        experts = torch.where(padding, torch.arange(k, device=experts.device).expand_as(experts), experts)
    for router in routers:
        replay = router.router_replay
        replay.clear_indices()
        replay.set_target_indices(experts[:, router.layer_number - 1].contiguous())
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def router_losses(num_micro_batches: int) -> dict[str, float]:
    """The routers' auxiliary losses of the last forward-backward (megatron-core's tracker, unscaled by their
    coefficients: ``load_balancing_loss``, ``seq_load_balancing_loss``, ``global_load_balancing_loss``,
    ``z_loss``), each the mean over MoE layers and micro-batches; summed over pipeline stages (a collective
    over the PP group), then cleared. {} when no auxiliary loss is on."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    if tracker and ps.get_expert_model_parallel_world_size() > 1:  # every DP rank ran as many as the most (fillers)
        count = torch.tensor([num_micro_batches], dtype=torch.int64)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group())
        num_micro_batches = int(count)
    for name in sorted(tracker):
        values = tracker[name]["values"].detach().float().cpu()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        out[f"moe/{name}"] = float(values.sum()) / (len(values) * max(num_micro_batches, 1))
    clear_aux_losses_tracker()
    return out


def expert_load(routed: list[torch.Tensor], experts: int) -> dict[str, float]:
    """Each expert's share of the routed (token, layer, slot) picks in ``routed`` ([tokens, layers, k] each),
    and the imbalance: the busiest expert's share x the expert count (1 = perfectly even)."""
    counts = torch.zeros(experts, dtype=torch.long)
    for r in routed:
        counts += torch.bincount(r.long().flatten(), minlength=experts)[:experts]
    share = counts.double() / max(int(counts.sum()), 1)
    out = {f"moe/expert_load/{e:03d}": float(share[e]) for e in range(experts)}
    out["moe/load_imbalance"] = float(share.max()) * experts
    return out
