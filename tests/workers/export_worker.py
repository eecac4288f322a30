"""torchrun worker: export the student's HF-named weights (our stream and mbridge's own) and save them; and name
every tensor of its state (parameters and buffers, padding rows included) that a build without random init
(``initialize=False``, the trainer's) holds differently once the same HF weights are loaded."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_opd.model import build_model, export_hf_weights, load_hf_config, load_hf_weights
from megatron_opd.platform import init_distributed
from megatron_opd.platform.cpu_compat import cpu_compat

tp, pp, hf_dir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
init_distributed(tp, pp)
bundle = build_model(load_hf_config(hf_dir), vocab_divisible_by=2)
load_hf_weights(bundle, hf_dir)
ours = [(name, t.clone()) for name, t in export_hf_weights(bundle)]
bare = build_model(load_hf_config(hf_dir), vocab_divisible_by=2, initialize=False)
load_hf_weights(bare, hf_dir)
state, bare_state = bundle.model.state_dict(), bare.model.state_dict()
differ = [n for n, t in state.items() if torch.is_tensor(t) and not torch.equal(t, bare_state[n])]
tensors = sum(torch.is_tensor(t) for t in state.values())
(out / f"uninitialised_rank{dist.get_rank()}.json").write_text(json.dumps({"tensors": tensors, "differ": differ}))
with torch.no_grad(), cpu_compat():
    theirs = [(name, t.clone()) for name, t in bundle.bridge.export_weights(bundle.chunks)]
if dist.get_rank() == 0:
    (out / "names.txt").write_text("\n".join(n for n, _ in ours) + "\n---\n" + "\n".join(n for n, _ in theirs))
    save_file({f"ours/{n}": t.contiguous() for n, t in ours}, str(out / "ours.safetensors"))
    save_file({f"mbridge/{n}": t.contiguous() for n, t in theirs}, str(out / "mbridge.safetensors"))

from megatron_opd.platform import destroy  # noqa: E402

destroy()
