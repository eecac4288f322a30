"""HF <-> megatron-core through mbridge, kept behind this one module.

mbridge knows the name/layout mapping between HF Llama/Qwen2/Qwen3 checkpoints and a megatron-core
``GPTModel`` sharded over TP x PP. What this module adds (see shared PLATFORM.md):

* the non-TE ("local") layer spec when transformer-engine is absent; its layer norms are separate
  modules (``input_layernorm``, ``pre_mlp_layernorm``) so they need their own name mappings;
* a private copy of the name mappings per bridge: mbridge's tied-embedding bridges edit a dict that
  is shared by every bridge class, which corrupts a later untied bridge in the same process;
* vocab padding for TP (``make_vocab_size_divisible_by``), trimmed again on export;
* fusions and sequence parallelism off on CPU; fp32 by default;
* without transformer-engine, attention through torch's fused SDPA (:mod:`megatron_opd.model.attention`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_opd.model.hf_config import (
    UnsupportedArchitectureError, check_architecture, check_parallel_fit, num_experts, rope_arguments,
)
from megatron_opd.model.moe import (
    LOCAL_EXPERT, MOE_BRIDGE_METHODS, export_expert, moe_overrides, router_without_te,
)
from megatron_opd.platform.cpu_compat import cpu_compat, cuda_available, import_megatron_core

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)

_UNTIED_DIRECT = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LOCAL_SPEC_NORMS = {
    "other": {"input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]},
    "mlp": {"pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"]},
}


def load_backends() -> None:
    """Import megatron-core's model code and mbridge's registry: what every trainer process holds
    before it builds a model."""
    import_megatron_core()
    import mbridge  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401


def transformer_engine_available() -> bool:
    return cuda_available() and importlib.util.find_spec("transformer_engine") is not None


def load_hf_config(path: str | Path) -> Any:
    """Read ``config.json`` of an HF checkpoint and check we can build it."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not an HF checkpoint directory (no config.json)")
    hf_config = AutoConfig.from_pretrained(str(path))
    check_architecture(getattr(hf_config, "architectures", None), hf_config.model_type, where=str(path))
    written = rope_arguments(json.loads((path / "config.json").read_text()), where=str(path))["rotary_base"]
    read = getattr(hf_config, "rope_theta", None)  # what the installed transformers' models use: 4.x's attribute ...
    if read is None:  # ... or 5.x's
        read = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta")
    if read != written:  # transformers 4 reading a config written by 5 (rope_theta only inside rope_parameters)
        import transformers

        raise UnsupportedArchitectureError(f"{path}: config.json has RoPE theta {written:g}, but transformers "
                                           f"{transformers.__version__} reads {read:g} from it (a config written by "
                                           f"transformers 5); use transformers >= 5 or add \"rope_theta\": {written:g}")
    return hf_config


