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


def _tmpfs(path, *options):
    """A small tmpfs mounted at ``path`` (root only), or skip: the tests that fill or freeze a file system."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return path


def test_an_output_dir_that_cannot_hold_the_run_stops_it_before_anything_starts(tiny_world, tmp_path):
    import subprocess

    recipe = _recipe(tiny_world, tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    _fails(opd("run", str(recipe), "run.output_dir=/", check=False), "run.output_dir /: a system directory")
    _fails(opd("run", str(recipe), "run.output_dir=/usr/lib/opd-run", check=False), "a system directory (/usr/lib/opd-run)")
    _fails(opd("run", str(recipe), f"run.output_dir={a_file}", check=False), "exists and is not a directory")
    _fails(opd("run", str(recipe), f"run.output_dir={a_file}/run", check=False), "not writable")
    frozen = _tmpfs(tmp_path / "frozen", "ro", "size=1m")
    full = _tmpfs(tmp_path / "full", "size=64k")  # the tiny student's checkpoint is ~1 MiB
    try:
        _fails(opd("run", str(recipe), f"run.output_dir={frozen}/run", check=False), "not writable (Read-only file system)")
        _fails(opd("run", str(recipe), f"run.output_dir={full}/run", check=False), "MiB free on its file system, and one "
               "checkpoint of this model needs about")
    finally:
        subprocess.run(["umount", str(frozen)], check=False)
        subprocess.run(["umount", str(full)], check=False)


def test_a_second_run_into_a_locked_directory_stops_at_once_naming_the_holder(tiny_world, tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    recipe = _recipe(tiny_world, tmp_path)
    run_dir = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatron_opd.platform.run_lock import lock_run_dir; "
                               "lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = opd("run", str(recipe), f"run.output_dir={run_dir}", check=False)
        _fails(refused, f"run.output_dir {run_dir} is in use by another run (pid {holder.pid} on host")
    finally:
        holder.kill()  # SIGKILL: no clean-up, and the kernel frees the lock
        holder.wait()
    taken = subprocess.run([sys.executable, "-c", "import sys; from megatron_opd.platform.run_lock import lock_run_dir; "
                            "lock_run_dir(sys.argv[1]); print('taken')", str(run_dir)], capture_output=True, text=True, cwd=REPO)
    assert taken.stdout.strip() == "taken", taken.stderr
