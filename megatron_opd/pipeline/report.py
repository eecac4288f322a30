"""The run report: ``report.md`` with tables and PNG plots, readable without any other tool.

Built only from what a run directory already holds (``metrics.jsonl``, ``results.json``), so a
report can be re-made after the fact: ``opd report RUN_DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def accuracy_table(tables: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per (column name, e.g. stage), greedy / sampled accuracy and format per domain."""
    domains = sorted({d for t in tables.values() for d in t})
    head = "| | " + " | ".join(f"{d} greedy | {d} sampled | {d} format" for d in domains) + " |"
    rows = [head, "|---" * (1 + 3 * len(domains)) + "|"]
    for name, table in tables.items():
        cells = []
        for d in domains:
            r = table.get(d)
            cells += [f"{r['accuracy']:.3f}", f"{r['sampled_accuracy']:.3f}", f"{r['format_score']:.3f}"] if r else ["", "", ""]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_accuracy_by_stage(tables: dict[str, dict[str, dict[str, Any]]], path: Path, title: str) -> Path:
    names = list(tables)
    domains = sorted({d for t in tables.values() for d in t})
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in domains:
        xs = [i for i, n in enumerate(names) if d in tables[n]]
        ax.plot(xs, [tables[names[i]][d]["accuracy"] for i in xs], marker="o", label=d)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (odd), shrinking at the ends: the same length as ``values``."""
    half = window // 2
    out = []
    for i in range(len(values)):
        span = values[max(0, i - half): i + half + 1]
        out.append(sum(span) / len(span))
    return out


def smoothing_window(n_points: int) -> int:
    """About 1/20 of a series, odd, at least 1 (no smoothing under 10 points)."""
    return 1 if n_points < 10 else (n_points // 20) | 1


def series_figure(segments: list[tuple[str, list[dict[str, Any]]]], keys: list[str], title: str, ylabel: str,
                  yscale: str = "linear", linthresh: float = 1e-2) -> Any | None:
    """Metrics over steps, each drawn faint point by point with its moving average over it; several stages
    are laid end to end with their boundaries marked (each smoothed within its own stage). ``yscale``
    "symlog" is logarithmic beyond +-``linthresh`` and linear inside it, so values that fall to ~0 or
    slightly below (a sampled KL estimate once the student matches its teacher) stay on the plot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    colors: dict[str, Any] = {}
    drawn_keys: list[str] = []
    for name, rows in segments:
        for key in keys:
            for k in sorted({k for r in rows for k in r if _matches(k, key)}):
                points = [(offset + r["step"], r[k]) for r in rows if k in r]
                if not points:
                    continue
                steps, values = zip(*points)
                window = smoothing_window(len(values))
                if window > 1:  # the steps themselves, faint, under their moving average
                    faint = ax.plot(steps, values, color=colors.get(k), linewidth=0.7, alpha=0.25)[0]
                    colors.setdefault(k, faint.get_color())
                    values = smooth(list(values), window)
                line = ax.plot(steps, values, label=None if k in drawn_keys else k,
                               color=colors.get(k), linewidth=1.4)[0]
                colors.setdefault(k, line.get_color())
                drawn_keys.append(k)
        if rows and len(segments) > 1:
            ax.axvline(offset, color="grey", linewidth=0.5)
            ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        offset += max((r["step"] for r in rows), default=0)
    if not drawn_keys:
        plt.close(fig)
        return None
    if yscale == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_series(segments: list[tuple[str, list[dict[str, Any]]]], keys: list[str], path: Path, title: str,
                ylabel: str, yscale: str = "linear") -> Path | None:
    fig = series_figure(segments, keys, title, ylabel, yscale)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _matches(name: str, pattern: str) -> bool:
    """``teacher/*/reverse_kl`` style patterns (one ``*``)."""
    if "*" not in pattern:
        return name == pattern
    head, tail = pattern.split("*", 1)
    return name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail)


