"""``opd``: the command-line entry point.

Distributed commands re-run themselves under torchrun when they need several processes, so the
same command line works on a laptop and inside a Slurm allocation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from megatron_opd import __version__
from megatron_opd.config import ConfigError, dump_config, load_recipe
from megatron_opd.pipeline.preflight import (checkpoint_bytes, preflight_cascade, preflight_model, preflight_opd,
                                             preflight_output_dir, preflight_resume, preflight_tracking, readable_weights)
from megatron_opd.platform.exit import fail
from megatron_opd.platform.run_lock import RunDirInUse

app = typer.Typer(add_completion=False, no_args_is_help=True, help="On-policy distillation with a megatron-core student.")
convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints between formats.")
app.add_typer(convert_app, name="convert")
from megatron_opd.bench.cli import bench_app  # noqa: E402  (a sub-app: `opd bench e2e|step`)

app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"megatron-opd {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """On-policy distillation with a megatron-core student."""


def _user_errors() -> tuple[type[Exception], ...]:
    from megatron_opd.data.chat import DataError
    from megatron_opd.model.hf_config import UnsupportedArchitectureError
    from megatron_opd.model.checkpoint import CheckpointError
    from megatron_opd.platform.dist import ParallelLayoutError
    from megatron_opd.teachers.parity import TokenizerMismatch
    from megatron_opd.teachers.router import NoRouteError
    from megatron_opd.teachers.scorer import TeacherError
    from megatron_opd.train.opd.step_log import GuardStop
    from megatron_opd.train.weight_export import ReloadCheckFailed

    return (ConfigError, DataError, CheckpointError, UnsupportedArchitectureError, ParallelLayoutError, FileNotFoundError,
            TeacherError, TokenizerMismatch, NoRouteError, FloatingPointError, GuardStop,
            ReloadCheckFailed)


def _guarded(work, *args):
    """Run a worker body; a user error becomes one clear line (prefixed with the rank) and exit 2.
    Process groups are left cleanly after a successful body."""
    from megatron_opd.platform import destroy

    try:
        result = work(*args)
        destroy()
        return result
    except _user_errors() as exc:
        rank = os.environ.get("RANK")
        fail(f"[rank {rank}] {exc}" if rank is not None else str(exc))


def _distributed(nproc: int, argv: list[str]) -> bool:
    """True if this process should do the work; otherwise relaunches on ``nproc`` local ranks and exits with their code."""
    from megatron_opd.platform.local_ranks import relaunch_local, under_launcher

    if under_launcher() or nproc == 1:
        if under_launcher() and int(os.environ["WORLD_SIZE"]) != nproc:
            fail(f"this job needs {nproc} processes but {os.environ['WORLD_SIZE']} were started")
        return True
    raise typer.Exit(relaunch_local(nproc, argv))


@app.command()
def run(recipe: Path, overrides: Optional[List[str]] = typer.Argument(None, help="dotted.key=value"),
        through: Optional[str] = typer.Option(None, "--through", help="cascade: stop after this stage (earlier "
                                              "stages run or are kept); a Slurm chain runs one stage per job"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and overrides (a cascade: every "
                                     "stage's recipe too), print the resolved config, start nothing")) -> None:
    """Run a recipe: one stage (``opd run recipes/tiny/sft.yaml train.steps=50``) or a cascade of them."""
    from megatron_opd.config import CascadeConfig

    try:
        cfg = load_recipe(recipe, overrides or [])
        missing = None
        if isinstance(cfg, CascadeConfig):
            try:
                preflight_cascade(cfg)
            except ValueError as exc:  # inputs an earlier run makes (a cold start) may not exist yet
                if not dry_run:
                    raise
                missing = str(exc)
            if through is not None and through not in [s.name for s in cfg.stages]:
                raise ValueError(f"--through {through!r}: not a stage of this cascade (stages: {[s.name for s in cfg.stages]})")
        elif through is not None:
            raise ValueError("--through names a cascade stage; this recipe is a single stage")
    except (ConfigError, ValueError, OSError) as exc:
        fail(str(exc))
    if dry_run:
        typer.echo(dump_config(cfg), nl=False)
        stages = f", stages {[s.name for s in cfg.stages]}" if isinstance(cfg, CascadeConfig) else ""
        typer.echo(f"{recipe}: a valid {cfg.kind} recipe{stages} (--dry-run: nothing started)"
                   + (f"; not ready to run: {missing}" if missing else ""))
        return
    if isinstance(cfg, CascadeConfig):
        try:
            preflight_output_dir(cfg.run.output_dir)
            _lock_run_dir(cfg.run.output_dir)
        except (ValueError, RunDirInUse) as exc:
            fail(str(exc))
        _run_cascade(cfg, recipe, through)
        return
    try:
        preflight_resume(cfg)
        preflight_tracking(cfg)
        preflight_model(cfg.model.hf_path, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep,
                        getattr(cfg.train, "routing_replay", False))
        sources = [("train", s) for s in ([cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train)]
        if cfg.kind == "sft":
            sources.append(("eval", cfg.data.eval))
        for name, source in sources:
            if source and source.endswith((".jsonl", ".json", ".parquet")) and not Path(source).is_file():
                raise ValueError(f"data.{name}: file {source} not found")
        if cfg.kind in ("opd", "grpo"):
            preflight_opd(cfg)
        preflight_output_dir(cfg.run.output_dir, checkpoint_bytes(cfg.model.hf_path, cfg.model.dtype))
        _lock_run_dir(cfg.run.output_dir)
    except (ConfigError, ValueError, OSError, RunDirInUse) as exc:
        fail(str(exc))
    if _distributed(cfg.parallel.world_size, ["run", str(recipe), *(overrides or [])]):
        from megatron_opd.platform.cpu_compat import import_megatron_core
        from megatron_opd.platform.signals import EXIT_STOPPED, install_stop_signals

        install_stop_signals(cfg.run.save_on_signals)
        import_megatron_core()  # first, before any module imports it (see its docstring)
        if cfg.kind == "sft":
            from megatron_opd.train.sft import run_sft

            if _guarded(run_sft, cfg).stopped:
                raise typer.Exit(EXIT_STOPPED)
        else:
            from megatron_opd.train.opd import run_opd

            evaluator = None
            if cfg.eval.world_dir is not None:
                from megatron_opd.eval.domains import DomainEvaluator

                evaluator = DomainEvaluator(cfg.eval.world_dir, cfg.eval.domains, cfg.eval.samples, cfg.model.hf_path)
            if "stopped" in _guarded(run_opd, cfg, evaluator):
                raise typer.Exit(EXIT_STOPPED)
        if int(os.environ.get("RANK", "0")) == 0:
            from megatron_opd.pipeline.report import write_stage_report

            typer.echo(f"[{cfg.kind}] run directory {cfg.run.output_dir}; report {write_stage_report(cfg.run.output_dir)}")


def _lock_run_dir(run_dir: Path) -> None:
    """The run directory's lock, taken by the process that starts the ranks (or, under torchrun, by rank 0)."""
    from megatron_opd.platform.local_ranks import under_launcher
    from megatron_opd.platform.run_lock import lock_run_dir

    if not under_launcher() or os.environ.get("RANK") == "0":
        lock_run_dir(run_dir)


