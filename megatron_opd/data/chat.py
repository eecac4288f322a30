"""Chat-format SFT data: load (.jsonl directly, other formats with ``datasets``), tokenize with the model's chat template, mask the loss
to assistant tokens, and report (never silently drop) bad or overlong rows."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_opd.data import DataError
from megatron_opd.records import SFTMicroBatch

OverlongPolicy = Literal["truncate", "drop"]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is an assistant token (a training target)


@dataclass
class TokenizeReport:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    first_errors: list[str] = field(default_factory=list)

    def note(self, reason: str, row: int, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"row {row}: {detail}")

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        parts += [f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        return ", ".join(parts)



def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False, **template: Any) -> list[int]:
    """``messages`` through the tokenizer's chat template, as a list of token ids (transformers 5's
    ``apply_chat_template`` returns a dict unless told otherwise; 4.x a list)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False, **template))


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str) -> None:
    """A tokenizer with ids past the model's vocabulary cannot drive it."""
    if len(tokenizer) > vocab_size:
        raise DataError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model vocab_size is "
                        f"{vocab_size} (tokenizer/model mismatch)")


def load_rows(source: str, split: str = "train") -> Any:
    """Rows of a local .jsonl file (a list of dicts, exactly as written), or a ``datasets.Dataset`` from
    a local .json/.parquet file or a hub id (when online)."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and _blank(path):
        raise DataError(f"{source}: the file is empty (no rows)")
    if path.exists() and suffix == ".jsonl":
        return _read_jsonl(path)
    import datasets  # ~2 s to import: only for the formats that need it

    if path.exists():
        fmt = {".json": "json", ".parquet": "parquet"}.get(suffix)
        if fmt is None:
            raise DataError(f"{source}: unsupported data file type {suffix!r}; expected .jsonl, .json or .parquet")
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as exc:  # datasets wraps parse errors in several exception types
            cause = str(exc).strip() or str(exc.__cause__ or "").strip() or type(exc).__name__
            raise DataError(f"{source}: could not be read as {fmt}: {cause}") from exc
    if suffix in {".jsonl", ".json", ".parquet"} or "/" not in source:
        raise DataError(f"{source}: data file not found")
    return datasets.load_dataset(source, split=split)


def _blank(path: Path) -> bool:
    """Nothing but whitespace (read in blocks: a large file is not read whole)."""
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            if block.strip():
                return False
    return True


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; any other line stops the read, naming it. (Read directly:
    ``datasets`` would cast every row to one Arrow schema, filling the keys a row lacks with nulls.)"""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: could not be read as jsonl: line {number}: {exc}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: could not be read as jsonl: line {number} is a {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {role, content} messages"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return f"message {i} must be a dict with string 'role' and 'content'"
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        return "no assistant turn"
    if any(not m["content"].strip() for m in assistant):
        return "empty assistant turn"
    return None


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedExample:
    """Token ids of the whole conversation and a mask that is 1 on assistant-written tokens.

    Each assistant turn's tokens are the difference between the templated conversation up to and
    including that turn and the templated prefix with a generation prompt; this needs a template
    whose rendering of a prefix is a prefix of the rendering of the whole (true of ChatML-style ones).
    """
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        full = chat_ids(tokenizer, messages[: i + 1])
        if list(prompt[: len(ids)]) != ids or list(full[: len(prompt)]) != list(prompt):
            raise DataError("chat template is not prefix-stable; cannot locate assistant tokens")
        mask += [0] * (len(prompt) - len(ids)) + [1] * (len(full) - len(prompt))
        ids = list(full)
    return TokenizedExample(ids, mask)


def tokenize_dataset(
    rows: Any,
    tokenizer: Any,
    max_length: int,
    overlong: OverlongPolicy = "drop",
    messages_field: str = "messages",
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize every row; bad rows are counted and skipped, overlong ones truncated or dropped."""
    report = TokenizeReport()
    examples: list[TokenizedExample] = []
    columns = getattr(rows, "column_names", None)
    if columns is not None and messages_field not in columns:
        raise DataError(f"dataset has no '{messages_field}' column (columns: {columns})")
    for row_idx, row in enumerate(rows):
        report.rows += 1
        messages = row.get(messages_field)
        problem = "missing 'messages'" if messages is None else _check_messages(messages)
        if problem:
            report.note("missing messages" if messages is None else "bad messages", row_idx, problem)
            continue
        example = tokenize_conversation(tokenizer, messages)
        if len(example.input_ids) > max_length:
            if overlong == "drop":
                report.note("longer than max_length", row_idx, f"{len(example.input_ids)} tokens > {max_length}")
                continue
            example = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length])
            report.truncated += 1
        if sum(example.loss_mask[1:]) == 0:
            report.note("no assistant tokens left", row_idx, "no target tokens after truncation")
            continue
        examples.append(example)
        report.kept += 1
    return examples, report


def collate(examples: list[TokenizedExample], pad_id: int) -> SFTMicroBatch:
    """Right-pad to the longest example: ``input_ids`` [b, s] and ``loss_mask`` [b, s]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    return SFTMicroBatch(ids, mask)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The deterministic shuffle of one epoch (depends only on seed and epoch: exact resume)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def global_batch_indices(num_examples: int, seed: int, step: int, global_batch_size: int) -> list[int]:
    """Example indices of global batch ``step`` (0-based) in an endless stream of shuffled epochs."""
    out: list[int] = []
    position = step * global_batch_size
    while len(out) < global_batch_size:
        epoch, offset = divmod(position, num_examples)
        order = epoch_order(num_examples, seed, epoch)
        take = min(global_batch_size - len(out), num_examples - offset)
        out += order[offset : offset + take]
        position += take
    return out
