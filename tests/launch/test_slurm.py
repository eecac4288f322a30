"""Slurm launch through nemo-run, dry-run only (no Slurm here): the generated sbatch script and the
per-group scripts are checked line by line, and the URL wiring is executed by bash with a stand-in
`scontrol` that prints a node list."""
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO, TESTS, opd

from megatron_opd.config import ConfigError, load_recipe

QWEN3_OPD = REPO / "recipes" / "qwen3" / "opd_math.yaml"


def _dry_run(tmp_path, recipe, *overrides):
    run = opd("launch", str(recipe), *overrides, "--executor", "slurm", "--dry-run", "--job-dir", str(tmp_path / "jobs"))
    path = Path(re.search(r"wrote (\S+)", run.stdout).group(1))
    scripts = sorted(path.parent.glob("*/scripts/*.sh"))
    return path.read_text(), [s.read_text() for s in scripts]


def test_slurm_dry_run_places_trainer_rollout_and_teacher_groups(tmp_path):
    sbatch, (trainer, rollout, teacher) = _dry_run(tmp_path, QWEN3_OPD)
    # three heterogeneous groups: 2 trainer nodes, 1 rollout node, 1 teacher node, 8 GPUs each
    assert sbatch.count("#SBATCH hetjob") == 2
    assert re.findall(r"#SBATCH --nodes=(\d+)", sbatch) == ["2", "1", "1"]
    assert re.findall(r"#SBATCH --gpus-per-node=(\d+)", sbatch) == ["8", "8", "8"]
    assert sbatch.count("#SBATCH --account=my_account") == 3 and sbatch.count("#SBATCH --time=08:00:00") == 3
    for group in range(3):
        line = next(ln for ln in sbatch.splitlines() if ln.startswith(f"srun --het-group={group} "))
        assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in line and "--container-mounts /lustre:/lustre," in line
    assert "export NCCL_DEBUG=WARN" in sbatch and "export OPD_TRAINER_HEAD=$het_group_host_0" in sbatch
    # trainer: waits for every server, then torchrun over c10d on group 0's first node
    assert "cd /lustre/code/megatron-opd" in trainer
    assert 'wait-servers --timeout 1800 --api-key-env OPD_SERVER_KEY "$OPD_ROLLOUT_URLS" "$OPD_TEACHER_MATH_URLS"' in trainer
    assert ("python -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
            "--rdzv-endpoint=$OPD_TRAINER_HEAD:29500") in trainer
    assert "-m megatron_opd.cli run " + str(QWEN3_OPD) in trainer
    assert ('"rollout.urls=[$OPD_ROLLOUT_URLS]" "rollout.api_key_env=OPD_SERVER_KEY" '
            '"teachers.teachers.math.urls=[$OPD_TEACHER_MATH_URLS]"') in trainer
    # rollout node: 4 SGLang servers of TP2 on their own GPUs and ports, serving the student
    servers = [ln for ln in rollout.splitlines() if "sglang.launch_server" in ln]
    assert [re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", ln).group(1) for ln in servers] == ["0,1", "2,3", "4,5", "6,7"]
    assert [re.search(r"--port (\d+)", ln).group(1) for ln in servers] == ["30000", "30001", "30002", "30003"]
    assert all("--model-path /lustre/models/Qwen3-1.7B " in ln and "--tp-size 2" in ln and "--host 0.0.0.0" in ln for ln in servers)
    teacher_servers = [ln for ln in teacher.splitlines() if "sglang.launch_server" in ln]
    assert len(teacher_servers) == 2 and all("--model-path /lustre/models/Qwen3-8B " in ln and "--tp-size 4" in ln
                                             for ln in teacher_servers)


def test_url_wiring_expands_to_every_server_of_every_node(tmp_path):
    """Run the batch script's URL exports under bash with a stand-in `scontrol`."""
    sbatch, _ = _dry_run(tmp_path, REPO / "recipes" / "qwen3" / "mopd.yaml")
    exports = list(dict.fromkeys(ln for ln in sbatch.splitlines() if ln.startswith("export OPD_") and "URLS" in ln))
    assert len(exports) == 4  # rollout + three teachers, in het groups 1..4
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\n# scontrol show hostnames <list>: one host per line\n'
                                   'case "$3" in g1) printf "r1\\n";; g2) printf "m1\\n";; g3) printf "c1\\n";; g4) printf "i1\\n";; esac\n')
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", **{f"SLURM_JOB_NODELIST_HET_GROUP_{i}": f"g{i}" for i in range(1, 5)}}
    script = "\n".join(exports) + '\necho "$OPD_ROLLOUT_URLS|$OPD_TEACHER_MATH_URLS|$OPD_TEACHER_IF_URLS"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True).stdout.strip()
    rollout, math, if_ = out.split("|")
    assert rollout == ",".join(f"http://r1:{p}" for p in range(30000, 30004))
    assert math == "http://m1:31000,http://m1:31001"
    assert if_ == ",".join(f"http://i1:{p}" for p in range(31000, 31004))
    # two nodes in a group: every server on every node
    (fake / "scontrol").write_text('#!/bin/bash\nprintf "a\\nb\\n"\n')
    two = subprocess.run(["bash", "-c", exports[0] + '\necho "$OPD_ROLLOUT_URLS"'], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert two.split(",") == [f"http://{h}:{p}" for h in "ab" for p in range(30000, 30004)]


def test_single_group_job_for_sft_uses_the_head_node(tmp_path):
    sbatch, (trainer,) = _dry_run(tmp_path, REPO / "recipes" / "qwen3" / "sft.yaml", "train.steps=10")
    assert "hetjob" not in sbatch and "#SBATCH --nodes=2" in sbatch
    assert "export OPD_TRAINER_HEAD=$head_node_ip" in sbatch
    assert "--nnodes=2 --nproc-per-node=8" in trainer and "wait-servers" not in trainer
    launch = next(line for line in trainer.splitlines() if "torch.distributed.run" in line)
    assert launch.endswith("train.steps=10 || rc=$?")  # the command line's overrides reach the job


def test_the_trainer_checkpoints_on_slurms_warning_and_requeues_the_job(tmp_path):
    """`--signal=USR1@<grace>` asks Slurm for the warning; the trainer's script ignores it itself (the ranks
    handle it), and requeues the job when they stopped on it: exit 75, or rank 0's marker (torchrun's own
    exit code hides the ranks'). Run with a stand-in torchrun and scontrol: each way out, what the script does."""
    sbatch, (trainer, rollout, teacher) = _dry_run(tmp_path, QWEN3_OPD, "launch.slurm.signal_grace_s=120")
    assert sbatch.count("#SBATCH --signal=USR1@120") == 3
    for script in (trainer, rollout, teacher):
        assert "trap '' USR1" in script
    body = trainer.replace("cd /lustre/code/megatron-opd", f"cd {tmp_path}").replace("/lustre/runs/qwen3-1.7b-opd-math",
                                                                                      str(tmp_path / "run"))
    body = re.sub(r"^python -m megatron_opd.cli wait-servers.*$", "", body, flags=re.M)
    (tmp_path / "run").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/bash\n[ -n \"$MARK\" ] && touch \"$MARK\"\nexit $CODE\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$CALLS\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for code, mark, requeued, rc in [(0, "", False, 0), (2, "", False, 2), (75, "", True, 0), (1, "stopped.json", True, 0)]:
        calls = tmp_path / f"calls-{code}"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CODE": str(code), "CALLS": str(calls), "SLURM_JOB_ID": "42",
               "OPD_TRAINER_HEAD": "node1", "OPD_ROLLOUT_URLS": "http://node2:30000", "OPD_TEACHER_MATH_URLS": "http://node3:31000",
               "MARK": str(tmp_path / "run" / mark) if mark else ""}
        done = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True)
        assert done.returncode == rc, (code, done.stderr)
        assert (calls.read_text() if calls.exists() else "") == ("scontrol requeue 42\n" if requeued else ""), code
        assert not (tmp_path / "run" / "stopped.json").exists() or mark  # the script clears an earlier marker first
        (tmp_path / "run" / "stopped.json").unlink(missing_ok=True)


