"""One Slurm job per stage through nemo-run: trainer nodes (torchrun over c10d), SGLang rollout
servers and each teacher's SGLang servers on their own nodes, as heterogeneous job groups.

The batch script computes every server URL from the groups' node lists and hands them to the
trainer as recipe overrides (``rollout.urls=[...]``, ``teachers.teachers.<name>.urls=[...]``);
the trainer waits for every server's ``/health`` before torchrun starts (Slurm starts the groups
in order, trainer first). Servers bind 0.0.0.0 here (the trainer reaches them from other nodes),
each requiring the API key the batch script makes for the job.

``dry_run`` writes the sbatch script without submitting anything (nemo-run's ``Experiment.dryrun``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_opd.config import CascadeConfig, OPDStageConfig, ServerGroup, SFTStageConfig, SlurmConfig
from megatron_opd.platform.signals import EXIT_STOPPED, STOPPED_FILE
from megatron_opd.wire.client import ROUTED_EXPERTS_FLAG as ROUTED_FLAG
from megatron_opd.wire.sglang import SGLangServerConfig

RDZV_PORT = 29500


@dataclass
class Group:
    """One het-job group: what runs on each of its nodes."""

    name: str
    nodes: int
    gpus_per_node: int
    script: str  # bash, run once per node (ntasks-per-node 1)
    env: dict[str, str]


def _env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


KEY_VAR = "OPD_SERVER_KEY"
# one random key per job, made by the batch script with coreutils (the host may have no python); the
# default keeps a re-export of the group's environment from making a second one
KEY_EXPR = f"${{{KEY_VAR}:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')}}"


def _server_script(group: ServerGroup, model: str, dtype: str, role: str, workdir: str) -> str:
    """Start ``servers_per_node`` servers on this node, each on its own port (SGLang: and GPU slice),
    each requiring the job's API key (SGLang: ``--api-key``; ``opd serve``: from ``OPD_API_KEY``, so
    the key is not on its command line)."""
    # trap '' USR1: Slurm's warning before the time limit reaches every process of the job; the servers ignore it
    lines = ["set -u", "trap '' USR1", *([f"cd {shlex.quote(workdir)}"] if group.engine == "embedded" else []), "pids=()"]
    tp = group.gpus_per_node // group.servers_per_node
    for i in range(group.servers_per_node):
        if group.engine == "embedded":
            cmd = ["python", "-m", "megatron_opd.cli", "serve", "--role", role, "--model", model, "--host", group.host,
                   "--port", str(group.port + i), *group.extra_args]
            lines.append(f'OPD_API_KEY="${KEY_VAR}" {shlex.join(cmd)} & pids+=($!)')
            continue
        gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
        server = SGLangServerConfig(model_path=model, host=group.host, port=group.port + i, tp_size=tp, dtype=dtype,
                                    extra_args=tuple(group.extra_args))
        cmd = ["python", *server.command()[1:]]
        lines.append(f'CUDA_VISIBLE_DEVICES={gpus} {shlex.join(cmd)} --api-key "${KEY_VAR}" & pids+=($!)')
    if group.engine == "sglang":
        lines.append('wait -n "${pids[@]}"; echo "an SGLang server exited; stopping this node" >&2; kill "${pids[@]}" 2>/dev/null; exit 1')
    else:  # the replicas are independent: the clients' pools fail over, so a node serves while any is up
        lines.append(f'left=${{#pids[@]}}; while [ "$left" -gt 0 ]; do wait -n; left=$((left - 1)); '
                     f'echo "a {role} server on $(hostname) exited; $left still serving" >&2; done; exit 1')
    return "\n".join(lines) + "\n"


def _stop_and_requeue(command: str, run_dir: str | None, requeue: bool) -> list[str]:
    """Script lines that run ``command`` (the trainer: torchrun, or a cascade's ``opd run``) so that a stop
    on a signal requeues the job. The ranks checkpoint on SIGUSR1 (``--signal=USR1@N``, sent to every
    process of the step) and exit 75; torchrun turns that into its own failure code, so rank 0 also
    writes ``stopped.json`` into the run directory. ``trap '' USR1``: this shell and torchrun ignore
    the warning (the ranks install their own handler over the inherited ignore)."""
    marker = f"{run_dir}/{STOPPED_FILE}" if run_dir else None
    lines = ["trap '' USR1"]
    if marker:
        lines.append(f"rm -f {shlex.quote(marker)}")
    lines.append(f"rc=0; {command} || rc=$?")
    if requeue:
        stopped = f'[ "$rc" = {EXIT_STOPPED} ]' + (f" || [ -f {shlex.quote(marker)} ]" if marker else "")
        lines += [f"if {stopped}; then",
                  '  echo "[opd] stopped on a signal with a checkpoint: requeueing job $SLURM_JOB_ID to resume" >&2',
                  '  scontrol requeue "$SLURM_JOB_ID"; exit 0',
                  "fi"]
    lines.append('exit "$rc"')
    return lines


def _workdir(slurm: SlurmConfig) -> str:
    """The repository on the nodes: an absolute ``workdir`` as given; a relative one taken from where
    ``opd launch`` runs (a shared filesystem, as on this machine's local cluster)."""
    return slurm.workdir if Path(slurm.workdir).is_absolute() else str(Path(slurm.workdir).resolve())


def _urls_expr(het_index: int, group: ServerGroup) -> str:
    """Shell expression: comma-separated http URLs of every server of het group ``het_index``."""
    ports = " ".join(str(group.port + i) for i in range(group.servers_per_node))
    return (f"$(for h in $(scontrol show hostnames $SLURM_JOB_NODELIST_HET_GROUP_{het_index}); "
            f"do for p in {ports}; do printf 'http://%s:%s,' $h $p; done; done | sed 's/,$//')")


def plan(cfg: SFTStageConfig | OPDStageConfig, recipe: str, overrides: list[str]) -> list[Group]:
    """The job's groups for a stage recipe with ``launch.slurm`` (trainer first)."""
    slurm = cfg.launch.slurm
    if slurm is None:
        raise ValueError("launch.slurm: this recipe has no Slurm placement (add a `launch: {slurm: ...}` section)")
    servers: list[tuple[str, ServerGroup, str, str]] = []  # (group name, group, model, override key)
    if isinstance(cfg, OPDStageConfig):
        if slurm.rollout is not None:
            servers.append(("rollout", slurm.rollout, slurm.rollout.model or str(cfg.model.hf_path), "rollout.urls"))
        for name, group in slurm.teachers.items():
            spec = cfg.teachers.teachers[name]  # type: ignore[union-attr]  (checked by the config)
            servers.append((f"teacher-{name}", group, group.model or str(spec.model), f"teachers.teachers.{name}.urls"))
    env = dict(slurm.env)
    url_overrides, url_vars = [], []
    for index, (name, group, _, key) in enumerate(servers, start=1):
        var = f"OPD_{_env_name(name)}_URLS"
        env[var] = _urls_expr(index, group)
        url_overrides.append(f"{key}=[${var}]")
        url_overrides.append(key.replace(".urls", ".api_key_env") + f"={KEY_VAR}")
        url_vars.append(f"${var}")
    if servers:
        env[KEY_VAR] = KEY_EXPR
    trainer = slurm.trainer
    head = "$het_group_host_0" if servers else "$head_node_ip"
    env["OPD_TRAINER_HEAD"] = head
    run_cmd = ["python", "-m", "torch.distributed.run", f"--nnodes={trainer.nodes}", f"--nproc-per-node={trainer.procs}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=$OPD_TRAINER_HEAD:{RDZV_PORT}", "--rdzv-id=$SLURM_JOB_ID",
               "-m", "megatron_opd.cli", "run", recipe]
    lines = ["set -euo pipefail", f"cd {shlex.quote(_workdir(slurm))}"]
    if url_vars:
        lines.append(f"python -m megatron_opd.cli wait-servers --timeout {slurm.server_timeout_s} --api-key-env {KEY_VAR} "
                     + " ".join(f'"{v}"' for v in url_vars))
    train = " ".join([*run_cmd, *(shlex.quote(o) for o in overrides), *(f'"{o}"' for o in url_overrides)])
    lines += _stop_and_requeue(train, str(cfg.run.output_dir), slurm.requeue)
    groups = [Group("trainer", trainer.nodes, trainer.gpus_per_node, "\n".join(lines) + "\n", env)]
    dtype = cfg.model.dtype
    for name, group, model, _ in servers:
        role = "rollout" if name == "rollout" else "teacher"
        if role == "rollout" and getattr(cfg.train, "routing_replay", False) and ROUTED_FLAG not in group.extra_args:
            group = group.model_copy(update={"extra_args": [*group.extra_args, ROUTED_FLAG]})
        groups.append(Group(name, group.nodes, group.gpus_per_node, _server_script(group, model, dtype, role, _workdir(slurm)), {}))
    return groups


def chain(cascade: CascadeConfig, recipe: str, overrides: list[str]) -> list[tuple[str, list[Group]]]:
    """A cascade as one single-group job per stage, in order: job k runs the cascade ``--through``
    stage k (the stages before it are kept from the jobs before; its select picks and outputs are
    read from the run directory), each job ``afterok`` on the one before."""
    slurm = cascade.launch.slurm
    if slurm is None:
        raise ValueError("launch.slurm: this cascade has no Slurm placement (add a `launch: {slurm: ...}` section: "
                         "the allocation every stage's job gets)")
    jobs = []
    for stage in cascade.stages:
        cmd = ["python", "-m", "megatron_opd.cli", "run", recipe, *overrides, "--through", stage.name]
        script = "\n".join(["set -euo pipefail", f"cd {shlex.quote(_workdir(slurm))}",
                            *_stop_and_requeue(shlex.join(cmd), None, slurm.requeue)]) + "\n"
        jobs.append((stage.name, [Group(stage.name, 1, slurm.trainer.gpus_per_node, script, dict(slurm.env))]))
    return jobs


def _experiment(title: str, slurm: SlurmConfig, jobs: list[tuple[str, list[Group]]],
                job_dir: str | Path) -> tuple[Any, list[tuple[str, Any, Any]]]:
    """The nemo-run experiment (not entered) and its ``(name, task(s), executor(s))`` for ``jobs``,
    each a het job when it has several groups."""
    import nemo_run as run
    from nemo_run.config import set_nemorun_home
    from nemo_run.core.frontend.console.api import CONSOLE

    CONSOLE.quiet = True
    base = Path(job_dir).resolve()
    set_nemorun_home(str(base))  # the experiment's records (and `opd launch --status`) live under job_dir

    def executor(group: Group, hetero: bool) -> Any:
        return run.SlurmExecutor(  # signal: Slurm's warning before the limit (the servers' scripts ignore it)
            signal=f"USR1@{slurm.signal_grace_s}" if slurm.signal_grace_s is not None else None,
            monitor_group_job_wait_time=slurm.monitor_interval_s,
            account=slurm.account, partition=slurm.partition, time=slurm.time, nodes=group.nodes, ntasks_per_node=1,
            gpus_per_node=group.gpus_per_node or None, container_image=slurm.container_image,
            container_mounts=list(slurm.container_mounts), env_vars=group.env or dict(slurm.env), heterogeneous=hetero,
            job_name_prefix=f"{title}-", wait_time_for_group_job=0 if hetero else 30,
            tunnel=run.LocalTunnel(job_dir=str(base / "experiments")), packager=run.Packager())

    exp = run.Experiment(title, base_dir=str(base), clean_mode=True, skip_status_at_exit=True)
    added = []
    for name, groups in jobs:
        hetero = len(groups) > 1
        tasks = [run.Script(inline=g.script) for g in groups]
        executors = [executor(g, hetero) for g in groups]
        added.append((name, tasks if hetero else tasks[0], executors if hetero else executors[0]))
    return exp, added


def _jobs_for(cfg: Any, recipe: str, overrides: list[str]) -> tuple[SlurmConfig, list[tuple[str, list[Group]]]]:
    if isinstance(cfg, CascadeConfig):
        return cfg.launch.slurm, chain(cfg, recipe, overrides)  # type: ignore[return-value]
    groups = plan(cfg, recipe, overrides)  # raises (naming launch.slurm) before anything is written
    return cfg.launch.slurm, [(cfg.run.name, groups)]


def render_sbatch(cfg: SFTStageConfig | OPDStageConfig | CascadeConfig, recipe: str, overrides: list[str],
                  job_dir: str | Path) -> dict[str, Any]:
    """Write the job script(s) without submitting (nemo-run's dry run): ``{"sbatch": text of the
    first, "path": its file, "paths": every job's file, "groups": the first job's groups}``."""
    slurm, jobs = _jobs_for(cfg, recipe, overrides)
    exp, added = _experiment(cfg.run.name, slurm, jobs, job_dir)
    with exp:
        for name, task, executor in added:
            exp.add(task, executor=executor, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        texts, paths = [], []
        for job in exp.jobs:
            info = job._dryrun_infos[0] if hasattr(job, "_dryrun_infos") else job._dryrun_info
            texts.append(info.request.materialize())
            paths.append(Path(exp._exp_dir) / f"{info.request.executor.job_name}_sbatch.sh")
    return {"sbatch": texts[0], "path": paths[0], "paths": paths, "groups": [g.name for g in jobs[0][1]]}


def submit(cfg: SFTStageConfig | OPDStageConfig | CascadeConfig, recipe: str, overrides: list[str],
           job_dir: str | Path) -> list[dict[str, str]]:
    """Submit through nemo-run (``sbatch --parsable``; a chain's jobs each ``--dependency=afterok`` on
    the one before); returns ``[{"name", "job_id", "experiment"}]`` in order."""
    slurm, jobs = _jobs_for(cfg, recipe, overrides)
    exp, added = _experiment(cfg.run.name, slurm, jobs, job_dir)
    with exp:
        for name, task, executor in added:
            exp.add(task, executor=executor, name=name)
        try:
            exp.run(sequential=True, detach=True)
        except Exception as exc:  # noqa: BLE001  (sbatch's refusal reaches us as the tunnel's exception)
            result = getattr(exc, "result", None)
            said = (getattr(result, "stderr", "") or getattr(result, "stdout", "") or str(exc)).strip()
            raise SubmitFailed(f"sbatch refused the job (experiment {exp._exp_dir}): {said}") from None
        submitted = [{"name": job.id, "job_id": _slurm_id(job), "experiment": str(exp._exp_dir)} for job in exp.jobs]
    return submitted


class SubmitFailed(RuntimeError):
    """sbatch refused a job; its own message is in the text."""


def _slurm_id(job: Any) -> str:
    handle = job.handle if hasattr(job, "handle") and job.handle else (job.handles or [""])[0]
    return handle.partition("://")[2].split("/")[1] if "://" in handle else ""


def _latest_experiment(job_dir: str | Path) -> Path:
    found = sorted(Path(job_dir).resolve().glob("experiments/*/*/_CONFIG"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"{job_dir}: no nemo-run experiment here (the --job-dir of an `opd launch --executor slurm`)")
    return found[-1].parent


def status(job_dir: str | Path) -> list[dict[str, str]]:
    """The latest experiment under ``job_dir``: each job's name, Slurm id and state (nemo-run's
    experiment status, which asks Slurm's accounting, ``sacct``; a job accounting has not recorded
    yet, which nemo-run calls SUBMITTED, is read from the controller's queue)."""
    import nemo_run as run
    from nemo_run.config import set_nemorun_home
    from nemo_run.core.frontend.console.api import CONSOLE

    CONSOLE.quiet = True
    exp_dir = _latest_experiment(job_dir)
    set_nemorun_home(str(Path(job_dir).resolve()))
    exp = run.Experiment.from_id(exp_dir.name)
    with exp:
        states = exp.status(return_dict=True) or {}
        order = [job.id for job in exp.jobs]
    rows = [{"name": name, "job_id": states[name].get("job_id", ""), "state": _state(states[name]),
             "experiment": str(exp_dir)} for name in order if name in states]
    for row in rows:
        if row["state"] == "SUBMITTED" and row["job_id"]:
            row["state"] = _queue_state(row["job_id"]) or row["state"]
    return rows


def _queue_state(job_id: str) -> str:
    """The controller's own state of a job that accounting has not recorded yet: ``sacct`` lags
    ``sbatch`` (slurmdbd writes asynchronously), and nemo-run reads an unknown job as SUBMITTED."""
    try:
        shown = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    state = shown.stdout.strip().splitlines()
    return state[0].strip() if shown.returncode == 0 and state else ""


def cancel(job_dir: str | Path) -> list[dict[str, str]]:
    """Cancel every job of the latest experiment under ``job_dir`` that has not finished."""
    import nemo_run as run

    before = status(job_dir)
    exp = run.Experiment.from_id(Path(before[0]["experiment"]).name) if before else None
    if exp is not None:
        with exp:
            for job in before:
                if job["state"] in ("PENDING", "SUBMITTED", "RUNNING", "UNKNOWN"):
                    exp.cancel(job["name"])
    return before


def _state(info: dict[str, Any]) -> str:
    value = info.get("status")
    return getattr(value, "name", str(value))
