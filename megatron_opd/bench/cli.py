"""``opd bench``: the project's benchmarks; each prints its figures last, one per line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures printed last, one per line).")
DEFAULT_STUDENT = Path("outputs/tiny/sft/hf")
DEFAULT_TEACHER = Path("assets/tiny/original")


def _finish(lines: list[str]) -> None:
    typer.echo("")
    for line in lines:
        typer.echo(line)


@bench_app.command("e2e")
def e2e(
    vs: Optional[str] = typer.Option(None, "--vs", help="'trl': also run TRL's GKD trainer, side by side"),
    trl_python: Optional[Path] = typer.Option(None, help="TRL venv's python (default: $OPD_TRL_PYTHON, .venv-trl)"),
    student: Path = typer.Option(DEFAULT_STUDENT, help="HF student (default: the cold start of recipes/tiny/sft.yaml)"),
    teacher: Path = typer.Option(DEFAULT_TEACHER),
    batch: int = typer.Option(64, help="samples per step, one per prompt"),
    max_new_tokens: int = typer.Option(96),
    steps: int = typer.Option(12),
    warmup: int = typer.Option(2, help="steps left out of the timing"),
    rounds: int = typer.Option(2, help="A B rounds (ratio per round, medians printed)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides for the project's run"),
) -> None:
    """Trained completion tokens/s of the whole OPD loop (and TRL's, with --vs trl)."""
    from megatron_opd.bench.e2e import E2ESettings, bench_e2e

    if vs not in (None, "trl"):
        raise typer.BadParameter(f"--vs {vs!r}: only 'trl' is supported")
    settings = E2ESettings(student.resolve(), teacher.resolve(), batch=batch, max_new_tokens=max_new_tokens,
                           steps=steps, warmup=warmup, overrides=tuple(overrides or ()))
    try:
        lines = bench_e2e(settings, vs == "trl", rounds, trl_python, log=typer.echo)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)


@bench_app.command("soak")
def soak(
    minutes: float = typer.Option(30.0, min=0.5, help="how long the OPD loop runs"),
    kill_every_s: float = typer.Option(120.0, min=5.0, help="a teacher replica is SIGKILLed this often (alternating)"),
    down_s: float = typer.Option(20.0, min=0.0, help="how long a killed replica stays down before it is restarted"),
    recipe: Path = typer.Option(Path("recipes/tiny/opd_arith.yaml")),
    student: Path = typer.Option(DEFAULT_STUDENT, help="HF student (default: the cold start of recipes/tiny/sft.yaml)"),
    teacher: Path = typer.Option(Path("assets/tiny/teachers/arithmetic"), help="the arithmetic teacher, served twice"),
    out_dir: Path = typer.Option(Path("outputs/bench/soak")),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides for the soaked run"),
) -> None:
    """Opt-in soak: the OPD loop with periodic teacher kills; kills survived, samples lost, RSS growth."""
    from megatron_opd.bench.soak import SoakSettings, run_soak

    if not (student / "config.json").is_file():
        typer.secho(f"error: --student {student}: no HF checkpoint (run `opd run recipes/tiny/sft.yaml` first)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    settings = SoakSettings(recipe.resolve(), student.resolve(), teacher.resolve(), out_dir.resolve(), minutes,
                            kill_every_s, down_s, tuple(overrides or ()))
    try:
        lines = run_soak(settings, log=typer.echo)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)


@bench_app.command("step")
def step(
    student: Path = typer.Option(DEFAULT_STUDENT, help="HF student of the batch sweep (default: the cold start)"),
    random_student: Path = typer.Option(Path("assets/tiny/student_init"), help="student of the length sweep (rarely stops)"),
    teacher: Path = typer.Option(DEFAULT_TEACHER),
    batches: str = typer.Option("32,64,128", help="samples per step to sweep (at --max-new-tokens)"),
    lengths: str = typer.Option("32,64,128", help="completion caps to sweep (at --batch, random student)"),
    batch: int = typer.Option(64),
    max_new_tokens: int = typer.Option(96),
    steps: int = typer.Option(8),
    warmup: int = typer.Option(2),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides for every run"),
) -> None:
    """One step's phases (rollout, scoring, train, sync) and how step time grows with batch and length."""
    from megatron_opd.bench.step import bench_step
    from megatron_opd.bench.e2e import E2ESettings

    sweep = [int(b) for b in batches.split(",") if b]
    if batch not in sweep:
        sweep.append(batch)
    settings = E2ESettings(student.resolve(), teacher.resolve(), batch=batch, max_new_tokens=max_new_tokens, steps=steps,
                           warmup=warmup, overrides=tuple(overrides or ()))
    for path in (student, random_student, teacher):
        if not (path / "config.json").is_file():
            typer.secho(f"error: {path} is not an HF checkpoint (the cold start: `opd run recipes/tiny/sft.yaml`)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    try:
        lines = bench_step(settings, sweep, [int(n) for n in lengths.split(",") if n], random_student.resolve(), log=typer.echo)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name}: expected positive integers, got {text!r}")
    return values


