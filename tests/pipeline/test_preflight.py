"""Bad input stops the run before it starts, with a message naming what is wrong."""
import json

import pytest
import yaml

from helpers import opd, sft_recipe, torchrun


def _recipe(tiny_world, tmp_path, **edit):
    path = sft_recipe(tiny_world, tmp_path / "out")
    raw = yaml.safe_load(path.read_text())
    for dotted, value in edit.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr


def test_misspelled_key_suggests_the_right_one(tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path)
    _fails(opd("run", str(recipe), "train.stpes=3", check=False), "train.stpes: unknown key (did you mean 'steps'?)")
    _fails(opd("run", str(recipe), "optimizer.lr=3", check=False), "optimizer: unknown key")


def test_wrong_type_names_the_field(tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path)
    _fails(opd("run", str(recipe), "train.steps=many", check=False), "train.steps: Input should be a valid integer")
    _fails(opd("run", str(recipe), "train.global_batch_size=6", check=False), "multiple of train.micro_batch_size")


def test_heads_not_divisible_by_tp(tiny_world, tmp_path):
    _fails(opd("run", str(_recipe(tiny_world, tmp_path)), "parallel.tp=3", check=False),
           "num_attention_heads (4) and num_key_value_heads (2) must be divisible by tp=3")


def test_process_count_must_match_layout(tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path, parallel__tp=2, parallel__pp=2)
    proc = torchrun(2, ["-m", "megatron_opd.cli", "run", str(recipe)], check=False)
    assert proc.returncode != 0
    assert "this job needs 4 processes but 2 were started" in proc.stderr


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    _fails(opd("convert", "hf-to-megatron", str(tmp_path / "gpt2"), str(tmp_path / "o"), check=False),
           "architecture ['GPT2LMHeadModel'] is not supported", "LlamaForCausalLM")


@pytest.mark.slow
def test_missing_and_corrupt_checkpoints(tiny_hf, tmp_path):
    _fails(opd("export-hf", str(tmp_path / "nowhere"), str(tmp_path / "o"), check=False), "nowhere: checkpoint not found")
    (tmp_path / "empty").mkdir()
    _fails(opd("export-hf", str(tmp_path / "empty"), str(tmp_path / "o"), check=False), "no complete checkpoint")
    opd("convert", "hf-to-megatron", str(tiny_hf["llama"]), str(tmp_path / "ck"))
    shard = max((tmp_path / "ck" / "step-00000000" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(opd("export-hf", str(tmp_path / "ck"), str(tmp_path / "o"), check=False),
           "step-00000000/dist: missing, corrupt or not this model's checkpoint")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_bad_rows_are_reported_by_the_run(tiny_world, tmp_path):
    rows = [json.loads(line) for line in tiny_world["train"].read_text().splitlines()][:40]
    rows[3] = {"domain": "count", "prompt": "no messages"}
    rows[5]["messages"][1]["content"] = ""
    data = tmp_path / "dirty.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tiny_world, tmp_path, data__train=str(data), train__steps=1)
    proc = opd("run", str(recipe))
    assert "38/40 rows kept, 1 skipped (bad messages), 1 skipped (missing messages)" in proc.stdout
    assert "row 5: empty assistant turn" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["train_skipped"] == {"bad messages": 1, "missing messages": 1}


@pytest.mark.skipif(bool(list(__import__("pathlib").Path("/dev").glob("nvidia[0-9]*"))), reason="this machine has a GPU")
def test_an_engine_or_teacher_on_cuda_without_a_gpu_stops_before_anything_starts():
    proc = opd("run", "recipes/tiny/opd_arith.yaml", "model.hf_path=assets/tiny/student_init", "rollout.device=cuda",
               "teachers.teachers.arithmetic.device=cuda", check=False)
    _fails(proc, "teachers.teachers.arithmetic.device, rollout.device: cuda, but this machine has no NVIDIA GPU")
    proc = opd("serve", "--model", "assets/tiny/student_init", "--device", "tpu", check=False)
    _fails(proc, "--device 'tpu': expected 'cpu' or 'cuda'")