def _run_cascade(cfg, recipe: Path, through: str | None = None) -> None:
    from megatron_opd.eval.domains import evaluate, format_table
    from megatron_opd.pipeline.cascade import CascadeRunner, StageFailed, StageStopped
    from megatron_opd.platform.signals import EXIT_STOPPED

    e = cfg.eval
    # SIGUSR1 (Slurm's warning) must not kill the cascade between stages; during a stage it is passed on to it
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def evaluate_dir(model_dir, domains, offset, samples, sampled):
        return evaluate(model_dir, e.world_dir, domains, samples, 0, 1.0, e.max_new_tokens, offset, sampled)

    try:
        results = CascadeRunner(cfg, recipe, evaluate_dir, log=lambda m: typer.echo(m)).run(through)
    except StageStopped as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_STOPPED)
    except StageFailed as exc:
        fail(str(exc))
    if results is None:  # stopped after --through
        return
    typer.echo(format_table(results["start_eval"], "[cascade] held-out accuracy at the start:"))
    for stage in results["stages"]:
        if stage.get("eval"):
            typer.echo(format_table(stage["eval"], f"[cascade] after stage {stage['name']} ({stage['kind']}, {stage['wall_s']:.0f} s):"))
        for goal in stage.get("goals", []):
            verdict = "n/a" if goal["met"] is None else "met" if goal["met"] else "NOT met"
            typer.echo(f"[cascade] {stage['name']}: {verdict}: {goal['goal']} ({goal['measured']})")
    typer.echo(f"[cascade] wall time {results['wall_time_s']:.0f} s; run directory {cfg.run.output_dir}")


