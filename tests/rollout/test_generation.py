"""The embedded engine's generation: greedy equals transformers' generate, sampling is seeded."""
import torch
from helpers import REPO

from megatron_opd.data.chat import chat_ids
from megatron_opd.records import SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def _prompts(tokenizer, texts):
    return [chat_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts]


def test_greedy_equals_transformers_generate_and_sampling_is_seeded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = EmbeddedEngine(TEACHER)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    prompts = _prompts(tok, ["add 123 + 45", "add 99999 + 1", "add 5 + 5"])
    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40))
    reference = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    for prompt, rollout in zip(prompts, ours):
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert rollout.completion_ids == expected.tolist()
        # sampler log-probs are the model's own log-probs of those tokens
        with torch.no_grad():
            full = torch.tensor([prompt + rollout.completion_ids])
            lp = torch.log_softmax(reference(full).logits[0, len(prompt) - 1 : -1], -1)
        picked = lp.gather(-1, torch.tensor(rollout.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(rollout.logprobs), picked, atol=1e-5)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=30, n=3, seed=11)
    a, b = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [(r.prompt_index, r.sample_index) for r in a] == [(i, k) for i in range(3) for k in range(3)]
    c = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=30, n=3, seed=12))
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]



def test_an_moe_engine_takes_a_checkpoints_expert_weights_by_their_names(tmp_path):
    """transformers 5 keeps a Qwen3-MoE layer's experts in 3-D tensors; checkpoints and the trainer name each
    expert's matrices. A full update from another checkpoint's files (every expert by its own name) changes
    the engine into that model: its weights read back by name and its log-probs are that model's."""
    import pytest
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_hf
    from megatron_opd.model.bridge import copy_tokenizer_files
    from megatron_opd.rollout.embedded import WeightUpdateError
    from megatron_opd.rollout.generation import continuation_hidden, score_tokens

    source, other = (make_tiny_hf(tmp_path / name, "qwen3_moe", seed=seed) for name, seed in (("a", 3), ("b", 11)))
    copy_tokenizer_files(REPO / "assets" / "tiny" / "tokenizer", source)  # the engine reads its eos and pad ids
    engine = EmbeddedEngine(source, weights_roots=[tmp_path])
    assert engine.update_weights_from_disk(other, "7") == len(load_file(str(other / "model.safetensors")))
    wanted = load_file(str(other / "model.safetensors"))
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.2.down_proj.weight",
                 "model.layers.2.mlp.experts.0.up_proj.weight", "model.layers.3.mlp.gate.weight"):
        assert torch.equal(engine.get_weight(name), wanted[name]), name
    reference = AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32).eval()
    prompt, cont = [5, 9, 17, 3], [22, 40, 7, 99, 12]
    hidden = continuation_hidden(engine.decoder, [prompt], [0], [cont], pad_id=0)
    ours = score_tokens(engine.decoder, hidden, [cont], top_k=0).logprobs
    with torch.no_grad():
        table = torch.log_softmax(reference(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:-1], -1)
    assert torch.allclose(ours, table.gather(-1, torch.tensor(cont)[:, None])[:, 0], atol=2e-5)
    partial = {k: v for k, v in wanted.items() if "experts.1." not in k}
    with pytest.raises(WeightUpdateError, match="missing"):
        engine.update_weights(iter(partial.items()), "8", full=True)