def training_plots(segments: list[tuple[str, list[dict[str, Any]]]], out: Path) -> list[tuple[str, Path]]:
    plots = [
        ("Reverse KL to each teacher (nats/token, the sampled estimate on the student's own tokens: it goes slightly "
         "below 0 once the student matches a teacher; the axis is logarithmic beyond +-0.01 and linear inside)",
         plot_series(segments, ["teacher/*/reverse_kl"], out / "reverse_kl.png", "reverse KL per teacher",
                     "nats / token (symlog)", yscale="symlog")),
        ("Response length and truncation",
         plot_series(segments, ["rollout/response_length"], out / "response_length.png", "mean response length", "tokens")),
        ("Truncation and repetition rates",
         plot_series(segments, ["rollout/truncation_rate", "rollout/repetition_rate"], out / "truncation.png",
                     "share of samples", "rate")),
        ("Verifier reward (GRPO)", plot_series(segments, ["rollout/reward_mean"], out / "reward.png", "mean reward", "reward")),
        ("Training loss", plot_series(segments, ["train/loss"], out / "loss.png", "loss", "loss")),
        ("Off-policy samples (rollout.max_staleness): share of each step's samples k steps old, and the "
         "train/inference log-prob mismatch it brings",
         plot_series(segments, ["rollout/staleness_*", "opd/train_inference_mismatch"], out / "staleness.png",
                     "sample staleness and mismatch", "share / nats per token")),
        ("Mixture of experts: each expert's share of the sampler's routed picks (routing replay), and the imbalance "
         "(the busiest expert's share x the expert count; 1 = even)",
         plot_series(segments, ["moe/expert_load/*", "moe/load_imbalance"], out / "expert_load.png",
                     "per-expert load", "share / imbalance")),
        ("Mixture of experts: the routers' auxiliary losses (model.moe)",
         plot_series(segments, ["moe/load_balancing_loss", "moe/seq_load_balancing_loss",
                                "moe/global_load_balancing_loss", "moe/z_loss"], out / "router_losses.png",
                     "router losses (unscaled)", "loss")),
        ("Step time by phase (overlapped phases run at once)",
         plot_series(segments, ["time/rollout_s", "time/scoring_s", "time/train_s", "time/sync_s", "time/step_s"],
                     out / "phases.png", "seconds per step", "s")),
    ]
    return [(caption, p) for caption, p in plots if p is not None]


def _images(plots: list[tuple[str, Path]], base: Path) -> list[str]:
    return [f"### {caption}\n\n![{caption}]({p.relative_to(base).as_posix()})\n" for caption, p in plots]