@app.command()
def report(run_dir: Path) -> None:
    """(Re)write report.md and its plots for a run directory."""
    from megatron_opd.pipeline.report import write_cascade_report, write_stage_report

    results = run_dir / "results.json"
    if not run_dir.is_dir():
        fail(f"{run_dir}: not a run directory")
    import json

    data = json.loads(results.read_text()) if results.is_file() else {}
    path = write_cascade_report(run_dir, data) if "stages" in data else write_stage_report(run_dir)
    typer.echo(f"wrote {path}")


@app.command()
def seeds(run_dirs: List[Path] = typer.Argument(..., help="the same cascade's run directories, one per seed"),
          plots: Optional[Path] = typer.Option(None, help="write each comparison's curves over the runs here "
                                               "(compare_NAME_seeds.png)")) -> None:
    """One cascade run at several seeds side by side: each stage's accuracy as mean [min..max], each comparison's
    methods, accuracy-vs-cost curves and cost ratios, and how many runs met every goal."""
    from megatron_opd.pipeline.seeds import compare_stages, load_runs, seeds_summary

    try:
        runs = load_runs(run_dirs)
        lines = seeds_summary(runs)
    except (ValueError, KeyError) as exc:
        fail(f"opd seeds: {exc}")
    if plots is not None:
        from megatron_opd.pipeline.report import plot_comparison_seeds

        plots.mkdir(parents=True, exist_ok=True)
        for name, stages in compare_stages(runs).items():
            lines.append(f"plot: {plot_comparison_seeds(stages, plots / f'compare_{name}_seeds.png')}")
    typer.echo("\n".join(lines))


@convert_app.command("hf-to-megatron")
def hf_to_megatron(
    src: Path, dst: Path,
    tp: int = typer.Option(1, min=1, help="tensor parallel size"),
    pp: int = typer.Option(1, min=1, help="pipeline parallel size"),
    vocab_divisible_by: int = typer.Option(128, min=1, help="pad the vocabulary to a multiple of this"),
) -> None:
    """HF safetensors directory -> sharded megatron-opd checkpoint for TP x PP."""
    if dst.exists() and not dst.is_dir():
        fail(f"{dst}: exists and is not a directory")
    try:
        preflight_model(src, tp, pp)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    argv = ["convert", "hf-to-megatron", str(src), str(dst), "--tp", str(tp), "--pp", str(pp),
            "--vocab-divisible-by", str(vocab_divisible_by)]
    if _distributed(tp * pp, argv):
        from megatron_opd.model.convert import hf_to_megatron as convert
        from megatron_opd.platform import init_distributed

        init_distributed(tp, pp)
        out = _guarded(convert, src, dst, vocab_divisible_by)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {out}")


@app.command("export-hf")
def export_hf(
    src: Path, dst: Path,
    tp: int = typer.Option(1, help="tensor parallel size to load at (any: the checkpoint reshards)"),
    pp: int = typer.Option(1, help="pipeline parallel size to load at"),
    shard_mb: float = typer.Option(2048, min=0.01, help="largest safetensors file written (rank 0 holds one at a time)"),
) -> None:
    """megatron-opd checkpoint (root or step dir) -> HF safetensors directory."""
    from megatron_opd.model.checkpoint import CheckpointError, read_meta, resolve

    try:
        step_dir = resolve(src)
        read_meta(step_dir)
        preflight_model(step_dir / "hf", tp, pp)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if _distributed(tp * pp, ["export-hf", str(src), str(dst), "--tp", str(tp), "--pp", str(pp), "--shard-mb", str(shard_mb)]):
        from megatron_opd.model.convert import megatron_to_hf
        from megatron_opd.platform import init_distributed

        init_distributed(tp, pp)
        _guarded(megatron_to_hf, src, dst, int(shard_mb * (1 << 20)))
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {dst}")


