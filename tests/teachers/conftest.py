"""What the teacher tests share: realistic rollouts of the cold-start student (a fixture per module)."""
import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def rollouts():
    """Realistic samples: arithmetic prompts, 4 completions each sampled by the cold-start student."""
    from transformers import AutoTokenizer

    from megatron_opd.data.chat import chat_ids
    from megatron_opd.data.world import read_rows
    from megatron_opd.records import Sample, SamplingParams
    from megatron_opd.rollout.embedded import EmbeddedEngine

    student = REPO / "assets" / "tiny" / "student_init"
    engine = EmbeddedEngine(student)
    rows = read_rows(REPO / "assets" / "tiny" / "data" / "arithmetic" / "test.jsonl")[:3]
    tok = AutoTokenizer.from_pretrained(str(student))
    prompts = [chat_ids(tok, r["messages"][:1], add_generation_prompt=True) for r in rows]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, n=4, seed=3, temperature=1.0))
    return [Sample(r.prompt_ids + r.completion_ids, len(r.prompt_ids), "arithmetic") for r in outs if r.completion_ids]
