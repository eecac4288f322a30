"""A teacher with another tokenizer: its scores over its own tokens of a completion, mapped onto
the student's tokens of the same text through character offsets.

Both tokenizations tile the same characters (:func:`map_to_student`). Each teacher token's log-prob
goes to the student token holding its first character, so a student token covered exactly by whole
teacher tokens gets their sum (exact, by the chain rule: log p(ab) = log p(a) + log p(b | a)). A
teacher token that crosses a student token's edge is given whole to the student token where it
starts, and the tokens it touches are flagged ``aligned=False``; every stretch keeps its total, so a
sequence's log-prob is exact. :class:`CrossTokenizer` re-tokenizes a completion after the teacher's
own prompt and maps its scores back (EOS to EOS), with the positions a non-finite teacher score
touches marked invalid.

For the top-k losses, :func:`topk_to_student` turns the teacher's top-k rows into its distribution
of the next *student* token at every student position, the character-level marginal of a tokenized
model (Phan et al. 2024, "Exact byte-level probabilities from tokenized language models"), looking
back over every teacher token start within a token's length, through the shared vocabulary of
:class:`VocabMap` (:func:`build_vocab_map`). Measurements and the reasons for the first-character
rule: README, "Self-distillation, cross-tokenizer teachers, GKD mixing".
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Callable

import torch


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
        if j and teacher[j - 1][1] > lo:  # the previous token ran into this one
            exact = False
        while j < len(teacher) and teacher[j][0] < hi:  # the teacher tokens starting here
            total += teacher_logprobs[j]
            if teacher[j][1] > hi:  # it runs into the next student token(s)
                exact = False
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
    text: str = ""  # the completion's text (the characters both spans tile)


class CrossTokenizer:
    """Re-tokenizes a student completion for a teacher with another tokenizer and maps the
    teacher's per-token log-probs back onto the student's tokens (:func:`map_to_student`). The
    completion's EOS is the end of the turn for both: the student's EOS gets the teacher's EOS
    log-prob."""

    def __init__(self, student_tokenizer, teacher_tokenizer) -> None:
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        if teacher_tokenizer.eos_token_id is None:
            raise OffsetError("the cross-tokenizer teacher's tokenizer has no EOS token")
        self._vocab: VocabMap | None = None

    def vocab_map(self) -> "VocabMap":
        """The teacher's ids onto the student's (:func:`build_vocab_map`), built on first use."""
        if self._vocab is None:
            self._vocab = build_vocab_map(self.student, self.teacher)
        return self._vocab

    def encode(self, teacher_prompt: list[int], completion: list[int]) -> Encoded:
        eos = bool(completion) and completion[-1] == self.student.eos_token_id
        body = completion[:-1] if eos else completion
        text = self.student.decode(body, clean_up_tokenization_spaces=False)
        student_spans = piece_spans(self.student, body)
        encoded = self.teacher(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, teacher_spans = list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]]
        if eos:
            ids.append(self.teacher.eos_token_id)
        return Encoded(list(teacher_prompt) + ids, len(teacher_prompt), student_spans, teacher_spans, eos, text)

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


@dataclass(frozen=True)
class VocabMap:
    """The teacher's ids in the student's terms, for the top-k losses. ``student_of[t]``: the student
    token a teacher token's text begins with (its only token where the text is one student token:
    the shared vocabulary), -1 where the text is no student text (a special token, a partial byte, a
    character the student cannot write: that mass is in the tail bucket); ``texts[t]`` its text (''
    where it maps to nothing); ``first_of(text)`` the first student token of any text (-1: none)."""

    student_of: torch.Tensor  # [teacher vocab] int64
    texts: list[str]
    first_of: Callable[[str], int]
    longest: int  # the longest text of a teacher token (how far back a token can start)
    shared: int  # teacher text tokens that are one student token
    by_prefix: int  # longer teacher tokens, mapped to their first student token
    markup: int  # added tokens both tokenizers have (a chat template's), mapped but not counted as shared text
    unmapped: int  # (the EOS, mapped to the student's, is in none of the four)

    def summary(self) -> str:
        return (f"{self.shared} teacher tokens are student tokens, {self.by_prefix} more map to their first "
                f"student token, {self.markup} added tokens both have, {self.unmapped} are not student text "
                "(their mass goes to the tail)")


def build_vocab_map(student_tokenizer, teacher_tokenizer) -> VocabMap:
    size = len(teacher_tokenizer)
    special = set(teacher_tokenizer.all_special_ids)
    added = set(teacher_tokenizer.added_tokens_decoder)
    unk = student_tokenizer.unk_token_id

    def student_ids(text: str) -> list[int] | None:
        ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or unk in ids or student_tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
            return None
        return ids

    @lru_cache(maxsize=1 << 16)
    def first_of(text: str) -> int:
        ids = student_ids(text) if text and "\ufffd" not in text else None
        return ids[0] if ids else -1

    texts = [teacher_tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in range(size)]
    student_of, kept, shared, by_prefix, markup = [-1] * size, [""] * size, 0, 0, 0
    for t, text in enumerate(texts):
        if t == teacher_tokenizer.eos_token_id:
            student_of[t] = student_tokenizer.eos_token_id  # the end of the turn, not counted as shared text
            continue
        ids = None if t in special or not text or "\ufffd" in text else student_ids(text)
        if ids is None or (t in added and len(ids) > 1):  # no text of its own to map
            continue
        student_of[t], kept[t] = ids[0], text
        if t in added:
            markup += 1
        elif len(ids) == 1:
            shared += 1
        else:
            by_prefix += 1
    return VocabMap(torch.tensor(student_of, dtype=torch.long), kept, first_of, max(map(len, texts), default=1), shared, by_prefix, markup,
                    size - 1 - shared - by_prefix - markup)


def topk_to_student(encoded: Encoded, top_ids, top_logprobs, teacher_logprobs, vocab: VocabMap,
                    student_ids: list[int]):
    """The teacher's top-k at its completion positions ``top_ids`` / ``top_logprobs`` [n (+1 for EOS), k]
    (and its log-prob of each of its own tokens ``teacher_logprobs`` [n (+1)]) as the teacher's
    distribution of the next *student* token at each student completion token ``student_ids`` [T]:
    the character-level marginal of a tokenized model (Phan et al. 2024, "Exact byte-level
    probabilities from tokenized language models"), over the tokenizations that follow the teacher's
    own up to some token start and then take one token that runs past the point.

    At character ``o``, every teacher token start ``b`` within a token's length before ``o`` offers the
    candidates of its row that begin with the text from ``b`` to ``o`` and go on past it, weighted by
    the teacher's probability of its own tokens from the first such start to ``b``; where a teacher
    token starts at ``o`` (and at the EOS), its whole row joins, weighted by the probability of the
    teacher's tokens up to ``o``. Each candidate counts for the first student token of what it writes
    after ``o`` (:class:`VocabMap`); ids with no student text leave their mass to the tail, and other
    tokenizations that end exactly at ``o`` are left out (their next row was not computed). Without
    the look back, a student that wrote the start of a token the teacher merges ("ans" of "answer:")
    was judged by the teacher's row after tokens it never writes in that order, and the run diverged.
    Returns ids / log-probs [T, k], descending, absent slots at -inf (an id repeated from the row); a
    position the top-k says nothing about is a point mass on the student's own token."""
    texts, spans, text = vocab.texts, encoded.teacher_spans, encoded.text
    n, k = len(spans), top_ids.shape[-1]
    rows = [[(texts[t] if t < len(texts) else "", int(vocab.student_of[t]) if t < len(texts) else -1, p)
             for t, p in zip(ids, ps) if p > 0]
            for ids, ps in zip(top_ids.tolist(), top_logprobs.float().exp().tolist())]
    cum = list(accumulate((float(x) for x in teacher_logprobs[:n]), initial=0.0))  # log p of the teacher's tokens before r
    lows = [lo for lo, _ in spans]
    targets = [lo for lo, _ in encoded.student_spans] + ([len(text)] if encoded.eos else [])
    if len(targets) != len(student_ids):
        raise OffsetError(f"{len(student_ids)} student tokens, {len(targets)} mapped")
    out_ids, out_lps = [], []
    for o, own in zip(targets, student_ids):
        before = bisect_left(lows, o)  # rows starting before o
        first = bisect_left(lows, o - vocab.longest, 0, before)
        here = before if (before < n and lows[before] == o) or (o == len(text) and encoded.eos) else None
        if first == before and here is None:  # no token of the teacher's starts near o (a span it has no text for)
            first = before - 1 if before else 0
        ref = cum[first] if first < before else cum[here]
        dist: dict[int, float] = {}
        total = 0.0
        for r in range(first, before):  # a token from row r that runs past o
            q, w = text[lows[r]:o], math.exp(cum[r] - ref)
            for piece, _, p in rows[r]:
                if len(piece) > len(q) and piece.startswith(q):
                    total += w * p
                    if (sid := vocab.first_of(piece[len(q):])) >= 0:
                        dist[sid] = dist.get(sid, 0.0) + w * p
        if here is not None:  # the teacher's own tokens up to o, then its row there
            w = math.exp(cum[here] - ref)
            total += w
            for _, sid, p in rows[here]:
                if sid >= 0:
                    dist[sid] = dist.get(sid, 0.0) + w * p
        ranked = sorted(((p / total, sid) for sid, p in dist.items() if p > 0), reverse=True)[:k] or [(1.0, own)]
        fill = ranked[0][1]
        out_ids.append([sid for _, sid in ranked] + [fill] * (k - len(ranked)))
        out_lps.append([math.log(p) for p, _ in ranked] + [float("-inf")] * (k - len(ranked)))
    return torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_lps, dtype=torch.float32)
