"""torchrun worker: megatron's unfused DotProductAttention and our SDPAttention on the same causal GQA
inputs (this TP rank's heads), forward and backward; writes the largest differences."""
import json
import sys
from pathlib import Path

import torch

from megatron_opd.platform import destroy, init_distributed
from megatron_opd.platform.cpu_compat import cpu_compat

out_dir = Path(sys.argv[1])
info = init_distributed(int(sys.argv[2]), 1)
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_opd.model.attention import SDPAttention  # noqa: E402

tp = int(sys.argv[2])
config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                           use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0,
                           tensor_model_parallel_size=tp)
seq, batch, heads, groups = 23, 3, 8 // tp, 4 // tp
torch.manual_seed(info.rank)
inputs = [torch.randn(seq, batch, n, 16, requires_grad=True) for n in (heads, groups, groups)]
mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
results = {}
for name, cls in (("megatron", DotProductAttention), ("sdpa", SDPAttention)):
    module = cls(config, 1, AttnMaskType.causal, "self")
    for t in inputs:
        t.grad = None
    with cpu_compat():
        out = module(*inputs, mask, attn_mask_type=AttnMaskType.causal)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    results[name] = [out.detach()] + [t.grad.clone() for t in inputs]
diffs = [float((a - b).abs().max()) for a, b in zip(results["megatron"], results["sdpa"])]
(out_dir / f"rank{info.rank}.json").write_text(json.dumps({"diffs": diffs, "shape": list(results["sdpa"][0].shape)}))
destroy()
