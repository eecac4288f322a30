"""`opd launch --executor slurm` on a real Slurm cluster: the local 3-node cluster of
`tools/local_slurm.sh` (slurmctld + three slurmd on this machine; `.ci/run` brings it up and down).
The tiny CPU recipe's heterogeneous job runs the trainer (torchrun, TP2 over gloo), the rollout server
and two teacher replicas on three different nodes; the trainer syncs its weights into the rollout
server across groups, checkpoints on Slurm's warning signal, requeues itself, and writes its results."""
import json
import os
import re
import subprocess
import time

import pytest

from helpers import REPO, opd

LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"


@pytest.fixture(scope="module")
def slurm():
    """The local cluster, brought up if it is not (idempotent); its SLURM_CONF for the commands."""
    if os.geteuid() != 0 and not os.environ.get("SLURM_CONF"):
        pytest.skip("needs root: the Slurm tests start a local cluster (sudo bash tools/local_slurm.sh up), or an "
                    "existing cluster's SLURM_CONF")
    conf = os.environ.get("SLURM_CONF") or "/tmp/opd-slurm/slurm.conf"
    if os.geteuid() == 0:
        subprocess.run(["bash", str(LOCAL_SLURM), "up"], check=True, capture_output=True, text=True, timeout=600)
    return {"SLURM_CONF": conf}


def _scontrol_job(job_id: str, env: dict) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                          env={**os.environ, **env}).stdout


def _wait_for(job_id: str, env: dict, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _in_queue(job_id, env):
            return _scontrol_job(job_id, env)
        time.sleep(3)
    subprocess.run(["scancel", job_id], env={**os.environ, **env})
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f}s:\n{_scontrol_job(job_id, env)}")


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _submit(out, jobs, slurm, *extra):
    launched = opd("launch", "recipes/tiny/slurm_opd.yaml", "model.hf_path=assets/tiny/student_init",
                   f"run.output_dir={out}", "teachers.teachers.arithmetic.batch_size=4", *extra,
                   "--executor", "slurm", "--job-dir", str(jobs), env=slurm)
    return re.search(r"Submitted batch job (\d+)", launched.stdout).group(1)


def _poll(predicate, timeout, what, every=1.0, job=None):
    """Wait for ``predicate``; with ``job`` = (id, env, jobs dir), stop at once if the job has ended without it
    (a job that failed at start would otherwise be waited on for the whole timeout)."""
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if job is not None and time.monotonic() - checked > 5:
            checked = time.monotonic()
            job_id, env, jobs = job
            if not _in_queue(job_id, env) and not predicate():
                raise AssertionError(f"job {job_id} ended before {what}:\n{_trainer_log(jobs, job_id)[-3000:]}")
        time.sleep(every)


def _queue(job_id: str, env: dict) -> list[str]:
    """The controller's state of each component of a job."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          env={**os.environ, **env}).stdout.split()


def _in_queue(job_id: str, env: dict) -> bool:
    return any(state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for state in _queue(job_id, env))


def _trainer_log(jobs, job_id: str) -> str:
    """The trainer group's log of het job ``job_id`` (nemo-run names it log-<job>-0_<id>_<restart>.out)."""
    return "".join(p.read_text(errors="replace") for p in jobs.rglob(f"log-*-0_{job_id}_*.out"))