@bench_app.command("scale")
def scale(
    vocabs: str = typer.Option("32768,151936", help="vocabulary sizes"),
    tps: str = typer.Option("1,2,4", help="tensor-parallel sizes (one torchrun of that many ranks each)"),
    tokens: int = typer.Option(2048, min=1, help="positions in the micro-batch"),
    top_k: int = typer.Option(32, min=1, help="teacher top-k"),
    chunk_mib: float = typer.Option(16.0, min=0.001, help="loss.chunk_mib"),
    gathered: bool = typer.Option(True, help="also measure the full-vocabulary path at TP1 (the loss before)"),
    padding: str = typer.Option("recipe,512", help="padding of a tiny-world OPD step: 'recipe' (its micro-batches) "
                                "and/or token budgets; '' to skip"),
    student: Path = typer.Option(DEFAULT_STUDENT, help="the padding runs' student (default: the cold start)"),
    dps: str = typer.Option("2,4", help="data-parallel sizes for the bytes-received points ('' to skip)"),
    dp_samples: int = typer.Option(256, min=1, help="samples in the step sent to the DP ranks"),
) -> None:
    """The loss head's extra peak memory per rank against vocabulary and TP; bytes per rank against DP;
    a tiny-world step's padding."""
    from megatron_opd.bench.scale import bench_scale

    budgets = [None if b.strip() == "recipe" else _ints(b, "--padding")[0] for b in padding.split(",") if b.strip()]
    if budgets and not (student / "config.json").is_file():
        typer.secho(f"error: {student} is missing (the cold start: `opd run recipes/tiny/sft.yaml`), "
                    "or pass --padding ''", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        lines = bench_scale(_ints(vocabs, "--vocabs"), _ints(tps, "--tps"), tokens, top_k, chunk_mib, gathered,
                            budgets, student.resolve(), _ints(dps, "--dps") if dps.strip() else [], dp_samples,
                            log=typer.echo)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)


@bench_app.command("shapes")
def shapes(
    work: Path = typer.Option(Path("outputs/bench/shapes"), help="models (made once), runs and shapes.json"),
    student: str = typer.Option("Qwen3-0.6B", help="published config of the random student"),
    teacher: str = typer.Option("Qwen3-0.6B", help="published config of the random teacher (seed 1)"),
    steps: int = typer.Option(3, min=3, help="steps of the TP2 loop (a checkpoint at step 2 is resumed at TP1 x PP2)"),
    lengths: str = typer.Option("256,1024,4096", help="completion lengths of the cost-growth runs ('' to skip)"),
    tiny: bool = typer.Option(True, help="also the tiny character-level student at those lengths"),
) -> None:
    """Opt-in: the whole OPD loop at Qwen3's real shapes; MFU, decode, memory, sync, checkpoint figures
    against this machine's own measured limits, and how cost grows with the completion length."""
    from megatron_opd.bench.shapes import ShapesSettings, bench_shapes
    from megatron_opd.model.qwen3 import published_names

    for name in (student, teacher):
        if name not in published_names():
            raise typer.BadParameter(f"{name!r}: known published configs are {', '.join(published_names())}")
    settings = ShapesSettings(work.resolve(), student, teacher, steps,
                              lengths=tuple(_ints(lengths, "--lengths")) if lengths.strip() else (), tiny=tiny, log=typer.echo)
    try:
        lines = bench_shapes(settings)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)


@bench_app.command("gpu")
def gpu(
    size: str = typer.Option("0.6B", help="the random student and teacher: Qwen3-0.6B or Qwen3-1.7B shaped"),
    steps: int = typer.Option(4, min=2, help="OPD steps (the first is left out of the medians)"),
    out: Path = typer.Option(Path("outputs/bench/gpu"), help="models (made once) and the run"),
    peak_tflops: Optional[float] = typer.Option(None, help="the GPU's dense bf16 peak when its name is not known"),
) -> None:
    """One CUDA GPU: OPD steps of a Qwen3-shaped student in bf16 (TP1, engine and teacher on the GPU);
    trainer tokens/s, MFU against the GPU's bf16 peak, peak GPU memory (tools/gpu_check.sh runs it)."""
    from megatron_opd.bench.gpu import bench_gpu

    try:
        lines = bench_gpu(size, steps, out.resolve(), peak_tflops, log=typer.echo)
    except (RuntimeError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _finish(lines)
