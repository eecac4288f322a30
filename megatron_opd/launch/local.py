"""Run a stage on this machine through nemo-run's LocalExecutor (``opd launch --executor local``).

The job is ``opd run RECIPE ...``, which starts torchrun itself for TP x PP x DP > 1 and its
embedded teacher servers as subprocesses (stopped on exit or error); nemo-run records the
experiment (logs, status) under ``job_dir``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable


def run_local(recipe: str, overrides: list[str], job_dir: str | Path, dry_run: bool, echo: Callable[[str], None] = print) -> int:
    import nemo_run as run
    from nemo_run.core.frontend.console.api import CONSOLE

    CONSOLE.quiet = True
    task = run.Script(path="megatron_opd.cli", m=True, entrypoint="python", args=["run", recipe, *overrides])
    executor = run.LocalExecutor(ntasks_per_node=1)
    command = shlex.join(["python", "-m", "megatron_opd.cli", "run", recipe, *overrides])
    with run.Experiment(Path(recipe).stem, executor=executor, base_dir=str(Path(job_dir).resolve()), clean_mode=True) as exp:
        exp.add(task, name=Path(recipe).stem)
        if dry_run:
            exp.dryrun(log=False, delete_exp_dir=False)
            echo(f"would run: {command} (nemo-run experiment under {exp._exp_dir})")
            return 0
        exp.run(sequential=True, tail_logs=True, detach=False)
        for _ in range(60):  # the runner records the final state shortly after the process exits
            status = exp.status(return_dict=True) or {}
            if all(info_status(info) not in ("RUNNING", "PENDING", "SUBMITTED", "UNSUBMITTED") for info in status.values()):
                break
            time.sleep(1.0)
    # torchx AppState values: SUCCEEDED, FAILED, CANCELLED, ...
    failed = [name for name, info in status.items() if getattr(info.get("status"), "name", "") != "SUCCEEDED"]
    for name in failed:
        echo(f"nemo-run job {name}: {info_status(status[name])} (logs: {status[name].get('local_dir', '?')})")
    return 1 if failed or not status else 0


def info_status(info: dict) -> str:
    return getattr(info.get("status"), "name", str(info.get("status")))
