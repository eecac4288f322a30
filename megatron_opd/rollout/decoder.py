"""A lean batched forward of the Llama family (Llama, Qwen2, Qwen3, Qwen3-MoE) over a loaded HF model's own
weights, with a pre-allocated KV cache: the compute core of the embedded engine's generation and
scoring.

Why not ``model(...)`` per token: at the sizes the CPU engine serves, a decode step of a
``transformers`` model is mostly Python (mask construction, cache objects, attention dispatch),
measured at ~5 ms per step for the tiny student against ~1 ms here. The math is the model's own:
RMSNorm, (optional q/k norm), rotary embedding from the model's ``rotary_emb`` module (so every
RoPE scaling variant it implements carries over), grouped-query SDPA, SwiGLU (Qwen3-MoE: the router's
softmax top-k, renormalised when ``norm_topk_prob``, and each chosen expert's SwiGLU). Parameters are read
from the HF modules at every call, so a weight update of the HF model is seen at once. Tests hold
it to ``transformers``: greedy ids equal to ``model.generate``, log-probs equal to a teacher-forced
forward within float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class KVCache:
    """Keys stored transposed, [layers, B, kv_heads, head_dim, width], and values [layers, B,
    kv_heads, width, head_dim]: attention is then two batched GEMMs over contiguous rows (on CPU
    several times faster at decode than SDPA's kernel over a sliced cache)."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, width: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> "KVCache":
        return cls(torch.zeros(layers, batch, kv_heads, head_dim, width, dtype=dtype, device=device),
                   torch.zeros(layers, batch, kv_heads, width, head_dim, dtype=dtype, device=device))

    @property
    def width(self) -> int:
        return self.values.shape[3]

    def take(self, rows: torch.Tensor, width: int | None = None) -> "KVCache":
        """A cache of ``width`` columns (default: the same) holding the given batch rows' columns."""
        layers, _, heads, dim, old = self.keys.shape
        width = old if width is None else width
        out = KVCache.empty(layers, len(rows), heads, width, dim, self.keys.dtype, self.keys.device)
        keep = min(old, width)
        out.keys[..., :keep] = self.keys[:, rows, ..., :keep]
        out.values[:, :, :, :keep] = self.values[:, rows, :, :keep]
        return out


class Decoder:
    def __init__(self, model) -> None:
        config = model.config
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise UnsupportedModelError(f"the embedded engine runs {', '.join(SUPPORTED)} models; got model_type {kind!r}")
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(f"{kind}: sliding-window attention is not supported by the embedded engine")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{kind}: hidden_act {config.hidden_act!r} (the embedded engine runs SwiGLU / silu)")
        self.experts = getattr(config, "num_experts", 0) if kind == "qwen3_moe" else 0
        if self.experts and (getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1):
            raise UnsupportedModelError(f"{kind}: dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step)")
        self.top_k = getattr(config, "num_experts_per_tok", 0)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.model = model
        self.config = config
        self.vocab_size = config.vocab_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = model.model.layers
        self.eps = config.rms_norm_eps
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._packed: dict[torch.nn.Module, torch.Tensor] | None = None  # see pack()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model and its KV cache are; ids, masks and sampling stay on the CPU (see forward, logits)."""
        return self.model.model.embed_tokens.weight.device

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes: keys and values of every layer."""
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * self.dtype.itemsize

    def new_cache(self, batch: int, width: int) -> KVCache:
        return KVCache.empty(len(self.layers), batch, self.kv_heads, width, self.head_dim, self.dtype, self.device)

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin tables [length, head_dim] from the model's own rotary module (grown on demand)."""
        if self._rope is None or self._rope[0].shape[0] < length:
            size = max(length, getattr(self.config, "max_position_embeddings", 0) or 0)
            positions = torch.arange(size, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(probe, positions)
            self._rope = (cos[0], sin[0])
        return self._rope

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, column: int,
                attend: torch.Tensor, store: bool = True, routed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run ``ids`` [B, S] (at ``positions`` [B, S]) after cache columns ``:column``; ``attend``
        [B, 1, S, column+S] (True: may attend) covers those columns and the new ones. With ``store``
        the new keys/values are written to cache columns ``column .. column+S-1`` (generation);
        without, they are used in each layer and dropped (scoring a block: the cache then needs only
        the prefix's columns, not the block's at every layer). Returns the final-normed hidden
        states [B, S, hidden]. An MoE model appends each layer's chosen experts [B, S, top_k] to ``routed``."""
        batch, length = ids.shape
        end = column + length
        ids, positions, attend = ids.to(self.device), positions.to(self.device), attend.to(self.device)
        cos_table, sin_table = self.rope(int(positions.max()) + 1)
        cos, sin = cos_table[positions][:, :, None], sin_table[positions][:, :, None]  # [B, S, 1, D]
        if length == 1:  # decode attends through an additive bias
            attend = torch.zeros(attend.shape, dtype=torch.float32, device=self.device).masked_fill_(~attend, float("-inf"))
        hidden = self.model.model.embed_tokens(ids)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms(hidden, layer.input_layernorm, self.eps)
            q = self.linear(x, attn.q_proj).view(batch, length, self.heads, self.head_dim)
            k = self.linear(x, attn.k_proj).view(batch, length, self.kv_heads, self.head_dim)
            v = self.linear(x, attn.v_proj).view(batch, length, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                q, k = _rms(q, attn.q_norm, self.eps), _rms(k, attn.k_norm, self.eps)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if store:
                cache.keys[index, :, :, :, column:end] = k.permute(0, 2, 3, 1)
                cache.values[index, :, :, column:end] = v.transpose(1, 2)
                keys, values = cache.keys[index], cache.values[index]
            else:
                keys = torch.cat([cache.keys[index][..., :column], k.permute(0, 2, 3, 1)], -1)
                values = torch.cat([cache.values[index][:, :, :column], v.transpose(1, 2)], 2)
            out = self._attention(q, keys, values, end, attend)
            hidden = hidden + self.linear(out, attn.o_proj)
            x = _rms(hidden, layer.post_attention_layernorm, self.eps)
            mlp = layer.mlp
            if self.experts:
                out, chosen = self._moe(x, mlp)
                hidden = hidden + out
                if routed is not None:
                    routed.append(chosen)
                continue
            hidden = hidden + self.linear(F.silu(self.linear(x, mlp.gate_proj)) * self.linear(x, mlp.up_proj), mlp.down_proj)
        return _rms(hidden, self.model.model.norm, self.eps)

    def _moe(self, x: torch.Tensor, mlp) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3-MoE's sparse block: softmax over all experts (float32), the top k, renormalised over them
        when ``norm_topk_prob``; each chosen expert's SwiGLU weighted and summed in expert order, as
        ``transformers`` does. -> (output [B, S, hidden], chosen experts [B, S, k])."""
        batch, length, width = x.shape
        flat = x.reshape(-1, width)
        probs = torch.softmax(F.linear(flat, mlp.gate.weight), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for expert in chosen.unique().tolist():
            rows, slot = torch.where(chosen == expert)
            out.index_add_(0, rows, _expert_swiglu(mlp.experts, expert, flat[rows]) * weights[rows, slot, None])
        return out.view(batch, length, width), chosen.view(batch, length, self.top_k)

    def linear(self, x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
        packed = self._packed.get(module) if self._packed is not None else None
        if packed is None:
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")

    def pack(self) -> None:
        """Re-lay every linear weight out for oneDNN's matmul (a copy of each, ~0.3 s per GB): at decode's
        few rows a plain fp32 GEMM reads the weights at about half the memory bandwidth, the packed
        one at nearly all of it (measured: 4 rows x [3072, 1024], one thread, 8.6 vs 14.1 GB/s against a
        14 GB/s copy). Stale after any weight change: the engine calls :meth:`unpack` then."""
        if self._packed is not None or not packing_available() or self.dtype != torch.float32 or self.device.type != "cpu":
            return
        linears = [m for layer in self.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                   layer.self_attn.v_proj, layer.self_attn.o_proj)] + [self.model.lm_head]
        if not self.experts:  # experts run on a few rows each: left as they are
            linears += [m for layer in self.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        self._packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size=8) for m in linears}

    def unpack(self) -> None:
        self._packed = None

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int, mask: torch.Tensor) -> torch.Tensor:
        """q [B, S, H, D] against cached columns ``:end`` (keys [B, Hkv, D, W], values [B, Hkv, W, D]);
        query head h reads kv head h // (H / Hkv), as ``transformers``' repeat_kv. -> [B, S, H*D].
        One query per row (decode): two batched GEMMs, ``mask`` an additive bias; a block of
        queries (prefill, scoring): SDPA's fused kernel, ``mask`` boolean (it never materialises
        the [B, H, S, end] scores)."""
        batch, length, heads, dim = q.shape
        if length > 1:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[..., :end].transpose(-1, -2).contiguous(),
                                                 values[:, :, :end], attn_mask=mask, enable_gqa=heads != self.kv_heads)
            return out.transpose(1, 2).reshape(batch, length, heads * dim)
        bias = mask
        kv, group = self.kv_heads, heads // self.kv_heads
        grouped = q.view(batch, length, kv, group, dim).permute(0, 2, 3, 1, 4).reshape(batch * kv, group * length, dim)
        width = keys.shape[-1]
        scores = torch.bmm(grouped, keys.reshape(batch * kv, dim, width)[:, :, :end]).view(batch, kv, group, length, end)
        scores = scores * dim ** -0.5 + bias.view(batch, 1, 1, length, end)
        probs = torch.softmax(scores, -1).view(batch * kv, group * length, end)
        out = torch.bmm(probs, values.reshape(batch * kv, width, dim)[:, :end])
        return out.view(batch, kv, group, length, dim).permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary, in float32, on the CPU (where sampling and scoring read them)."""
        return self.linear(hidden, self.model.lm_head)[..., : self.vocab_size].float().cpu()


def packing_available() -> bool:
    """oneDNN's weight-packed linear (what torch.compile's CPU freezing uses) is in this torch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _expert_swiglu(experts, index: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU on rows ``x``, from either ``transformers`` layout: 5 keeps every expert in 3-D
    tensors (``gate_up_proj`` [E, 2F, H], ``down_proj`` [E, H, F]), 4 a module list of MLPs."""
    if hasattr(experts, "gate_up_proj"):
        gate, up = F.linear(x, experts.gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, experts.down_proj[index])
    mlp = experts[index]
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def _rms(x: torch.Tensor, norm, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] causal mask over a padded block whose real tokens are ``valid`` [B, S]. A pad
    position attends to itself, so no attention row is empty (SDPA would return NaN for it)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ((causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)[None])[:, None]
