"""Megatron student logits == transformers logits (fp32) at every TP x PP layout, over gloo."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import VOCAB, WORKERS, torchrun


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 2)])  # TP2 at PP1: the weight-export test below
@pytest.mark.slow
def test_logits_match_transformers(tiny_hf, tmp_path, tp, pp):
    input_ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(7))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    dirs = [str(tiny_hf[a]) for a in ("qwen3", "qwen2", "llama")]
    torchrun(tp * pp, [str(WORKERS / "parity_worker.py"), str(tp), str(pp), str(tmp_path), *dirs])
    for arch in ("qwen3", "qwen2", "llama"):
        ours = load_file(tmp_path / f"{arch}.safetensors")["logits"]
        ref = AutoModelForCausalLM.from_pretrained(tiny_hf[arch], dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(input_ids).logits
        assert ours.shape == expected.shape == (4, 17, VOCAB)
        assert (ours - expected).abs().max().item() < 1e-4, arch
        assert torch.equal(ours.argmax(-1), expected.argmax(-1))
        report = json.loads((tmp_path / f"{arch}.json").read_text())
        assert report["padded_vocab"] == 132  # padded to a multiple of 2, trimmed before comparison
        # the CPU layer spec's fused attention is what produced these logits (model/attention.py)
        assert report["modules"]["core_attention"] == "megatron_opd.model.attention.SDPAttention"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.slow
def test_weight_export_equals_mbridges_and_round_trips(tiny_hf, tmp_path, tp, pp):
    """The HF-named stream weight sync and export read: at PP = 1 it skips mbridge's per-parameter
    pipeline collectives, so it is held to mbridge's own export (names, order, values) and to the
    checkpoint it was loaded from, bit for bit."""
    from safetensors.torch import load_file as load

    for arch in ("qwen3", "llama"):
        out = tmp_path / arch
        out.mkdir()
        torchrun(tp * pp, [str(WORKERS / "export_worker.py"), str(tp), str(pp), str(tiny_hf[arch]), str(out)])
        ours_names, theirs_names = (out / "names.txt").read_text().split("\n---\n")
        ours, theirs = load(str(out / "ours.safetensors")), load(str(out / "mbridge.safetensors"))
        assert ours_names.split() == theirs_names.split()  # the same tensors, in the same order
        original = load(str(tiny_hf[arch] / "model.safetensors"))
        for name in set(ours_names.split()):
            assert torch.equal(ours[f"ours/{name}"], theirs[f"mbridge/{name}"]), name
            assert torch.equal(ours[f"ours/{name}"], original[name]), name
        for rank in range(tp * pp):  # the trainer's build (no random init) holds every tensor the loaded one holds
            report = json.loads((out / f"uninitialised_rank{rank}.json").read_text())
            assert report["tensors"] > 0 and report["differ"] == [], report


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_attention_equals_megatrons_unfused_forward_and_backward(tmp_path, tp):
    """The local spec's core attention (torch SDPA, causal, grouped KV heads) against megatron's own
    DotProductAttention on this TP rank's heads: output and the gradients of q, k and v."""
    torchrun(tp, [str(WORKERS / "attention_worker.py"), str(tmp_path), str(tp)])
    for rank in range(tp):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["shape"] == [23, 3, 8 // tp * 16]
        assert max(report["diffs"]) < 1e-5, report["diffs"]


@pytest.mark.slow
def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1 / 3.2's RoPE scaling (``rope_type: llama3``) is megatron-core's own scaling, not the
    linear position interpolation mbridge made of every ``rope_scaling``: the logits equal HF's."""
    from helpers import make_tiny_hf

    model_dir = make_tiny_hf(tmp_path / "llama3", "llama3", seed=3)
    input_ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torchrun(1, [str(WORKERS / "parity_worker.py"), "1", "1", str(tmp_path), str(model_dir)])
    ours = load_file(tmp_path / "llama3.safetensors")["logits"]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids).logits
    assert (ours - expected).abs().max().item() < 1e-4