SLURM_RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                       if "slurm:" in p.read_text() and "kind: cascade" not in p.read_text())
CASCADE_CHAINS = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                        if "slurm:" in p.read_text() and "kind: cascade" in p.read_text())


@pytest.mark.parametrize("recipe", SLURM_RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in SLURM_RECIPES])
@pytest.mark.slow
def test_every_slurm_recipe_dry_runs_with_its_own_placement(tmp_path, recipe):
    slurm = load_recipe(recipe).launch.slurm
    groups = [slurm.trainer] + ([slurm.rollout] if slurm.rollout else []) + list(slurm.teachers.values())
    sbatch, scripts = _dry_run(tmp_path, recipe)
    assert re.findall(r"#SBATCH --nodes=(\d+)", sbatch) == [str(g.nodes) for g in groups]
    assert sbatch.count("#SBATCH hetjob") == len(groups) - 1 and len(scripts) == len(groups)
    assert f"--nnodes={slurm.trainer.nodes} --nproc-per-node={slurm.trainer.procs}" in scripts[0]
    assert "-m megatron_opd.cli run " + str(recipe) in scripts[0]


@pytest.mark.parametrize("recipe", CASCADE_CHAINS, ids=[str(p.relative_to(REPO / "recipes")) for p in CASCADE_CHAINS])
def test_a_cascade_dry_runs_to_one_job_per_stage(tmp_path, recipe):
    cascade = load_recipe(recipe, ["stages.train.steps=3"])
    run = opd("launch", str(recipe), "stages.train.steps=3", "--executor", "slurm", "--dry-run", "--job-dir", str(tmp_path))
    written = [Path(p) for p in re.findall(r"wrote (\S+)", run.stdout)]
    assert [p.name for p in written] == [f"{s.name}_sbatch.sh" for s in cascade.stages]
    for stage, path in zip(cascade.stages, written):
        sbatch = path.read_text()
        assert "hetjob" not in sbatch and "#SBATCH --nodes=1" in sbatch and "--dependency" not in sbatch
        (script,) = path.parent.glob(f"{stage.name}/scripts/*.sh")
        # every job runs the cascade with the command line's overrides, through its own stage (and requeues itself
        # when the stage stopped on Slurm's warning with a checkpoint: exit 75)
        text = script.read_text()
        assert f"run {recipe} stages.train.steps=3 --through {stage.name} || rc=$?" in text
        assert '[ "$rc" = 75 ]; then' in text and "trap '' USR1" in text
    # a chain places no server groups of its own (each stage starts its servers in its allocation)
    with pytest.raises(ConfigError, match="launch.slurm.rollout / launch.slurm.teachers"):
        load_recipe(recipe, ["launch.slurm.teachers.x.nodes=1"])
    with pytest.raises(ConfigError, match="launch.slurm.trainer.nodes: 2"):
        load_recipe(recipe, ["launch.slurm.trainer.nodes=2"])