def write_stage_report(run_dir: str | Path) -> Path:
    """report.md for one training stage (SFT, OPD/MOPD, GRPO) from its run directory."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    rows = read_metrics(run_dir)
    lines = [f"# Run report: {run_dir.name}", ""]
    tables = results.get("eval") or {}
    if tables:
        lines += ["## Held-out accuracy", "", accuracy_table(tables), ""]
        plots = [("Accuracy per domain", plot_accuracy_by_stage(tables, plots_dir / "accuracy.png", "held-out accuracy"))]
    else:
        plots = []
    if "wall_time_s" in results:
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("time_by_phase_s", {}).items())
        lines += [f"Wall time {results['wall_time_s']:.0f} s" + (f" ({phases})." if phases else "."), ""]
    plots += training_plots([(run_dir.name, rows)], plots_dir)
    lines += ["## Plots", ""] + _images(plots, run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _candidate_label(path: str) -> str:
    """``<stage>/hf`` or ``<stage>/step-N`` for a select candidate (its snapshots sit in ``<stage>/snapshots/``)."""
    p = Path(path)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "snapshots" else f"{p.parent.name}/{p.name}"


def teacher_goal_verdict(goal: dict[str, Any], mark: str = "") -> str:
    """One line on the goal "the final student reaches a share of each domain's teacher"."""
    parts = [f"{r['domain']} {r['student_accuracy']:.3f} vs {r['teacher_accuracy']:.3f} "
             f"({'n/a' if r['share'] is None else format(r['share'], '.1%')}, {'met' if r['met'] else 'missed'})"
             for r in goal["rows"]]
    return (f"Final student ({goal['student']}) >= {goal['fraction']:.0%} of each domain's teacher, held-out greedy: "
            f"{mark}{'met' if goal['met'] else 'missed'}{mark} — " + "; ".join(parts) + ".")


def rises_verdict(rises: dict[str, dict[str, float]], finals: dict[str, dict[str, float]] | None = None,
                  mark: str = "") -> str:
    """One line on the cascade goal "per-domain accuracy rises at each stage", naming what did not;
    a domain that was at 1.000 and stays there has nowhere to rise and counts as held (``finals``:
    each stage's greedy accuracy per domain). ``mark`` wraps the yes/no (``**`` in markdown)."""
    finals = finals or {}
    held = [f"{d} in {stage}" for stage, deltas in rises.items() for d, delta in deltas.items()
            if delta == 0 and finals.get(stage, {}).get(d) == 1.0]
    falls = [f"{d} in {stage} ({delta:+.3f})" for stage, deltas in rises.items() for d, delta in deltas.items()
             if delta <= 0 and f"{d} in {stage}" not in held]
    verdict = f"Every domain rises at every stage: {mark}{'no' if falls else 'yes'}{mark}"
    verdict += f" — not rising: {', '.join(falls)}." if falls else "."
    return verdict + (f" (Held at 1.000, nowhere to rise: {', '.join(held)}.)" if held else "")


def _kept_note(results: dict[str, Any]) -> str:
    """When stages were kept from an earlier invocation (a Slurm chain, a resumed cascade), the wall time is this
    invocation's only: say so, with the stages' own wall times summed over every invocation."""
    kept = results.get("kept_from_earlier_run") or []
    if not kept:
        return ""
    total = sum(s.get("wall_s", 0.0) for s in results["stages"])
    return f" in this invocation ({', '.join(kept)} kept from an earlier one; the stages' own wall times: {total:.0f} s in all)"


def write_cascade_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md for a cascade: accuracy per domain after every stage, teacher picks, and each
    training stage's curves laid end to end."""
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    tables = {"start": results["start_eval"], **{s["name"]: s["eval"] for s in results["stages"] if s.get("eval")}}
    lines = [f"# Cascade report: {results['name']}", "",
             f"Recipe `{results['recipe']}`; wall time {results['wall_time_s']:.0f} s{_kept_note(results)}.", "",
             "## Held-out accuracy after each stage", "",
             f"Greedy and sampled (temperature 1) accuracy and format score on the first {results['eval_samples']} "
             "held-out rows of each domain.", "", accuracy_table(tables), ""]
    rises = results.get("rises", {})
    if rises:
        lines += ["Per-domain greedy accuracy vs the checkpoint each stage started from: " + "; ".join(
            f"{stage}: " + ", ".join(f"{d} {delta:+.3f}" for d, delta in deltas.items()) for stage, deltas in rises.items()), ""]
        if results.get("expect_rises"):
            finals = {name: {d: r["accuracy"] for d, r in t.items()} for name, t in tables.items()}
            lines += [rises_verdict(rises, finals, mark="**"), ""]
    if results.get("teacher_goal"):
        lines += [teacher_goal_verdict(results["teacher_goal"], mark="**"), ""]
    lines += ["| stage | kind | wall s | init |", "|---|---|---|---|"]
    for s in results["stages"]:
        lines.append(f"| {s['name']} | {s['kind']} | {s['wall_s']:.0f} | `{s.get('init', '')}` |")
    lines.append("")
    for s in results["stages"]:
        if s["kind"] == "select":
            lines += [f"## Selection `{s['name']}` ({s['metric']} on held-out rows {s['rows']})", "",
                      "| domain | picked | score | candidates |", "|---|---|---|---|"]
            for domain, pick in s["picks"].items():
                cands = ", ".join(f"`{_candidate_label(p)}` {v:.3f}" for p, v in pick["scores"].items())
                lines.append(f"| {domain} | `{pick['path']}` | {pick['score']:.3f} | {cands} |")
            lines.append("")
    plots = [("Accuracy per domain per stage", plot_accuracy_by_stage(tables, plots_dir / "accuracy_by_stage.png", "held-out greedy accuracy"))]
    for s in results["stages"]:
        if s["kind"] == "compare":
            lines += comparison_section(s)
            plots.append((f"Comparison {s['name']}: accuracy vs {_unit(s)}",
                          plot_comparison(s, plots_dir / f"compare_{s['name']}.png")))
        elif s["kind"] == "specialists":
            lines += specialists_section(s)
    segments = [(s["name"], read_metrics(s["dir"])) for s in results["stages"] if s["kind"] in ("opd", "grpo")]
    plots += training_plots(segments, plots_dir)
    lines += ["## Plots", ""] + _images(plots, out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def comparison_section(s: dict[str, Any]) -> list[str]:
    """Markdown for a compare stage: the picked grid point of every method at the budget (FLOPs or
    tokens), its FLOPs by part, what each grid tried, the teacher, the compute each method needs to
    reach the best accuracy all of them reach, and every goal with its measured numbers."""
    unit = _unit(s)
    lines = [f"## Comparison `{s['name']}`: {s['domain']} at {s['budget']:.4g} {unit}", "",
             f"Each method's grid point is picked by greedy accuracy on held-out rows {s['choice_rows']}; the table "
             f"reports rows {s['rows']} at the last checkpoint within the budget.", "",
             f"| method | picked | {unit} (share of budget) | trained tokens | accuracy | grid tried (accuracy on the choice rows @ {unit}) |",
             "|---|---|---|---|---|---|"]
    for method, m in s["methods"].items():
        tried = ", ".join(f"`{name}` {g['choice_accuracy']:.3f} @ {_cost(g['checkpoint'], s):.3g}" for name, g in m["grid"].items())
        lines.append(f"| {method} | `{m['pick']}` | {m['cost']:.3g} ({m['cost'] / s['budget']:.0%}) | {m['tokens']:.0f} | "
                     f"{m['accuracy']:.3f} | {tried} |")
    if s.get("teacher_accuracy") is not None:
        lines.append(f"| teacher | `{s['teacher']}` | | | {s['teacher_accuracy']:.3f} | |")
    if any(m.get("flops_by_part") for m in s["methods"].values()):
        lines += ["", "FLOPs by part at the reported checkpoint: " + "; ".join(
            f"{method}: " + ", ".join(f"{k} {v:.3g}" for k, v in m["flops_by_part"].items()) for method, m in s["methods"].items())]
    common = s.get("common")
    if common:
        focus = s["spec"]["focus"]
        lines += ["", f"{unit} to first reach the best accuracy both reach (the source's \"x times cheaper\"): " + "; ".join(
            f"{focus} and {m} reach {p['accuracy']:.3f}: {focus} after {p['focus_cost']:.3g}, {m} after {p['cost']:.3g} "
            + (f"({p['ratio']:.3g}x)" if p["ratio"] is not None else "(no gain over the start: no ratio)")
            for m, p in common["pairs"].items())]
    lines += ["", "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {'n/a' if g['met'] is None else 'yes' if g['met'] else '**no**'} | {g['measured']} |"
              for g in s["goals"]]
    lines += ["", f"Accuracy vs {unit} of each pick: " + "; ".join(
        f"{method} " + ", ".join(f"{t:.3g}:{a:.2f}" for t, a in m["curve"]) for method, m in s["methods"].items()), ""]
    return lines


def _unit(s: dict[str, Any]) -> str:
    return "FLOPs" if s.get("unit") == "flops" else "trained response tokens"


def _cost(checkpoint: dict[str, Any], s: dict[str, Any]) -> float:
    return checkpoint["flops"] if s.get("unit") == "flops" else checkpoint["tokens"]


def plot_comparison(s: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, m in s["methods"].items():
        ax.plot(*zip(*m["curve"]), marker="o", label=f"{method} ({m['pick']})")
    if s.get("teacher_accuracy") is not None:
        ax.axhline(s["teacher_accuracy"], color="grey", linestyle="--", linewidth=1, label="teacher")
    if s.get("unit") == "flops":
        ax.set_xscale("symlog", linthresh=max(s["budget"] / 1000, 1.0))
    ax.set_xlim(left=0)  # costs are never negative (symlog would show a mirrored empty half)
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, path, _unit(s), f"{s['domain']} held-out greedy accuracy", f"{s['name']}: equal-compute comparison")


def plot_comparison_seeds(stages: list[dict[str, Any]], path: Path) -> Path:
    """One compare stage repeated at several seeds: each method's curve per run (a colour per method)."""
    s = stages[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, method in enumerate(s["methods"]):
        for i, run in enumerate(stages):
            ax.plot(*zip(*run["methods"][method]["curve"]), marker="o", markersize=3, color=f"C{j}", alpha=0.8,
                    label=f"{method} ({len(stages)} runs)" if i == 0 else None)
    teacher = [run["teacher_accuracy"] for run in stages if run.get("teacher_accuracy") is not None]
    if teacher:
        ax.axhline(sum(teacher) / len(teacher), color="grey", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlim(left=0)  # linear: the snapshots span about one decade of cost
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, path, _unit(s), f"{s['domain']} held-out greedy accuracy",
                 f"{s['name']}: equal-compute comparison, {len(stages)} runs")


def specialists_section(s: dict[str, Any]) -> list[str]:
    seq = s.get("sequential")
    lines = [f"## `{s['consolidated']}` vs each specialist" + (f" vs sequential single-domain OPD (`{seq}`)" if seq else ""), "",
             "Greedy accuracy on the held-out rows of the table above.", "",
             f"| domain | specialist stage | specialist | {s['consolidated']} |" + (" sequential |" if seq else "")
             + f" {s['consolidated']} - specialist | within {s['margin']:.2f} |",
             "|---" * (6 + bool(seq)) + "|"]
    for r in s["rows"]:
        lines.append(f"| {r['domain']} | `{r['specialist']}` | {r['specialist_accuracy']:.3f} | {r['consolidated_accuracy']:.3f} |"
                     + (f" {r['sequential_accuracy']:.3f} |" if seq else "")
                     + f" {r['gap']:+.3f} | {'yes' if r['met'] else '**no**'} |")
    shares = [(r["domain"], name, t) for r in s["rows"] for name, t in (r.get("training") or {}).items() if t]
    if shares:
        lines += ["", "What each run's training gave the domain: the samples its teacher scored, and the student's "
                  "reverse KL to that teacher on its own samples (mean of log p_student - log p_teacher per token), "
                  "over the first and the last 20 logged steps.", "",
                  "| domain | stage | samples per step | samples | reverse KL, first 20 -> last 20 steps |", "|---|---|---|---|---|"]
        lines += [f"| {domain} | `{name}` | {t['samples_per_step']:.1f} | {t['samples']:.0f} | "
                  f"{t['kl_first']:.3f} -> {t['kl_last']:.3f} |" for domain, name, t in shares]
    return lines + [""]
