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

