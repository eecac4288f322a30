"""One Slurm job per stage through nemo-run: trainer nodes (torchrun over c10d), SGLang rollout
servers and each teacher's SGLang servers on their own nodes, as heterogeneous job groups.

The batch script computes every server URL from the groups' node lists and hands them to the
trainer as recipe overrides (``rollout.urls=[...]``, ``teachers.teachers.<name>.urls=[...]``);
the trainer waits for every server's ``/health`` before torchrun starts (Slurm starts the groups
in order, trainer first). Servers bind 0.0.0.0 here: the trainer reaches them from other nodes.

``dry_run`` writes the sbatch script without submitting anything (nemo-run's ``Experiment.dryrun``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_opd.config import OPDStageConfig, ServerGroup, SFTStageConfig
from megatron_opd.rollout.sglang import SGLangServerConfig

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


def _server_script(group: ServerGroup, model: str, dtype: str) -> str:
    """Start ``servers_per_node`` SGLang servers on this node, each on its own GPU slice and port."""
    tp = group.gpus_per_node // group.servers_per_node
    lines = ["set -u", "pids=()"]
    for i in range(group.servers_per_node):
        gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
        server = SGLangServerConfig(model_path=model, host="0.0.0.0", port=group.port + i, tp_size=tp, dtype=dtype,
                                    extra_args=tuple(group.extra_args))
        cmd = ["python", *server.command()[1:]]
        lines.append(f"CUDA_VISIBLE_DEVICES={gpus} {shlex.join(cmd)} & pids+=($!)")
    lines.append('wait -n "${pids[@]}"; echo "an SGLang server exited; stopping this node" >&2; kill "${pids[@]}" 2>/dev/null; exit 1')
    return "\n".join(lines) + "\n"


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
        url_vars.append(f"${var}")
    trainer = slurm.trainer
    head = "$het_group_host_0" if servers else "$head_node_ip"
    env["OPD_TRAINER_HEAD"] = head
    run_cmd = ["python", "-m", "torch.distributed.run", f"--nnodes={trainer.nodes}", f"--nproc-per-node={trainer.gpus_per_node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=$OPD_TRAINER_HEAD:{RDZV_PORT}", "--rdzv-id=$SLURM_JOB_ID",
               "-m", "megatron_opd.cli", "run", recipe]
    lines = ["set -euo pipefail", f"cd {shlex.quote(slurm.workdir)}"]
    if url_vars:
        lines.append(f"python -m megatron_opd.cli wait-servers --timeout {slurm.server_timeout_s} "
                     + " ".join(f'"{v}"' for v in url_vars))
    lines.append(" ".join(run_cmd) + " " + " ".join(shlex.quote(o) for o in overrides)
                 + " " + " ".join(f'"{o}"' for o in url_overrides))
    groups = [Group("trainer", trainer.nodes, trainer.gpus_per_node, "\n".join(lines) + "\n", env)]
    dtype = cfg.model.dtype
    for name, group, model, _ in servers:
        groups.append(Group(name, group.nodes, group.gpus_per_node, _server_script(group, model, dtype), {}))
    return groups


def render_sbatch(cfg: SFTStageConfig | OPDStageConfig, recipe: str, overrides: list[str], job_dir: str | Path) -> dict[str, Any]:
    """Build the nemo-run experiment and dry-run it: returns ``{"sbatch": text, "path": file}``."""
    import nemo_run as run
    from nemo_run.core.frontend.console.api import CONSOLE

    CONSOLE.quiet = True
    groups = plan(cfg, recipe, overrides)  # raises (naming launch.slurm) before anything is written
    slurm = cfg.launch.slurm
    base = Path(job_dir).resolve()
    hetero = len(groups) > 1

    def executor(group: Group) -> Any:
        return run.SlurmExecutor(
            account=slurm.account, partition=slurm.partition, time=slurm.time, nodes=group.nodes, ntasks_per_node=1,
            gpus_per_node=group.gpus_per_node, container_image=slurm.container_image,
            container_mounts=list(slurm.container_mounts), env_vars=group.env or dict(slurm.env), heterogeneous=hetero,
            job_name_prefix=f"{cfg.run.name}-", wait_time_for_group_job=0 if hetero else 30,
            tunnel=run.LocalTunnel(job_dir=str(base / "experiments")), packager=run.Packager())

    tasks = [run.Script(inline=g.script) for g in groups]
    executors = [executor(g) for g in groups]
    with run.Experiment(cfg.run.name, base_dir=str(base), clean_mode=True) as exp:
        exp.add(tasks if hetero else tasks[0], executor=executors if hetero else executors[0], name=cfg.run.name)
        exp.dryrun(log=False, delete_exp_dir=False)
        job = exp.jobs[0]
        info = job._dryrun_infos[0] if hasattr(job, "_dryrun_infos") else job._dryrun_info
        text = info.request.materialize()
        path = Path(exp._exp_dir) / f"{info.request.executor.job_name}_sbatch.sh"
    return {"sbatch": text, "path": path, "groups": [g.name for g in groups]}
