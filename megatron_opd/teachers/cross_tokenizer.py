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
from itertools import accumulate


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


def piece_spans(tokenizer, ids: list[int], window: int = 4) -> list[tuple[int, int]]:
    """Character spans of each id in ``tokenizer.decode(ids)``. Each token's text is what it adds
    to the decoding of the few tokens before it (a token's text can depend on its neighbours, e.g.
    byte-level pieces): linear in the length. Where those pieces do not concatenate to the whole
    decoding, by decoding every prefix instead. A token that adds no character of its own is an
    error naming it."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, clean_up_tokenization_spaces=False)

    pieces = []
    for k in range(len(ids)):
        lo = max(0, k - window)
        before, through = decode(ids[lo:k]), decode(ids[lo:k + 1])
        pieces.append(through[len(before):] if through.startswith(before) else None)
    if all(p is not None for p in pieces) and "".join(pieces) == decode(ids):
        ends = list(accumulate(len(p) for p in pieces))
    else:  # not local: every prefix (quadratic)
        ends = [len(decode(ids[: k + 1])) for k in range(len(ids))]
    spans = list(zip([0, *ends], ends))
    for k, (lo, hi) in enumerate(spans):
        if hi <= lo:
            raise OffsetError(f"student token {k} (id {ids[k]}) decodes to no character of its own")
    return spans


@dataclass(frozen=True)
class Encoded:
    """One completion in a cross-tokenizer teacher's ids (after its own prompt), with what maps back."""

    teacher_ids: list[int]  # the teacher's prompt + its tokens of the completion text (+ its EOS)
    start: int  # the teacher's first completion position
    student_spans: list[tuple[int, int]]  # the student's completion tokens before EOS
    teacher_spans: list[tuple[int, int]]
    eos: bool  # the completion ended with the student's EOS (mapped to the teacher's)


class CrossTokenizer:
    """Re-tokenizes a student completion for a teacher with another tokenizer and maps the
    teacher's per-token log-probs back onto the student's tokens (:func:`map_to_student`). The
    completion's EOS is the end of the turn for both: the student's EOS gets the teacher's EOS
    log-prob."""

    def __init__(self, student_tokenizer, teacher_tokenizer) -> None:
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        if teacher_tokenizer.eos_token_id is None:
            raise OffsetError("the cross-tokenizer teacher's tokenizer has no EOS token")

    def encode(self, teacher_prompt: list[int], completion: list[int]) -> Encoded:
        eos = bool(completion) and completion[-1] == self.student.eos_token_id
        body = completion[:-1] if eos else completion
        text = self.student.decode(body, clean_up_tokenization_spaces=False)
        student_spans = piece_spans(self.student, body)
        encoded = self.teacher(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, teacher_spans = list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]]
        if eos:
            ids.append(self.teacher.eos_token_id)
        return Encoded(list(teacher_prompt) + ids, len(teacher_prompt), student_spans, teacher_spans, eos)

    @staticmethod
    def to_student(encoded: Encoded, teacher_logprobs: list[float],
                   teacher_valid: list[bool] | None = None) -> tuple[Mapped, list[bool]]:
        """The student tokens' log-probs (and where they are exact), and which are valid (no
        non-finite teacher score under them)."""
        n = len(encoded.teacher_spans)
        if len(teacher_logprobs) != n + encoded.eos:
            raise OffsetError(f"the teacher scored {len(teacher_logprobs)} tokens, {n + encoded.eos} were sent")
        mapped = map_to_student(encoded.student_spans, encoded.teacher_spans, teacher_logprobs[:n])
        valid = [True] * len(mapped.logprobs)
        if teacher_valid is not None and not all(teacher_valid[:n]):
            bad = map_to_student(encoded.student_spans, encoded.teacher_spans, [0.0 if v else 1.0 for v in teacher_valid[:n]])
            valid = [b == 0.0 for b in bad.logprobs]
        if encoded.eos:
            mapped = Mapped([*mapped.logprobs, teacher_logprobs[n]], [*mapped.aligned, True])
            valid.append(True if teacher_valid is None else bool(teacher_valid[n]))
        return mapped, valid
