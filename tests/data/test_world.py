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


@pytest.mark.slow
def test_teachers_master_their_domain_and_the_student_has_room(tmp_path):
    teachers = {name: _eval(WORLD / "teachers" / name, tmp_path, name, name)[name]["accuracy"] for name in DOMAINS}
    assert all(acc >= 0.9 for acc in teachers.values()), teachers
    out = tmp_path / "student"
    opd("run", "recipes/tiny/sft.yaml", f"run.output_dir={out}")
    student = _eval(out / "hf", tmp_path, "student")
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