def _kill_listener(port: int) -> int:
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            psutil.Process(conn.pid).kill()
            return conn.pid
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.timeout(2700)  # a job, its requeue, on a 2-core machine, each polled with its own bound
@pytest.mark.slow
def test_het_job_on_three_nodes_saves_on_usr1_requeues_itself_and_survives_a_dead_teacher_replica(tmp_path, slurm):
    """Slurm's warning signal (`scancel --signal=USR1`, what `--signal=USR1@N` sends before the time limit)
    reaches the job while its step 4 runs: the trainer finishes that step, checkpoints and requeues the job
    itself; the requeued job resumes from step 4, loses one of the two teacher replicas mid-run (SIGKILL)
    and finishes on the other. Every step is trained once, every prompt of it once."""
    out, jobs = tmp_path / "run", tmp_path / "jobs"
    # rank 0 waits before step 4 for the signal, so it lands in a known step however loaded the machine is
    job = _submit(out, jobs, {**slurm, "OPD_FAULT_INJECT": "signal:4"}, "train.steps=10")
    _poll(lambda: "waits for a stop signal before step 4" in _trainer_log(jobs, job), 900, "step 4",
          job=(job, slurm, jobs))
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env={**os.environ, **slurm})
    _poll(lambda: "stopped on SIGUSR1 after step 4" in _trainer_log(jobs, job), 300, "the checkpoint on the signal",
          job=(job, slurm, jobs))
    # Slurm holds a requeued job for two minutes (its begin time, against requeue loops); let it start now
    _poll(lambda: _queue(job, slurm) == ["PENDING"] * 3, 300, "the requeued job pending")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env={**os.environ, **slurm})
    # the requeued job (the same id, its logs numbered by SLURM_RESTART_COUNT) resumes at step 4; kill a teacher
    # replica once it has trained a step: its teachers have passed their start-up health check (a replica dead
    # by then would only be left out of the rotation, never failing a request) and five steps are still to come
    _poll(lambda: "step 5/10" in _trainer_log(jobs, job), 900, "the requeued job's first step", every=0.05)
    _kill_listener(31101)  # one teacher replica dies; the other one serves on
    info = _wait_for(job, slurm, timeout=900)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(jobs.rglob("*.out")))
    assert (out / "results.json").is_file(), f"no results.json\n{info}\n{logs}"
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, f"{info}\n{logs}"
    # each het component on its own node: trainer, rollout, teacher
    nodes = re.findall(r"^\s*NodeList=(\S+)", info, flags=re.M)
    assert sorted(nodes) == ["node1", "node2", "node3"], info
    log = _trainer_log(jobs, job)
    assert "requeueing job" in log and re.search(r"resumed from \S+ at step 4\b", log)
    assert "a teacher server on" in logs and "1 still serving" in logs

    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]) == {"before", "after"} and "arithmetic" in results["eval"]["after"]
    counters = results["teacher_counters"]["arithmetic"]
    assert counters["failures"] >= 1 and counters["retries"] >= 1  # the dead replica's batches, retried
    # the counters went into the checkpoint taken on the signal and the requeued job went on from them:
    # every sample of the ten steps scored once
    assert counters["samples"] == 10 * 8 * 2
    # the retries are in the trainer's log and its metrics as they happen, not only in results.json
    assert "[teacher 'arithmetic'] http://" in log  # the failover policy's retry line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["teachers/arithmetic/retries"] == counters["retries"] >= 1
    for r in rows:  # every step sampled by the weights of the step before, synced across the groups
        assert r["rollout/staleness_0"] == 1.0
        assert r["opd/train_inference_mismatch"] <= 1e-5  # the rollout server holds exactly the trainer's weights
    # no step redone, no prompt repeated or lost: steps 1..10 once each, 16 samples each, 80 distinct prompt draws
    audit = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [a["step"] for a in audit] == list(range(1, 11))
    assert all(len(a["prompt_rows"]) == 16 for a in audit)
    assert len({row for a in audit for row in a["prompt_rows"]}) == 10 * 8  # of the first epoch's prompts, each once


