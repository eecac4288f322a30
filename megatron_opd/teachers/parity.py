"""Tokenizer / chat-template parity between the student and a teacher, checked before a run.

Per-token log-prob gaps only mean something when both models read the same token ids with the
same template. A mismatch stops the run with a description of what differs, unless the recipe
says ``allow_tokenizer_mismatch: true``.
"""

from __future__ import annotations

import difflib
from pathlib import Path


class TokenizerMismatch(ValueError):
    pass


def _load(path: Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise TokenizerMismatch(f"{path}: tokenizer directory does not exist")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_differences(student_dir: Path, teacher_dir: Path, limit: int = 8) -> list[str]:
    """Human-readable differences (empty when the tokenizers agree)."""
    student, teacher = _load(student_dir), _load(teacher_dir)
    diffs: list[str] = []
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:limit]
        only_t = sorted(set(tv) - set(sv))[:limit]
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])[:limit]
        diffs.append(f"vocabulary: student {len(sv)} tokens, teacher {len(tv)}; only in student {only_s}, "
                     f"only in teacher {only_t}, different ids for {moved}")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(student, attr) != getattr(teacher, attr):
            diffs.append(f"{attr}: student {getattr(student, attr)!r}, teacher {getattr(teacher, attr)!r}")
    st, tt = student.chat_template or "", teacher.chat_template or ""
    if st != tt:
        delta = list(difflib.unified_diff(st.splitlines(), tt.splitlines(), "student", "teacher", lineterm="", n=0))
        diffs.append("chat template differs:\n" + "\n".join(delta[:2 * limit]))
    return diffs


def check_parity(student_dir: Path, teachers: dict[str, Path | None], allow_mismatch: bool = False) -> dict[str, list[str]]:
    """Compare every teacher's tokenizer with the student's; raise unless ``allow_mismatch``.
    A teacher without a local tokenizer cannot be checked: that is refused too."""
    found: dict[str, list[str]] = {}
    for name, path in teachers.items():
        if path is None:
            found[name] = ["no local tokenizer to compare: set teachers."
                           f"{name}.tokenizer to a copy of the teacher's tokenizer directory"]
            continue
        diffs = tokenizer_differences(student_dir, path)
        if diffs:
            found[name] = diffs
    if found and not allow_mismatch:
        lines = [f"teacher {name!r}:\n  " + "\n  ".join(d) for name, d in found.items()]
        raise TokenizerMismatch("tokenizer/chat-template parity check failed (set allow_tokenizer_mismatch: "
                                "true only if the ids really mean the same):\n" + "\n".join(lines))
    return found
