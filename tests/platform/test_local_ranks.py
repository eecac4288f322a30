"""platform/local_ranks.py: a local multi-rank job, its ranks forked from one process that loaded the
stack (the default without a GPU) or spawned as fresh processes (GPU nodes, OPD_LOCAL_RANKS=spawn):
the same training step either way, and the forked ranks are real, separately named processes."""
import os
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO, read_metrics, sft_recipe


def _run(recipe, mode: str | None) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **({"OPD_LOCAL_RANKS": mode} if mode else {})}
    job = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "run", str(recipe)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    names: set[str] = set()
    while job.poll() is None:
        try:
            names |= {p.name() for p in psutil.Process(job.pid).children(recursive=True)}
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = job.stdout.read()
    assert job.returncode == 0, output[-4000:]
    return names


@pytest.mark.slow
def test_forked_and_spawned_ranks_train_the_same_step(tiny_world, tmp_path):
    losses, names = {}, {}
    for mode in (None, "spawn"):
        out = tmp_path / (mode or "fork")
        names[mode] = _run(sft_recipe(tiny_world, out, tp=1, pp=2, steps=2), mode)
        losses[mode] = [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in read_metrics(out) if "train/loss" in r]
    assert [s for s, _, _ in losses[None]] == [1, 2]
    assert losses[None] == losses["spawn"]  # bit for bit
    assert {"opd-rank-0", "opd-rank-1"} <= names[None], names[None]
    assert not any(n.startswith("opd-rank-") for n in names["spawn"]), names["spawn"]


def test_the_launcher_checks_an_opd_run_and_starts_its_ranks_without_importing_torch(tmp_path):
    """The `opd run` process of a multi-rank job only validates, checks its inputs and supervises the ranks: the
    stack (torch ~1.2 s of CPU, megatron-core) loads in the ranks' process, never also in the launcher."""
    code = (
        "import json, sys\n"
        "import megatron_opd.platform.local_ranks as local_ranks\n"
        "import megatron_opd.cli as cli\n"
        "def launched(nproc, argv):  # where the ranks would start: what the launcher imported by then\n"
        "    print(json.dumps({'nproc': nproc, 'torch': 'torch' in sys.modules, 'megatron': 'megatron.core' in sys.modules}))\n"
        "    return 0\n"
        "local_ranks.relaunch_local = launched\n"
        "sys.argv = ['opd', 'run', 'recipes/tiny/opd_arith.yaml', 'model.hf_path=assets/tiny/student_init', "
        f"'run.output_dir={tmp_path / 'run'}']\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == '{"nproc": 4, "torch": false, "megatron": false}', proc.stdout
