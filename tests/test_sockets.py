"""Nothing a local OPD job opens listens beyond loopback (issue 18): the listening sockets of every
process of a running job — the trainer ranks (rendezvous store, gloo), the rollout and teacher
servers, the weight-update group (store and gloo on both ends) — sampled while it runs."""
import ipaddress
import os
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO

RECIPE = REPO / "recipes" / "tiny" / "opd_arith.yaml"
# TP2 x PP2 (4 local ranks), the rollout engine in its own server, synced over a gloo weight-update group
RUN = ["model.hf_path=assets/tiny/student_init", "train.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=4",
       "rollout.max_new_tokens=16", "train.steps=3", "train.save_interval=0", "eval.samples=4", "eval.max_new_tokens=8",
       "rollout.engine=embedded_server", "rollout.sync=distributed", "rollout.max_staleness=0"]


def _role(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    if "serve" in cmd:
        return f"{cmd[cmd.index('--role') + 1]} server"
    if "run" not in cmd:
        return " ".join(cmd[:3])
    name = proc.name()  # a rank forked by the local launcher is named opd-rank-N; a spawned one has RANK in its environment
    return f"trainer rank {name.removeprefix('opd-rank-') if name.startswith('opd-rank-') else proc.environ().get('RANK', '?')}"


@pytest.mark.slow
def test_every_socket_a_running_opd_job_listens_on_is_loopback(tmp_path):
    log = open(tmp_path / "run.log", "w")
    job = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "run", str(RECIPE), *RUN,
                            f"run.output_dir={tmp_path / 'run'}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    listening: dict[tuple[str, int], str] = {}
    try:
        while job.poll() is None:
            try:
                tree = {p.pid: p for p in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]}
            except psutil.NoSuchProcess:
                break
            for conn in psutil.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in tree and (conn.laddr.ip, conn.laddr.port) not in listening:
                    listening[(conn.laddr.ip, conn.laddr.port)] = _role(tree[conn.pid])
            time.sleep(0.2)
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    assert job.returncode == 0, (tmp_path / "run.log").read_text()[-4000:]
    roles = set(listening.values())
    # seen listening: all four ranks (gloo), rank 0's stores, the rollout server (HTTP + its gloo end of
    # the update group) and the teacher server
    assert {"trainer rank 0", "trainer rank 1", "trainer rank 2", "trainer rank 3", "rollout server",
            "teacher server"} <= roles, listening
    exposed = {addr: role for addr, role in listening.items() if not ipaddress.ip_address(addr[0]).is_loopback}
    assert not exposed, f"listening beyond loopback: {exposed}"
