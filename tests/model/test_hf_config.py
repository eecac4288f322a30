"""What is read from an HF ``config.json`` without torch: the architecture, the TP / PP fit, and the
RoPE arguments from either transformers generation's layout."""
import json

import pytest

from megatron_opd.model.hf_config import UnsupportedArchitectureError, read_config_json, rope_arguments

LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_rope_from_transformers_4_and_5_layouts_is_the_same():
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    v5 = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3}}
    both = {"rotary_base": 500000.0, "rope_scaling": True, "rope_scaling_factor": 32.0}
    assert rope_arguments(v4) == rope_arguments(v5) == both
    assert rope_arguments({"rope_theta": 1e6, "rope_scaling": None}) == {"rotary_base": 1e6}
    assert rope_arguments({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == {"rotary_base": 1e6}
    assert rope_arguments({}) == {"rotary_base": 10000.0}  # transformers' default for these architectures
    linear = rope_arguments({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear == {"rotary_base": 1e4, "seq_len_interpolation_factor": 4.0}


def test_a_rope_megatron_core_cannot_build_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="RoPE type 'yarn' is not supported"):
        rope_arguments({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}, where="m")
    with pytest.raises(UnsupportedArchitectureError, match="original_max_position_embeddings"):
        rope_arguments({"rope_theta": 1e4, "rope_scaling": {"rope_type": "llama3", **LLAMA3,
                                                          "original_max_position_embeddings": 4096}})


def test_preflight_reads_the_rope_of_a_config_json(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_hidden_layers": 2,
              "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=f"{tmp_path}: RoPE type 'dynamic'"):
        read_config_json(tmp_path)


def test_a_config_written_by_transformers_5_is_read_right_or_refused(tiny_hf, tmp_path):
    """transformers 4 reads theta 10,000 from a config that keeps it only in ``rope_parameters``
    (transformers 5's layout): the student would train with the wrong RoPE, so loading it stops."""
    import shutil

    from helpers import transformers_major
    from megatron_opd.model.bridge import load_hf_config

    model_dir = tmp_path / "qwen3"
    shutil.copytree(tiny_hf["qwen3"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rope_theta", None), config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": 123456.0, "rope_type": "default"}
    (model_dir / "config.json").write_text(json.dumps(config))
    if transformers_major() < 5:
        with pytest.raises(UnsupportedArchitectureError, match="RoPE theta 123456, but transformers 4"):
            load_hf_config(model_dir)
    else:
        assert rope_arguments(load_hf_config(model_dir).to_dict()) == {"rotary_base": 123456.0}


def test_an_exported_config_reads_the_same_under_transformers_4_and_5(tiny_hf, tmp_path):
    """``save_hf_config`` writes the legacy keys beside transformers 5's ``rope_parameters``."""
    from transformers import AutoConfig

    from helpers import make_tiny_hf
    from megatron_opd.model.bridge import save_hf_config

    for name, model_dir in (("qwen3", tiny_hf["qwen3"]), ("llama3", make_tiny_hf(tmp_path / "llama3", "llama3"))):
        save_hf_config(AutoConfig.from_pretrained(model_dir), tmp_path / f"out-{name}")
        written = json.loads((tmp_path / f"out-{name}" / "config.json").read_text())
        expected = rope_arguments(json.loads((model_dir / "config.json").read_text()))
        legacy = {k: v for k, v in written.items() if k != "rope_parameters"}  # what transformers 4 reads
        assert rope_arguments(legacy) == rope_arguments(written) == expected, name
