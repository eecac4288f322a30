"""The shipped tiny world: reproducible data, teachers that master their domain, a cold-started
student that sits clearly below them (room for OPD) but above zero."""
import json

import pytest

from helpers import REPO, opd
from megatron_opd.data.domains import TINY_WORLD as DOMAINS, get_domain
from megatron_opd.data.world import make_splits, read_rows

WORLD = REPO / "assets" / "tiny"
SAMPLES = 100  # half the held-out split (README's tables use all 200)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_shipped_splits_are_what_the_generator_makes(name):
    splits = make_splits(name, 2000, 200, seed=0)
    for split in ("train", "test"):
        shipped = [json.loads(line) for line in (WORLD / "data" / name / f"{split}.jsonl").read_text().splitlines()]
        assert shipped == splits[split]


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_cold_start_data_is_teacher_written_and_verified(name):
    rows = read_rows(WORLD / "data" / name / "cold_start.jsonl")
    train_prompts = {r["messages"][0]["content"] for r in read_rows(WORLD / "data" / name / "train.jsonl")}
    assert len(rows) >= 300
    for row in rows:
        assert row["messages"][0]["content"] in train_prompts
        assert get_domain(name).verify(row["meta"], row["messages"][1]["content"]).correct


def _eval(ckpt, tmp_path, tag, domains=None):
    out = tmp_path / f"{tag}.json"
    args = ["eval", str(ckpt), "--samples", str(SAMPLES), "--json", str(out), "--greedy-only"]  # greedy is what is held
    proc = opd(*args, *(["--domains", domains] if domains else []))
    print(proc.stdout)
    return json.loads(out.read_text())


def _greedy(model_dir, domains=None):
    """The held-out greedy table, evaluated in this process (what `opd eval --greedy-only` prints; the CLI is
    tests/eval/test_domains.py's): four fresh processes would each load torch and transformers again."""
    import torch

    from megatron_opd.eval.domains import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as the other test worker has the other
    try:
        return evaluate(model_dir, WORLD, domains, SAMPLES, sampled=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_teachers_master_their_domain_and_the_student_has_room(tmp_path):
    teachers = {name: _greedy(WORLD / "teachers" / name, [name])[name]["accuracy"] for name in DOMAINS}
    assert all(acc >= 0.9 for acc in teachers.values()), teachers
    out = tmp_path / "student"
    # the shipped cold start on one process (its PP2 is a layout, not part of the world; one process is ~25% quicker)
    opd("run", "recipes/tiny/sft.yaml", "parallel.pp=1", f"run.output_dir={out}")
    student = _greedy(out / "hf")
    print(teachers, {name: student[name]["accuracy"] for name in DOMAINS})
    for name in DOMAINS:
        acc = student[name]["accuracy"]
        assert 0.0 < acc <= teachers[name] - 0.2, (name, acc, teachers[name])


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_hinted_cold_start_is_the_cold_start_with_its_answers_shown(name):
    """Each cold-start row twice more: its answer as a hint after the prompt (the template the OPSD
    recipe's teacher is shown), and the answer alone; the targets are the row's own."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from make_tiny_world import HINT

    from megatron_opd.config.teachers import render_template

    rows = read_rows(WORLD / "data" / name / "cold_start.jsonl")
    hinted = read_rows(WORLD / "data" / name / "cold_start_hinted.jsonl")
    assert len(hinted) == 2 * len(rows)
    for row, full, alone in zip(rows, hinted[0::2], hinted[1::2]):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert full["messages"] == [{"role": "user", "content": render_template(HINT, {"prompt": user, "response": answer})},
                                    row["messages"][1]]
        assert alone["messages"] == [{"role": "user", "content": "hint: " + answer}, row["messages"][1]]
    stage = (REPO / "recipes" / "tiny" / "opsd_stage.yaml").read_text()
    assert json.dumps(HINT) in stage  # the teacher's context is the template the cold start learned


def test_the_other_tokenizer_teacher_masters_arithmetic_in_its_own_tokens(tmp_path):
    from transformers import AutoTokenizer

    teacher, student = WORLD / "teachers" / "arithmetic_bpe", WORLD / "tokenizer"
    bpe, chars = AutoTokenizer.from_pretrained(str(teacher)), AutoTokenizer.from_pretrained(str(student))
    assert bpe.get_vocab() != chars.get_vocab() and bpe.eos_token_id != chars.eos_token_id
    answer = read_rows(WORLD / "data" / "arithmetic" / "test.jsonl")[0]["messages"][1]["content"]
    pieces = bpe.convert_ids_to_tokens(bpe(answer, add_special_tokens=False)["input_ids"])
    assert "answer:" in pieces and len(pieces) < len(answer)  # merges (digits stay single, as in Qwen's tokenizer)
    assert _eval(teacher, tmp_path, "bpe", "arithmetic")["arithmetic"]["accuracy"] >= 0.9


LONG = REPO / "assets" / "tiny_long"


def test_the_long_world_is_what_its_builder_makes_and_its_sft_data_is_the_teachers_verified_samples():
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from make_tiny_world import LONG_COLD, LONG_TRAIN

    from megatron_opd.pipeline.compare import data_cost

    splits = make_splits("multiply", LONG_TRAIN, 200, seed=0)
    for split in ("train", "test"):
        assert read_rows(LONG / "data" / "multiply" / f"{split}.jsonl") == [{**r, "meta": json.loads(r["meta"])} for r in splits[split]]
    train = [r["messages"][0]["content"] for r in splits["train"]]
    cold, fresh = (read_rows(LONG / "data" / "multiply" / f"{name}.jsonl") for name in ("cold_start", "fresh"))
    assert {r["messages"][0]["content"] for r in cold} <= set(train[:LONG_COLD])  # the cold start's prompts ...
    assert {r["messages"][0]["content"] for r in fresh} <= set(train[LONG_COLD:])  # ... never the fresh data's
    domain = get_domain("multiply")
    for row in cold + fresh:
        assert domain.verify(row["meta"], row["messages"][1]["content"]).correct
    for name, rows, prompts in (("cold_start", cold, LONG_COLD), ("fresh", fresh, LONG_TRAIN - LONG_COLD)):
        stats = json.loads((LONG / "data" / "multiply" / f"{name}.cost.json").read_text())
        assert stats["samples"] == prompts and stats["kept"] == len(rows) >= 0.8 * prompts  # one sample per prompt
        assert stats["positions"] > sum(len(r["messages"][1]["content"]) for r in rows)  # rejected samples count too
        flops, n = data_cost(LONG / "data" / "multiply" / f"{name}.jsonl")
        assert n == len(rows) and flops > 0


@pytest.mark.slow
def test_the_long_horizon_teacher_masters_multiplication(tmp_path):
    out = tmp_path / "t.json"
    opd("eval", str(LONG / "teachers" / "multiply"), "--world", str(LONG), "--samples", str(SAMPLES), "--json", str(out),
        "--greedy-only", "--max-new-tokens", "400")
    assert json.loads(out.read_text())["multiply"]["accuracy"] >= 0.9