def test_slurm_launch_without_sbatch_stops_before_writing(tmp_path):
    """Not a Slurm login node (no `sbatch`): stopped before anything is written. Submission itself is
    tested against the real local cluster (tests/launch/test_slurm_cluster.py)."""
    bare = opd("launch", str(QWEN3_OPD), "--executor", "slurm", "--job-dir", str(tmp_path / "none"),
               env={"PATH": os.path.dirname(sys.executable)}, check=False)
    assert bare.returncode == 2 and "`sbatch`, which is not on PATH" in bare.stderr
    assert not (tmp_path / "none").exists()


def test_placement_is_validated_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"launch.slurm.trainer: 2 nodes x 8 GPUs = 16 processes, but parallel tp x pp x dp = 8"):
        load_recipe(QWEN3_OPD, ["parallel.dp=4"])
    with pytest.raises(ConfigError, match=r"launch.slurm.teachers: \['code'\] are not in teachers.teachers"):
        load_recipe(QWEN3_OPD, ["launch.slurm.teachers.code.nodes=1"])
    with pytest.raises(ConfigError, match="servers_per_node"):
        load_recipe(QWEN3_OPD, ["launch.slurm.rollout.servers_per_node=3"])
    bad = opd("launch", str(REPO / "recipes" / "tiny" / "opd_arith.yaml"), "--executor", "slurm", "--dry-run",
              "--job-dir", str(tmp_path / "jobs"), check=False)
    assert bad.returncode == 2 and "launch.slurm: this recipe has no Slurm placement" in bad.stderr
    assert not (tmp_path / "jobs").exists()
    direct = opd("run", str(QWEN3_OPD), "model.hf_path=assets/tiny/student_init", "parallel.tp=1", "parallel.dp=1",
                 "launch.slurm.trainer.nodes=1", "launch.slurm.trainer.gpus_per_node=1",
                 "data.train=[assets/tiny/data/arithmetic/train.jsonl]", check=False)
    # without the launcher nothing fills rollout.urls: stopped before any process starts
    assert direct.returncode == 2 and "rollout.urls: empty" in direct.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_servers_blocks_until_healthy_and_names_the_dead_one():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert "all servers healthy" in opd("wait-servers", url, "--timeout", "5").stdout
        from megatron_opd.platform.net import free_port

        dead = f"http://127.0.0.1:{free_port()}"
        bad = opd("wait-servers", f"{url},{dead}", "--timeout", "3", check=False)
        assert bad.returncode == 2 and dead in bad.stderr and url not in bad.stderr.split("healthy after")[1]
    finally:
        server.shutdown()


