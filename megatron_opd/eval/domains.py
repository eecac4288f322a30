"""Per-domain accuracy (and format score) of an HF checkpoint on the tiny world's held-out splits,
greedy and sampled, deterministic for a seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_opd.config.teachers import render_template, template_fields
from megatron_opd.data.chat import DataError, chat_ids, check_tokenizer_fits
from megatron_opd.data.domains import DOMAINS, get_domain
from megatron_opd.data.world import available_domains, read_rows
from megatron_opd.rollout.generation import generate


@dataclass
class DomainScore:
    accuracy: float  # greedy
    format_score: float
    n: int
    sampled_accuracy: float
    sampled_format_score: float
    skipped: int = 0  # rows whose prompt with max_new_tokens does not fit the model's context window (not in n)


def load_hf_for_eval(model_dir: str | Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer_config.json").is_file():
        raise DataError(f"{model_dir}: no tokenizer files next to the model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    check_tokenizer_fits(tokenizer, AutoConfig.from_pretrained(str(model_dir)).vocab_size, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tokenizer


def score_responses(domain: str, metas: list[dict], responses: list[str]) -> tuple[float, float]:
    verdicts = [get_domain(domain).verify(m, r) for m, r in zip(metas, responses)]
    n = max(len(verdicts), 1)
    return sum(v.correct for v in verdicts) / n, sum(v.format_score for v in verdicts) / n


def evaluate(
    model_dir: str | Path,
    world_dir: str | Path,
    domains: list[str] | None = None,
    samples: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    offset: int = 0,
    sampled: bool = True,
    context: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``{"<domain>": {"accuracy", "format_score", "n", "sampled_accuracy", ...}}`` on the held-out
    rows ``[offset : offset + samples]`` (sampled scores are NaN with ``sampled=False``); with a
    ``context`` template the user turn is that template over each row (what a teacher with privileged
    context is shown, e.g. ``"{prompt}\nhint: {response}"``)."""
    model, tokenizer = load_hf_for_eval(model_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def complete(prompts: list[list[int]], temp: float) -> list[list[int]]:
        return [c.token_ids for c in generate(model, prompts, max_new_tokens, eos, pad, temperature=temp, seed=seed)]

    window = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return evaluate_with(complete, tokenizer, world_dir, domains, samples, temperature, offset, sampled, context,
                         max_prompt_tokens=window - max_new_tokens if window else None)


def evaluate_with(
    complete: Callable[[list[list[int]], float], list[list[int]]],
    tokenizer: Any,
    world_dir: str | Path,
    domains: list[str] | None = None,
    samples: int | None = None,
    temperature: float = 1.0,
    offset: int = 0,
    sampled: bool = True,
    context: str | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The same table for any generator: ``complete(prompt_ids, temperature) -> completion ids``
    (a local HF model, the embedded engine, or a rollout server). Rows whose prompt is longer than
    ``max_prompt_tokens`` (the context window less the completion budget) are counted, not scored."""
    check_context(context)
    have = available_domains(world_dir)
    domains = domains or have
    unknown = [d for d in domains if d not in have or d not in DOMAINS]
    if unknown:
        raise DataError(f"unknown domain(s) {unknown}; available in {world_dir}: {have}")
    results = {}
    for domain in domains:
        rows = read_rows(Path(world_dir) / "data" / domain / "test.jsonl")
        rows = rows[offset: offset + samples if samples else None]
        if not rows:
            raise DataError(f"{world_dir}/data/{domain}/test.jsonl: no rows at offset {offset}")
        turns = [r["messages"][0] if context is None else _context_turn(context, r, domain, i) for i, r in enumerate(rows, offset + 1)]
        prompts = [chat_ids(tokenizer, [turn], add_generation_prompt=True) for turn in turns]
        metas = [r["meta"] for r in rows]
        fits = [max_prompt_tokens is None or len(p) <= max_prompt_tokens for p in prompts]
        if not any(fits):
            raise DataError(f"{world_dir}/data/{domain}/test.jsonl: every prompt is longer than the {max_prompt_tokens} "
                            f"tokens the model's context window leaves beside the completion budget"
                            + (" (the --context template makes them longer)" if context else ""))
        prompts = [p for p, ok in zip(prompts, fits) if ok]
        metas = [m for m, ok in zip(metas, fits) if ok]
        scores = []
        for temp in ((0.0, temperature) if sampled else (0.0,)):
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in complete(prompts, temp)]
            scores.append(score_responses(domain, metas, texts))
        (acc, fmt), (s_acc, s_fmt) = scores if sampled else (scores[0], (float("nan"), float("nan")))
        results[domain] = asdict(DomainScore(acc, fmt, len(prompts), s_acc, s_fmt, len(rows) - len(prompts)))
    return results


def check_context(template: str | None) -> None:
    """A ``context`` template names only row fields (:func:`template_fields`), as a DataError."""
    if template is not None:
        try:
            template_fields(template)
        except ValueError as exc:
            raise DataError(f"--context: {exc}") from None


def _context_turn(template: str, row: dict, domain: str, line: int) -> dict[str, str]:
    messages = row["messages"]
    response = messages[1]["content"] if len(messages) > 1 and messages[1].get("role") == "assistant" else None
    try:
        shown = render_template(template, {"prompt": messages[0]["content"], "response": response, "meta": row["meta"]})
    except KeyError as exc:
        raise DataError(f"--context names {{{exc.args[0]}}}, which data/{domain}/test.jsonl row {line} does not have") from None
    return {"role": "user", "content": shown}


def format_table(results: dict[str, dict[str, Any]], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'domain':<12}{'n':>5}{'greedy acc':>12}{'format':>9}{'sampled acc':>13}")
    for domain, r in results.items():
        lines.append(f"{domain:<12}{r['n']:>5}{r['accuracy']:>12.3f}{r['format_score']:>9.3f}{r['sampled_accuracy']:>13.3f}")
    over = {d: r["skipped"] for d, r in results.items() if r.get("skipped")}
    if over:
        lines.append(f"not scored (prompt + completion budget over the model's context window): {over}")
    return "\n".join(lines)


class DomainEvaluator:
    """What a training loop is handed to evaluate with its own engine (it never imports eval)."""

    def __init__(self, world_dir: str | Path, domains: list[str], samples: int, tokenizer_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.world_dir, self.domains, self.samples = Path(world_dir), domains or None, samples
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def evaluate(self, complete: Callable[[list[list[int]], float], list[list[int]]]) -> dict[str, dict[str, Any]]:
        return evaluate_with(complete, self.tokenizer, self.world_dir, self.domains, self.samples)

    def format(self, table: dict[str, dict[str, Any]], title: str) -> str:
        return format_table(table, title)
