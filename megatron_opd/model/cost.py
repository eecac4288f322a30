"""What a dense Llama-family model should cost, counted from its config: FLOPs, weight bytes, and the
memory each process of an OPD run should need. ``opd bench shapes`` holds what it measures to these.

FLOPs (Narayanan et al. 2021, appendix: 6 x parameters x tokens for a training step, plus attention):
a forward pass costs 2 FLOPs per matmul weight per token, plus causal attention's two [L, L] products
(QK^T and the weighted sum of V, each L^2/2 x d_q multiply-adds per layer: 2 x d_q x L^2 FLOPs per
layer and sequence); training is forward + backward = 3 forward passes. Recomputed activations are
not counted (model FLOPs, not hardware FLOPs).

Memory (fp32, megatron's local layer spec, no sequence parallelism): per parameter on a rank its
weight, its gradient (DDP's fp32 buffer) and Adam's two moments — 16 bytes. Activations kept for the
backward pass, per token and layer (floats): the two norms' inputs and outputs (4h), the QKV output
((d_q + 2 d_kv) / tp), q/k after their norms and after the rotation (2 (d_q + d_kv) / tp), attention's
output (d_q / tp), the MLP's gate-and-up output and its SwiGLU (3f / tp); with full recompute only each
layer's input (h) plus one layer's worth. The last stage adds the logits shard and its gradient
(V / tp each) and the loss head's chunk temporaries (:data:`LOSS_CHUNK_TEMPORARIES` x ``loss.chunk_mib``).
Every process also holds its interpreter and libraries: a measured baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOAT = 4  # bytes: every real-shape figure here is fp32
LOSS_CHUNK_TEMPORARIES = 8  # [chunk, V/tp] tensors alive at once in the loss head's backward (algo/vocab_parallel.py)


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> "Shape":
        """From an HF config.json; a mixture-of-experts config by its *active* MLP (top-k experts' width; the
        router's hidden x experts weights, under 1% of a layer here, are not counted)."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        ffn = config["intermediate_size"]
        if config.get("num_experts"):
            ffn = config["moe_intermediate_size"] * config["num_experts_per_tok"]
        return cls(config["hidden_size"], ffn, config["num_hidden_layers"], heads,
                   config["num_key_value_heads"], head_dim, config["vocab_size"], bool(config.get("tie_word_embeddings")))

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        return self.hidden * (self.d_q + 2 * self.d_kv) + self.d_q * self.hidden + 3 * self.hidden * self.ffn

    def matmul_params(self) -> int:
        """Weights a token is multiplied by: every layer's projections and the LM head."""
        return self.layers * self.layer_matmul_params() + self.vocab * self.hidden

    def params(self) -> int:
        norms = self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.layers * self.layer_matmul_params() + self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def forward_flops(self, positions: float, positions_sq: float) -> float:
        """``positions``: tokens run; ``positions_sq``: the sum over sequences of their length squared."""
        return 2 * self.matmul_params() * positions + 2 * self.layers * self.d_q * positions_sq

    def train_flops(self, positions: float, positions_sq: float) -> float:
        return 3 * self.forward_flops(positions, positions_sq)

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: every matmul weight once (an embedding lookup reads rows)."""
        return self.matmul_params() * FLOAT

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.d_kv * FLOAT

    def activation_floats_per_token_layer(self, tp: int) -> float:
        h = self.hidden
        return 4 * h + ((self.d_q + 2 * self.d_kv) + 2 * (self.d_q + self.d_kv) + self.d_q + 3 * self.ffn) / tp


@dataclass
class RankEstimate:
    """Expected resident bytes of one trainer rank, by part."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def trainer_rank(shape: Shape, tp: int, pp: int, stage: int, micro_tokens: int, chunk_mib: float, recompute: bool,
                 baseline: float, in_flight: int = 1, padded_vocab: int | None = None) -> RankEstimate:
    """One rank of pipeline stage ``stage``: ``micro_tokens`` positions per micro-batch, ``in_flight``
    micro-batches whose activations a stage holds at once (1F1B: up to ``pp - stage``)."""
    vocab = padded_vocab or shape.vocab
    layers = shape.layers // pp
    first, last = stage == 0, stage == pp - 1
    norms = layers * (2 * shape.hidden + 2 * shape.head_dim) + (shape.hidden if last else 0)
    params = layers * shape.layer_matmul_params() / tp + norms
    params += (vocab * shape.hidden / tp) * (int(first) + int(last and (not shape.tied or pp > 1)))
    per_layer = shape.activation_floats_per_token_layer(tp)
    if recompute:
        activations = micro_tokens * (layers * shape.hidden * in_flight + per_layer) * FLOAT
    else:
        activations = micro_tokens * layers * per_layer * in_flight * FLOAT
    parts = {"weights": params * FLOAT, "gradients": params * FLOAT, "adam": 2 * params * FLOAT,
             "activations": activations, "baseline": baseline}
    if last:
        parts["logits + gradient"] = 2 * micro_tokens * vocab / tp * FLOAT
        parts["loss chunk"] = LOSS_CHUNK_TEMPORARIES * chunk_mib * (1 << 20)
    return RankEstimate(parts)


def rollout_server(shape: Shape, rows: int, width: int, baseline: float) -> RankEstimate:
    """Weights, their oneDNN-packed copy while generating (dropped when a sync pauses the server, whose
    incoming weights then take its place), the KV cache of the decode batch."""
    weights = shape.params() * FLOAT
    return RankEstimate({"weights": weights, "packed weights / incoming sync": max(shape.decode_bytes(), weights),
                         "kv cache": rows * width * shape.kv_bytes_per_token(), "baseline": baseline})


def teacher_server(shape: Shape, score_tokens: int, logits_chunk_bytes: int, baseline: float) -> RankEstimate:
    """Weights and one scoring batch: its block's per-layer temporaries (MLP gate, up and product; QKV;
    attention output) for at most ``score_tokens`` positions, and one chunk of the vocabulary's logits."""
    per_token = 3 * shape.ffn + shape.d_q + 2 * shape.d_kv + shape.d_q + 2 * shape.hidden
    return RankEstimate({"weights": shape.params() * FLOAT, "scoring block": score_tokens * per_token * FLOAT,
                         "logits chunk": 2 * logits_chunk_bytes, "baseline": baseline})


def export_transient(shape: Shape) -> float:
    """A weight sync's export on every TP rank: the largest tensor gathered whole, and its HF-format copy."""
    largest = max(shape.vocab * shape.hidden, 2 * shape.hidden * shape.ffn, shape.hidden * (shape.d_q + 2 * shape.d_kv))
    return 2 * largest * FLOAT