def save_hf_config(hf_config: Any, out_dir: Path) -> None:
    """``config.json`` that transformers 4 and 5 read alike: 5 writes RoPE only inside ``rope_parameters``,
    which 4 does not read (it would use theta 10,000), so the legacy ``rope_theta`` / ``rope_scaling`` are added."""
    hf_config.save_pretrained(str(out_dir))
    file = Path(out_dir) / "config.json"
    written = json.loads(file.read_text())
    if num_experts(hf_config) and "num_experts" not in written:  # transformers 5 writes num_local_experts only
        written["num_experts"] = num_experts(hf_config)
        file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    params = written.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in written:
        written["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default":
            written["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _bridge_class(model_type: str) -> type:
    import_megatron_core()
    import mbridge  # noqa: F401  (registers the model bridges)
    from mbridge.core.bridge import _MODEL_REGISTRY

    base = _MODEL_REGISTRY[model_type]
    attention = {k: list(v) for k, v in base._ATTENTION_MAPPING.items()}
    mlp = {k: list(v) for k, v in base._MLP_MAPPING.items()}
    other = {k: list(v) for k, v in base._OTHER_MAPPING.items()}
    if not transformer_engine_available():
        mlp = {**_LOCAL_SPEC_NORMS["mlp"], **mlp}
        other.update(_LOCAL_SPEC_NORMS["other"])

    def layer_spec(self: Any, vp_stage: int | None = None) -> Any:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        self.has_vp_stage = True
        te = transformer_engine_available()
        spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=te, vp_stage=vp_stage)
        if not te:  # fused attention instead of the local spec's unfused one (see model/attention.py)
            from megatron_opd.model.attention import SDPAttention

            for layer in spec.layer_specs:
                layer.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec

    def gptmodel_args(self: Any) -> dict[str, Any]:
        # RoPE from either transformers generation's config layout (mbridge reads 4.x's ``rope_theta``
        # only, and turns any ``rope_scaling`` into linear interpolation)
        return {"vocab_size": self.hf_config.vocab_size, "max_sequence_length": self.hf_config.max_position_embeddings,
                "position_embedding_type": "rope", **rope_arguments(self.hf_config.to_dict())}

    attrs = {
        "_DIRECT_MAPPING": dict(_UNTIED_DIRECT),
        "_ATTENTION_MAPPING": attention,
        "_MLP_MAPPING": mlp,
        "_OTHER_MAPPING": other,
        "_get_transformer_layer_spec": layer_spec,
        "_get_gptmodel_args": gptmodel_args,
    }
    if model_type == "qwen3_moe":
        attrs.update(MOE_BRIDGE_METHODS)
    return type(f"Opd{base.__name__}", (base,), attrs)


@dataclass
class ModelBundle:
    """A built student: its model chunks on this rank and the bridge that maps them to HF."""

    bridge: Any
    chunks: list[torch.nn.Module]
    hf_config: Any
    vocab_size: int
    padded_vocab_size: int

    @property
    def model(self) -> torch.nn.Module:
        return self.chunks[0]


def _cpu_overrides() -> dict[str, Any]:
    if cuda_available():
        return {}
    return dict(
        use_cpu_initialization=True,
        sequence_parallel=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def _leave_unset(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# megatron's init methods for the weight matrices, as no-ops (build_model's initialize=False)
_UNSET_WEIGHTS = dict(init_method=_leave_unset, output_layer_init_method=_leave_unset, embedding_init_method=_leave_unset)


def build_model(
    hf_config: Any,
    dtype: torch.dtype = torch.float32,
    vocab_divisible_by: int = 128,
    initialize: bool = True,
    **transformer_overrides: Any,
) -> ModelBundle:
    """Build this rank's GPTModel chunk for ``hf_config`` (random init unless ``initialize=False``).

    Needs :func:`megatron_opd.platform.init_distributed` first. ``transformer_overrides`` go to
    megatron's ``TransformerConfig`` (e.g. ``recompute_granularity``). ``initialize=False``: the weight
    matrices are left unset, for a caller that loads every weight next (HF or a checkpoint): the random draws
    it skips are about 40% of the build on CPU (measured, one thread: 1.9 s -> 1.1 s for two layers at Qwen3-0.6B's
    width with its 151,936-row embedding). Not megatron's ``perform_initialization=False``: that also skips
    marking the TP-sharded weights as such (their export and gradient norm then treat them as replicated).
    """
    from megatron.core import parallel_state, tensor_parallel
    from mbridge.core.parallel_states import ParallelStates

    model_type = check_architecture(getattr(hf_config, "architectures", None), hf_config.model_type)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_parallel_fit(hf_config, tp, parallel_state.get_pipeline_model_parallel_world_size(),
                       ep=parallel_state.get_expert_model_parallel_world_size())
    if num_experts(hf_config):
        router_without_te()
    cls = _bridge_class(model_type)
    bridge = cls(
        hf_config,
        dtype=dtype,
        parallel_states=ParallelStates.get_parallel_state(),
        make_vocab_size_divisible_by=vocab_divisible_by,
    )
    # megatron-core trains an MoE layer at TP > 1 only with sequence parallelism (activations split over the
    # sequence between the TP-parallel layers)
    sequence_parallel = {"sequence_parallel": True} if num_experts(hf_config) and tp > 1 else {}
    bridge.set_extra_args(**{**_cpu_overrides(), **moe_overrides(hf_config, transformer_engine_available()),
                             **sequence_parallel, **({} if initialize else _UNSET_WEIGHTS),
                             **transformer_overrides})
    provider = bridge._model_provider([])
    with cpu_compat():
        model = provider(
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    if cuda_available():
        model.cuda(torch.cuda.current_device())
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return ModelBundle(bridge, [model], hf_config, bridge.vocab_size, bridge.padded_vocab_size)


def load_hf_weights(bundle: ModelBundle, hf_dir: str | Path) -> None:
    """Scatter the HF safetensors of ``hf_dir`` into this rank's shards."""
    with torch.no_grad(), cpu_compat():
        bundle.bridge.load_weights(bundle.chunks, str(hf_dir))


def export_hf_weights(bundle: ModelBundle) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full HF-named tensors gathered from every TP/PP shard (a collective: every rank
    of the model-parallel group must consume the whole iterator). The stream is whole on global rank 0
    (at PP = 1: on TP rank 0 of each group; other TP ranks send their shards and yield only the
    unsharded tensors)."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        local = ps.get_pipeline_model_parallel_world_size() == 1
        if not local and ps.get_expert_model_parallel_world_size() > 1:
            raise UnsupportedArchitectureError("exporting an MoE student at pp > 1 with ep > 1 is not supported: "
                                               "use pp = 1 (any ep) or ep = 1")
        stream = _export_without_pipeline(bundle) if local else bundle.bridge.export_weights(bundle.chunks)
        while True:
            with cpu_compat():
                item = next(stream, None)
            if item is None:
                return
            yield item


def _export_without_pipeline(bundle: ModelBundle) -> Iterator[tuple[str, torch.Tensor]]:
    """mbridge's export at PP = 1 (no expert parallelism) without its per-parameter pipeline
    collectives: every parameter is local, so each one's name and metadata need not be gathered
    over the pipeline group by pickled objects (measured: 50 of the ~75 ms of a tiny student's
    weight sync), and TP shards are gathered to TP rank 0 only (every rank holding the whole largest
    tensor, 0.6 GB for Qwen3-0.6B's embedding, was a second copy on each). The same mbridge name
    mapping, TP merge and HF conversion, in the same order. An MoE student's experts at EP > 1 are
    gathered over the expert-parallel group (every rank of it gets them all)."""
    from mbridge.core.util import unwrap_model
    from megatron.core import parallel_state as ps

    bridge, tp = bundle.bridge, ps.get_tensor_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    gatherer = ps.get_tensor_model_parallel_rank() == 0
    for model in [unwrap_model(chunk) for chunk in bundle.chunks]:
        if any("expert_bias" in key for key in model.state_dict()):
            raise UnsupportedArchitectureError("MoE router biases: export through mbridge's own path")
        local_to_global = bridge._weight_name_mapping_mcore_local_to_global(model, consider_ep=False)
        for local_name, param in model.named_parameters():
            name = local_to_global[local_name]
            if ep > 1 and LOCAL_EXPERT in name:
                yield from export_expert(bridge, name, param)
                continue
            merged = param
            if getattr(param, "tensor_model_parallel", False):
                shards = [param]
                if tp > 1:  # gathered on TP rank 0 only, which alone consumes the stream
                    shards = [torch.empty_like(param) for _ in range(tp)] if gatherer else None
                    torch.distributed.gather(param, shards, dst=ps.get_tensor_model_parallel_src_rank(),
                                             group=ps.get_tensor_model_parallel_group())
                    if not gatherer:
                        continue
                merged = bridge._weight_merge_across_tp(name, shards, param)
            yield from zip(*bridge._weight_to_hf_format(name, merged))


def save_hf_checkpoint(
    bundle: ModelBundle, out_dir: str | Path, tokenizer_src: str | Path | None = None, shard_bytes: int = 2 << 30
) -> None:
    """Write an HF directory (safetensors + config + tokenizer files) from the sharded model.

    Collective over all ranks; only global rank 0 writes, a shard of at most ``shard_bytes`` at a time
    (``model.safetensors`` when the model fits one, else ``model-0000i-of-0000n.safetensors`` and HF's
    index): rank 0 never holds more than one shard besides its own weights. The directory appears
    atomically.
    """
    import torch.distributed as dist

    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    writer = _ShardWriter(tmp, shard_bytes) if rank == 0 else None
    tied = getattr(bundle.hf_config, "tie_word_embeddings", False)
    for name, tensor in export_hf_weights(bundle):
        if writer is not None and not (tied and name == "lm_head.weight"):
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        save_hf_config(bundle.hf_config, tmp)
        copy_tokenizer_files(tokenizer_src, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    if dist.is_initialized():
        dist.barrier()


class _ShardWriter:
    """Safetensors shards written as they fill, named the way ``transformers`` does once their count is known."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.directory, self.shard_bytes = directory, shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []  # the names in each shard written

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.current or any(name in names for names in self.files):
            return  # tied embeddings at PP > 1 come out of both stages
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.current[name] = tensor.detach().to("cpu").contiguous().clone()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, str(self.directory / f"part-{len(self.files)}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.directory / "part-0.safetensors").rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.directory / f"part-{i}.safetensors").rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(src: str | Path | None, dst: Path) -> list[str]:
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, dst / name)
            copied.append(name)
    return copied

