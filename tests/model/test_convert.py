"""HF -> megatron-opd checkpoint (written at TP2 x PP2) -> HF (loaded at TP1 x PP1: resharded) is
bit-exact for every tensor, through the CLI."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import opd


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
@pytest.mark.slow
def test_hf_megatron_hf_bit_exact(tiny_hf, tmp_path, arch):
    src = tiny_hf[arch]
    opd("convert", "hf-to-megatron", str(src), str(tmp_path / "mcore"), "--tp", "2", "--pp", "2", "--vocab-divisible-by", "4")
    step_dir = tmp_path / "mcore" / "step-00000000"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["vocab_size"], meta["padded_vocab_size"]) == (2, 2, 131, 132)
    assert (step_dir / "dist" / ".metadata").is_file() and len(list((step_dir / "dist").glob("*.distcp"))) >= 4
    opd("export-hf", str(tmp_path / "mcore"), str(tmp_path / "back"))
    original = load_file(src / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg_out["vocab_size"] == cfg_in["vocab_size"] == 131
    assert cfg_out["tie_word_embeddings"] == cfg_in["tie_word_embeddings"]


@pytest.mark.slow
def test_export_in_shards_loads_in_transformers(tiny_hf, tmp_path):
    """A model larger than --shard-mb is written shard by shard (HF's names and index), and loads."""
    from transformers import AutoModelForCausalLM

    src = tiny_hf["llama"]
    opd("convert", "hf-to-megatron", str(src), str(tmp_path / "mcore"), "--tp", "2", "--pp", "1", "--vocab-divisible-by", "4")
    opd("export-hf", str(tmp_path / "mcore"), str(tmp_path / "back"), "--shard-mb", "0.1")
    shards = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    original = load_file(src / "model.safetensors")
    assert set(index["weight_map"]) == set(original)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).state_dict()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