@pytest.mark.slow
def test_local_executor_runs_the_stage_and_reports_failure(tmp_path):
    """`opd launch --executor local`: nemo-run's LocalExecutor runs `opd run` for real."""
    out = tmp_path / "sft"
    ok = opd("launch", str(REPO / "recipes" / "tiny" / "sft.yaml"), "train.steps=2", "train.save_interval=0",
             "data.eval_max_rows=8", f"run.output_dir={out}", "--executor", "local", "--job-dir", str(tmp_path / "jobs"))
    assert "[sft] step 2/2" in ok.stdout and (out / "hf" / "model.safetensors").is_file() and (out / "report.md").is_file()
    assert list((tmp_path / "jobs" / "experiments").glob("sft/*"))  # nemo-run's experiment record
    bad = opd("launch", str(REPO / "recipes" / "tiny" / "sft.yaml"), "data.train=[missing.jsonl]",
              f"run.output_dir={tmp_path / 'bad'}", "--executor", "local", "--job-dir", str(tmp_path / "jobs2"), check=False)
    assert bad.returncode == 1 and "nemo-run job sft: FAILED" in bad.stdout and "missing.jsonl" in bad.stdout


GOLDEN = TESTS / "golden" / "slurm"
GPU_RECIPES = ["qwen3/sft", "qwen3/opd_math", "qwen3/mopd", "llama3/opd"]


def _normalized(text: str, job_dir: Path) -> str:
    """A rendered script without what differs run to run: the job dir and nemo-run's experiment id."""
    return re.sub(r"_\d{16,}", "_<ID>", text.replace(str(job_dir.resolve()), "<JOB_DIR>"))


@pytest.mark.parametrize("name", GPU_RECIPES)
@pytest.mark.slow
def test_gpu_recipes_render_the_recorded_scripts(tmp_path, name):
    """The GPU recipes' sbatch script and group scripts, byte for byte as recorded under tests/golden/slurm
    (recorded from the launcher before the CPU / embedded-server groups of issue 17 were added, which
    left them unchanged; re-recorded once for issue 18's per-job API key. Regenerate on purpose with
    OPD_UPDATE_GOLDEN=1 and read the diff.)"""
    jobs = tmp_path / "jobs"
    run = opd("launch", f"recipes/{name}.yaml", "--executor", "slurm", "--dry-run", "--job-dir", str(jobs))  # from the repo
    sbatch = Path(re.search(r"wrote (\S+)", run.stdout).group(1))
    rendered = {"sbatch.sh": sbatch, **{f"scripts/{p.name.rsplit('-', 1)[-1] if p.stem[-1].isdigit() else 'trainer.sh'}": p
                                       for p in sorted(sbatch.parent.glob("*/scripts/*.sh"))}}
    golden = GOLDEN / name.replace("/", "_")
    for rel, path in rendered.items():
        text = _normalized(path.read_text(), jobs)
        if os.environ.get("OPD_UPDATE_GOLDEN"):
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_text(text)
        assert text == (golden / rel).read_text(), f"{name}: {rel} differs from {golden / rel}"
    assert sorted(str(p.relative_to(golden)) for p in golden.rglob("*.sh")) == sorted(rendered)


def test_the_job_makes_one_api_key_and_every_server_requires_it(tmp_path):
    sbatch, (trainer, rollout, teacher) = _dry_run(tmp_path, QWEN3_OPD)
    exports = [line for line in sbatch.splitlines() if line.startswith("export OPD_SERVER_KEY=")]
    assert exports and len(set(exports)) == 1  # an expression the batch script evaluates: no key in any file
    for script in (rollout, teacher):
        servers = [line for line in script.splitlines() if "sglang.launch_server" in line]
        assert servers and all('--api-key "$OPD_SERVER_KEY"' in line for line in servers)
    assert "wait-servers --timeout 1800 --api-key-env OPD_SERVER_KEY" in trainer
    assert '"rollout.api_key_env=OPD_SERVER_KEY"' in trainer and '"teachers.teachers.math.api_key_env=OPD_SERVER_KEY"' in trainer
    # the exports run once per group in the batch script: the key made by the first one is kept
    twice = subprocess.run(["bash", "-c", f"{exports[0]}; a=$OPD_SERVER_KEY; {exports[0]}; echo $a $OPD_SERVER_KEY"],
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, check=True).stdout.split()
    assert twice[0] == twice[1] and re.fullmatch(r"[0-9a-f]{48}", twice[0])


def test_the_recipes_job_dir_is_where_the_scripts_go_unless_the_command_line_says_otherwise(tmp_path):
    from_recipe = tmp_path / "from_recipe"
    run = opd("launch", str(QWEN3_OPD), f"launch.slurm.job_dir={from_recipe}", "--executor", "slurm", "--dry-run")
    assert Path(re.search(r"wrote (\S+)", run.stdout).group(1)).is_relative_to(from_recipe)
    run = opd("launch", str(QWEN3_OPD), f"launch.slurm.job_dir={from_recipe}", "--executor", "slurm", "--dry-run",
              "--job-dir", str(tmp_path / "flag"))
    assert Path(re.search(r"wrote (\S+)", run.stdout).group(1)).is_relative_to(tmp_path / "flag")