@app.command("eval")
def eval_cmd(
    ckpt: Path,
    domains: Optional[str] = typer.Option(None, help="comma-separated domains (default: all in the world)"),
    samples: Optional[int] = typer.Option(None, min=1, help="first N test problems per domain"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON here"),
    world: Path = typer.Option(Path("assets/tiny"), help="tiny-world directory (data/<domain>/test.jsonl)"),
    seed: int = typer.Option(0, help="sampling seed"),
    max_new_tokens: int = typer.Option(96, min=1),
    context: Optional[str] = typer.Option(None, help="user turn as a template over each row's {prompt}, {response}, "
                                          "{meta.KEY} (\\n a newline): how well a self teacher reads its "
                                          "privileged context"),
    sampled: bool = typer.Option(True, "--sampled/--greedy-only", help="also sample at temperature 1 (the sampled "
                                 "columns; --greedy-only: half the time, those columns NaN)"),
) -> None:
    """Per-domain accuracy of an HF directory or megatron-opd checkpoint (greedy and sampled)."""
    import json
    import tempfile

    from megatron_opd.eval.domains import available_domains, check_context, evaluate, format_table
    from megatron_opd.model.checkpoint import CheckpointError, find_latest

    have = available_domains(world) if world.is_dir() else []
    if not have:
        fail(f"--world {world}: no domains there (expected data/<domain>/test.jsonl)")
    unknown = [d.strip() for d in (domains or "").split(",") if d.strip() and d.strip() not in have]
    if unknown:
        fail(f"--domains: unknown domain(s) {unknown} in {world} (has {have})")

    if context is not None:
        context = context.replace("\\n", "\n")
        _guarded(check_context, context)
    if (ckpt / "config.json").is_file():
        try:
            readable_weights(ckpt)
        except ValueError as exc:
            fail(str(exc))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ckpt
        if not (ckpt / "config.json").is_file():
            try:
                if find_latest(ckpt) is None:
                    raise CheckpointError(f"{ckpt}: neither an HF directory nor a megatron-opd checkpoint")
            except CheckpointError as exc:
                fail(str(exc))
            model_dir = Path(tmp) / "hf"
            code = _run_cli(["export-hf", str(ckpt), str(model_dir)])
            if code:
                raise typer.Exit(code)
        names = [d.strip() for d in domains.split(",")] if domains else None
        results = _guarded(lambda: evaluate(model_dir, world, names, samples, seed, 1.0, max_new_tokens,
                                            sampled=sampled, context=context))
    shown = f", context {context!r}" if context else ""
    typer.echo(format_table(results, f"eval {ckpt} (seed {seed}{shown})"))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1))


@app.command("wait-servers")
def wait_servers(
    urls: List[str] = typer.Argument(..., help="server URLs (comma-separated lists allowed)"),
    timeout: float = typer.Option(1800.0, help="seconds to wait for all of them"),
    api_key_env: Optional[str] = typer.Option(None, help="environment variable holding the servers' API key"),
) -> None:
    """Block until every server answers GET /health with 200 (used by the Slurm trainer group)."""
    from megatron_opd.wire.client import NotHealthy, wait_healthy

    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        fail(f"--api-key-env {api_key_env}: not set")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        wait_healthy([u.strip().rstrip("/") for item in urls for u in item.split(",") if u.strip()], timeout,
                     headers=headers, interval=2.0, request_timeout=5.0)
    except NotHealthy as exc:
        fail(f"servers not healthy after {timeout:.0f}s: {', '.join(exc.pending)}")
    typer.echo("all servers healthy")


from megatron_opd.launch.cli import launch  # noqa: E402  (in its own module, registered here)
from megatron_opd.serve.cli import serve  # noqa: E402

app.command()(serve)
app.command()(launch)


def _run_cli(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "megatron_opd.cli", *argv])


def main() -> None:
    # SIGTERM (torchrun stopping a worker, Slurm, `kill`) unwinds like Ctrl-C: finally blocks stop the
    # servers this process started and no half-written state is left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        app()  # click ends every command with SystemExit(code); an error it does not handle propagates
    except SystemExit as exc:
        if isinstance(exc.code, str):  # sys.exit("why"): what the interpreter would print
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    else:
        code = 0
    from megatron_opd.platform.exit import exit_now

    exit_now(code)  # the command finished and closed what it wrote: no module teardown (seconds of CPU)


if __name__ == "__main__":
    sys.exit(main())
