"""The shipped tiny world: reproducible data, teachers that master their domain, a cold-started
student that sits clearly below them (room for OPD) but above zero."""
import json

import pytest

from conftest import REPO, opd
from megatron_opd.data.domains import DOMAINS, get_domain
from megatron_opd.data.world import make_splits, read_rows

WORLD = REPO / "assets" / "tiny"
SAMPLES = 200  # the whole held-out split


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
    args = ["eval", str(ckpt), "--samples", str(SAMPLES), "--json", str(out)]
    proc = opd(*args, *(["--domains", domains] if domains else []))
    print(proc.stdout)
    return json.loads(out.read_text())


def test_teachers_master_their_domain_and_the_student_has_room(tmp_path):
    teachers = {name: _eval(WORLD / "teachers" / name, tmp_path, name, name)[name]["accuracy"] for name in DOMAINS}
    assert all(acc >= 0.9 for acc in teachers.values()), teachers
    out = tmp_path / "student"
    opd("run", "recipes/tiny/sft.yaml", f"run.output_dir={out}")
    student = _eval(out / "hf", tmp_path, "student")
    for name in DOMAINS:
        acc = student[name]["accuracy"]
        assert 0.0 < acc <= teachers[name] - 0.2, (name, acc, teachers[name])