def _sacct(job_id: str, env: dict) -> dict:
    """sacct's row of a job (the cluster's accounting: slurmdbd over MariaDB)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Start,End"], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True).stdout.split("\n")[0].split("|")
    return {"id": out[0], "state": out[1], "start": out[2], "end": out[3]}


def _chain_ids(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"^(\w+): Submitted batch job (\d+)", stdout, flags=re.M)


@pytest.mark.slow
def test_refused_submission_and_cancelled_chain(tmp_path, slurm):
    """sbatch's own refusal is the error; `opd launch --cancel` stops a submitted chain before it runs."""
    refused = opd("launch", "recipes/tiny/slurm_cascade.yaml", "launch.slurm.partition=nope", "--executor", "slurm",
                  "--job-dir", str(tmp_path / "refused"), env=slurm, check=False)
    assert refused.returncode != 0 and "sbatch refused the job" in refused.stderr
    assert "invalid partition" in refused.stderr.lower(), refused.stderr

    out, jobs = tmp_path / "run", tmp_path / "jobs"
    scontrol = lambda *a: subprocess.run(["scontrol", "update", "nodename=node[1-3]", *a], check=True,  # noqa: E731
                                         env={**os.environ, **slurm})
    scontrol("state=drain", "reason=opd-test-hold")  # no node takes the jobs until they are cancelled
    try:
        launched = opd("launch", "recipes/tiny/slurm_cascade.yaml", f"run.output_dir={out}", "--executor", "slurm",
                       "--job-dir", str(jobs), env=slurm)
        ids = _chain_ids(launched.stdout)
        assert [name for name, _ in ids] == ["sft", "opd"]
        shown = opd("launch", "--status", str(jobs), env=slurm).stdout
        assert re.search(rf"^sft: Slurm job {ids[0][1]} PENDING", shown, flags=re.M), shown
        cancelled = opd("launch", "--cancel", str(jobs), env=slurm).stdout
        assert cancelled.count("-> cancelled") == 2, cancelled
        _poll(lambda: all(_sacct(i, slurm)["state"].startswith("CANCELLED") for _, i in ids), 60, "both jobs cancelled")
    finally:
        scontrol("state=resume")
    assert not (out / "sft").exists()  # nothing ran
    after = opd("launch", "--status", str(jobs), env=slurm).stdout
    assert after.count("CANCELLED") == 2, after


@pytest.mark.slow
def test_cascade_as_a_chain_of_jobs(tmp_path, slurm):
    """A two-stage cascade as two jobs: the OPD stage's job waits on the SFT stage's (afterok), runs
    after it ended, and starts from the SFT stage's output; the last job writes the results."""
    out, jobs = tmp_path / "cascade", tmp_path / "jobs"
    shorter = ["sft.train.steps=20", "sft.train.save_interval=10", "eval.samples=8"]  # what is tested is the chain
    launched = opd("launch", "recipes/tiny/slurm_cascade.yaml", f"run.output_dir={out}", *shorter, "--executor", "slurm",
                   "--job-dir", str(jobs), env=slurm)
    ids = _chain_ids(launched.stdout)
    assert [name for name, _ in ids] == ["sft", "opd"] and f"(afterok:{ids[0][1]})" in launched.stdout
    assert f"Dependency=afterok:{ids[0][1]}" in _scontrol_job(ids[1][1], slurm)  # Slurm holds the second
    info = _wait_for(ids[1][1], slurm, timeout=1500)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(jobs.rglob("*.out")))
    first, second = _sacct(ids[0][1], slurm), _sacct(ids[1][1], slurm)
    assert first["state"] == second["state"] == "COMPLETED", f"{first}\n{second}\n{info}\n{logs}"
    assert second["start"] >= first["end"]  # ISO timestamps: the OPD job started after the SFT job ended
    shown = opd("launch", "--status", str(jobs), env=slurm).stdout
    assert re.search(rf"^sft: Slurm job {ids[0][1]} SUCCEEDED", shown, flags=re.M), shown
    assert re.search(rf"^opd: Slurm job {ids[1][1]} SUCCEEDED", shown, flags=re.M), shown

    state = json.loads((out / "cascade_state.json").read_text())
    assert state["opd"]["init"] == state["sft"]["hf"] == str(out / "sft" / "hf")
    assert _steps(out / "sft" / "metrics.jsonl")[-1] == 20
    assert _steps(out / "opd" / "metrics.jsonl") == [1, 2, 3, 4]
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["sft", "opd"]
    assert results["kept_from_earlier_run"] == ["sft"]  # the second job kept the first job's stage
    assert "stopped after stage sft (--through)" in logs
