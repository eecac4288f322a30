"""The OPD stages' prompts: chat rows -> :class:`~megatron_opd.records.Prompt` (the student's prompt
ids, the row's own response, each context teacher's own prompt ids), bad rows counted and skipped."""

from __future__ import annotations

import json
from typing import Any

from megatron_opd.config.teachers import render_template
from megatron_opd.data.chat import DataError, chat_ids, load_rows
from megatron_opd.records import Prompt


def load_prompts(sources: list[str], tokenizer: Any, messages_field: str, domain_field: str,
                 max_prompt_length: int, contexts: dict[str, str | None] | None = None,
                 need_reference: bool = False,
                 tokenizers: dict[str, Any] | None = None,
                 teacher_room: dict[str, int] | None = None,
                 over_teacher_window: str = "skip") -> tuple[list[Prompt], dict[str, int], list[str]]:
    """Chat rows -> prompt ids (the conversation up to, not including, its last assistant turn, with
    the generation prompt) and the row's own response when it has one (the last assistant turn as
    the template renders it, through EOS). ``contexts``: teacher -> context template; each such
    teacher's prompt is the conversation with its last user turn replaced by the rendered template
    (a row without a field the template names stops the run here, naming both); ``tokenizers``:
    teacher -> its own tokenizer (cross-tokenizer teachers; template None: the plain prompt). Rows that cannot
    be used are counted and skipped; returns (prompts, skipped, problems). ``teacher_room``: teacher -> the
    longest prompt it can take (its context window less the completion budget); a row over it is skipped
    (``over_teacher_window="skip"``) or stops the run naming it ("error")."""
    prompts: list[Prompt] = []
    skipped: dict[str, int] = {}
    problems: list[str] = []
    for source in sources:
        for i, row in enumerate(load_rows(source)):
            messages = row.get(messages_field)
            reason = None
            response = None
            meta = row.get("meta")
            if not isinstance(messages, list) or not messages:
                reason = f"no '{messages_field}' list"
            elif not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                         for m in messages):
                reason = f"'{messages_field}' entries must be {{role, content}} objects with string values"
            else:
                if messages[-1].get("role") == "assistant":
                    response, messages = messages[-1]["content"], messages[:-1]
                if not messages or messages[-1].get("role") != "user":
                    reason = "no user turn to answer"
            if reason is None and isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except json.JSONDecodeError:
                    reason = "'meta' is a string that is not JSON"
            if reason is None and meta is not None and not isinstance(meta, dict):
                reason = "'meta' must be an object (or its JSON text)"
            if reason is None and need_reference and response is None:
                reason = "no assistant turn (rollout.on_policy_fraction < 1 trains on the rows' own responses)"
            if reason is None:
                ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
                if len(ids) > max_prompt_length:
                    reason = f"prompt longer than {max_prompt_length} tokens"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                if len(problems) < 5:
                    problems.append(f"{source} row {i}: {reason}")
                continue
            prompt = Prompt(list(ids), row.get(domain_field), meta, row=len(prompts))
            if response is not None:
                prompt.reference = _response_ids(tokenizer, messages, response, len(ids))
            fields = {"prompt": messages[-1]["content"], "response": response, "meta": meta}
            for teacher, template in (contexts or {}).items():
                try:
                    shown = render_template(template, fields) if template else messages[-1]["content"]
                except KeyError as exc:
                    raise DataError(f"teachers.teachers.{teacher}.context names {{{exc.args[0]}}}, which {source} row {i} "
                                    "does not have") from None
                teacher_messages = [*messages[:-1], {"role": "user", "content": shown}]
                own = (tokenizers or {}).get(teacher, tokenizer)
                prompt.contexts[teacher] = chat_ids(own, teacher_messages, add_generation_prompt=True)
            reason = _over_a_teacher_window(prompt, teacher_room or {})
            if reason:
                if over_teacher_window == "error":
                    raise DataError(f"{source} row {i}: {reason} (data.over_teacher_window: error; 'skip' counts and "
                                    "skips such rows)")
                skipped[reason.split(":")[0]] = skipped.get(reason.split(":")[0], 0) + 1
                if len(problems) < 5:
                    problems.append(f"{source} row {i}: {reason}")
                continue
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"data.train: no usable prompts ({skipped}; first problems: {problems})")
    return prompts, skipped, problems


def _over_a_teacher_window(prompt: Prompt, room: dict[str, int]) -> str | None:
    for teacher, longest in room.items():
        length = len(prompt.contexts.get(teacher, prompt.ids))
        if length > longest:
            return (f"over the context window of teacher {teacher!r}: its prompt of {length} tokens is longer than "
                    f"the {longest} its window leaves beside rollout.max_new_tokens")
    return None


def _response_ids(tokenizer: Any, messages: list[dict[str, str]], response: str, prompt_len: int) -> list[int]:
    """The response's ids as the student would have written them: the templated conversation past
    the generation prompt, through the first EOS (where sampling stops)."""
    full = chat_ids(tokenizer, [*messages, {"role": "assistant", "content": response}])
    out = full[prompt_len:]
    eos = tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out
