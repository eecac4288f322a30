"""``opd launch``: a recipe through nemo-run, locally or on Slurm; the state of its jobs, or their cancellation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import typer

from megatron_opd.config import ConfigError, load_recipe
from megatron_opd.platform.exit import fail


def launch(
    recipe: Optional[Path] = typer.Argument(None, help="a stage recipe or a cascade"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value"),
    executor: str = typer.Option("local", help="local (nemo-run LocalExecutor on this machine) or slurm"),
    dry_run: bool = typer.Option(False, "--dry-run", help="write the job script(s), submit nothing"),
    job_dir: Optional[Path] = typer.Option(None, help="where nemo-run writes the job script(s), logs and records "
                                           "(default: the recipe's launch.slurm.job_dir, else slurm_jobs)"),
    status: Optional[Path] = typer.Option(None, "--status", help="JOB_DIR: the state of each job of its latest experiment"),
    cancel: Optional[Path] = typer.Option(None, "--cancel", help="JOB_DIR: cancel the unfinished jobs of its latest experiment"),
) -> None:
    """Run a recipe through nemo-run: locally, or on Slurm - a stage as one heterogeneous job (trainer
    nodes, rollout servers, teacher servers placed by its ``launch.slurm``), a cascade as a chain of
    one job per stage, each ``--dependency=afterok`` on the one before."""
    if status is not None or cancel is not None:
        from megatron_opd.launch.slurm import cancel as cancel_jobs, status as job_status

        try:
            rows = cancel_jobs(cancel) if cancel is not None else job_status(status)
        except (ValueError, OSError) as exc:
            fail(str(exc))
        for row in rows:
            typer.echo(f"{row['name']}: Slurm job {row['job_id'] or '?'} {row['state']}"
                       + (" -> cancelled" if cancel is not None and row["state"] in ("PENDING", "SUBMITTED", "RUNNING", "UNKNOWN") else ""))
        return
    if recipe is None:
        fail("opd launch: give a RECIPE (or --status / --cancel JOB_DIR)")
    if executor not in ("local", "slurm"):
        fail(f"--executor {executor!r}: expected 'local' or 'slurm'")
    try:
        cfg = load_recipe(recipe, overrides or [])
        if job_dir is None:
            job_dir = Path(cfg.launch.slurm.job_dir if cfg.launch.slurm is not None else "slurm_jobs")
        if executor == "slurm":
            from megatron_opd.launch.slurm import SubmitFailed, render_sbatch, submit

            if not dry_run and shutil.which("sbatch") is None:
                raise ConfigError("--executor slurm submits with `sbatch`, which is not on PATH (not a Slurm login "
                                  "node?); use --dry-run to write the script only")
            if dry_run:
                out = render_sbatch(cfg, str(recipe), list(overrides or []), job_dir)
                for path in out["paths"]:
                    typer.echo(f"wrote {path}" + (f" (groups: {', '.join(out['groups'])})" if len(out["paths"]) == 1 else ""))
                return
            try:
                jobs = submit(cfg, str(recipe), list(overrides or []), job_dir)
            except SubmitFailed as exc:
                fail(str(exc))
            previous = None
            for job in jobs:
                after = f" (afterok:{previous})" if previous else ""
                typer.echo(f"{job['name']}: Submitted batch job {job['job_id']}{after}")
                previous = job["job_id"]
            typer.echo(f"nemo-run experiment {jobs[0]['experiment']}; `opd launch --status {job_dir}` for its state")
            return
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    from megatron_opd.launch.local import run_local

    raise typer.Exit(run_local(str(recipe), list(overrides or []), job_dir, dry_run, echo=typer.echo))
