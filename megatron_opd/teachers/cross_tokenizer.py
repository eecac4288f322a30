"""A teacher with another tokenizer: its log-probs, over its own tokens of the same completion text,
mapped back onto the student's tokens through character offsets (issue 19's first piece).

Both tokenizations cover the same characters. Where every teacher token touching a student token
lies inside it (the boundaries align), the student token's log-prob is the sum of those teacher
tokens' log-probs — exact by the chain rule: log p(ab) = log p(a) + log p(b | a). A teacher token
that straddles a student boundary (a split, or a token spanning parts of two) cannot be divided
exactly; its log-prob is spread over its characters in proportion, the approximation GOLD-style
cross-tokenizer distillation also has to make, and the student tokens it touches are flagged
``aligned=False`` so a loss or a metric can tell them apart. Spreading keeps every span's total: the
sum over the student tokens of a stretch equals the teacher's sum over the same stretch.
"""

from __future__ import annotations

from dataclasses import dataclass


class OffsetError(ValueError):
    """The two tokenizations do not cover the same characters."""


@dataclass(frozen=True)
class Mapped:
    logprobs: list[float]  # one per student token
    aligned: list[bool]  # True where the value is exact (no teacher token crosses the token's edges)


def _check(offsets: list[tuple[int, int]], who: str) -> None:
    for i, (lo, hi) in enumerate(offsets):
        if hi <= lo:
            raise OffsetError(f"{who} token {i}: empty or reversed span ({lo}, {hi})")
        if i and lo != offsets[i - 1][1]:
            raise OffsetError(f"{who} token {i}: starts at {lo}, the previous one ends at {offsets[i - 1][1]} "
                              "(offsets must tile the text)")


def map_to_student(student: list[tuple[int, int]], teacher: list[tuple[int, int]],
                   teacher_logprobs: list[float]) -> Mapped:
    """``student`` / ``teacher``: [start, end) character spans tiling the same completion text, in
    order; ``teacher_logprobs[j]``: the teacher's log-prob of its token j. Returns the student tokens'
    log-probs and whether each is exact."""
    if len(teacher) != len(teacher_logprobs):
        raise OffsetError(f"{len(teacher)} teacher tokens but {len(teacher_logprobs)} log-probs")
    _check(student, "student")
    _check(teacher, "teacher")
    if not student or not teacher:
        if student or teacher:
            raise OffsetError("one tokenization is empty and the other is not")
        return Mapped([], [])
    if (student[0][0], student[-1][1]) != (teacher[0][0], teacher[-1][1]):
        raise OffsetError(f"the student covers characters {student[0][0]}..{student[-1][1]}, the teacher "
                          f"{teacher[0][0]}..{teacher[-1][1]}")
    out, aligned, j = [], [], 0
    for lo, hi in student:
        total, exact = 0.0, True
        while j < len(teacher) and teacher[j][0] < hi:
            t_lo, t_hi = teacher[j]
            overlap = min(hi, t_hi) - max(lo, t_lo)
            if t_lo < lo or t_hi > hi:  # crosses one of this student token's edges
                exact = False
            total += teacher_logprobs[j] * overlap / (t_hi - t_lo)
            if t_hi > hi:  # the rest of it belongs to the next student token(s)
                break
            j += 1
        out.append(total)
        aligned.append(exact)
    return Mapped(out, aligned)


def token_offsets(pieces: list[str], start: int = 0) -> list[tuple[int, int]]:
    """Spans of consecutive decoded pieces (each token's text, in order) from character ``start``."""
    spans, at = [], start
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans
