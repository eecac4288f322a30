"""A teacher with another tokenizer: its log-probs, over its own tokens of the same completion text,
mapped back onto the student's tokens through character offsets (issue 19's first piece).

Both tokenizations cover the same characters. Each teacher token's log-prob goes to the student
token holding its first character. Where every teacher token touching a student token lies inside
it (the boundaries align), that is the sum of those teacher tokens' log-probs — exact by the chain
rule: log p(ab) = log p(a) + log p(b | a). A teacher token that straddles a student boundary (a
split, or a token spanning parts of two) cannot be divided exactly; giving it whole to the student
token where it starts is the approximation, and the student tokens it touches are flagged
``aligned=False`` so a loss or a metric can tell them apart. Every stretch keeps its total: the sum
over the student tokens of a stretch equals the teacher's sum over the same stretch.

Why the first character and not a share by characters: the teacher's choice is made where its token
starts. Its "answer:" against another digit line is one token; spread over seven characters, the
student's "a" carried a seventh of the teacher's verdict, so stopping early looked almost free and
the cross-tokenizer run's answers shrank (31.5 tokens against 50.6). Over 91 sampled "answer:"
starts the advantage at "a" was -0.009 spread, -0.213 first-character, -0.212 with the
same-tokenizer teacher (2026-12-03, cold-start student). The characters after the first get 0 from
the teacher (the continuation of a token it has chosen): a pessimistic first character, optimistic
later ones, an exact sum.
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


@dataclass(frozen=True)
class VocabMap:
    """Each teacher id's student id, for the top-k losses: a teacher token whose text is one student
    token maps to it (the shared vocabulary); a longer one maps to the first student token of its
    text, so the teacher's probability of a student token is the sum over the teacher tokens that
    begin with it (exact for a character-level student: p(next char = c) sums every token starting
    with c); -1 where the text is no student text (a special token, a partial byte, a character the
    student cannot write): that mass is in the tail bucket."""

    student_of: "torch.Tensor"  # [teacher vocab] int64
    shared: int  # teacher text tokens that are one student token
    by_prefix: int  # longer teacher tokens, mapped to their first student token
    markup: int  # added tokens both tokenizers have (a chat template's), mapped but not counted as shared text
    unmapped: int  # (the EOS, mapped to the student's, is in none of the four)

    def summary(self) -> str:
        return (f"{self.shared} teacher tokens are student tokens, {self.by_prefix} more map to their first "
                f"student token, {self.markup} added tokens both have, {self.unmapped} are not student text "
                "(their mass goes to the tail)")


def build_vocab_map(student_tokenizer, teacher_tokenizer) -> VocabMap:
    import torch

    size = len(teacher_tokenizer)
    special = set(teacher_tokenizer.all_special_ids)
    texts = [teacher_tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in range(size)]
    encoded = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    unk = student_tokenizer.unk_token_id
    added = set(teacher_tokenizer.added_tokens_decoder)
    student_of, shared, by_prefix, markup = [-1] * size, 0, 0, 0
    for t, (text, ids) in enumerate(zip(texts, encoded)):
        if t == teacher_tokenizer.eos_token_id:
            student_of[t] = student_tokenizer.eos_token_id  # the end of the turn, not counted as shared text
            continue
        if t in special or not text or "\ufffd" in text or not ids or unk in ids \
                or student_tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
            continue
        if t in added and len(ids) > 1:  # a marker the student has not: no text of its own to map
            continue
        student_of[t] = ids[0]
        if t in added:
            markup += 1
        elif len(ids) == 1:
            shared += 1
        else:
            by_prefix += 1
    return VocabMap(torch.tensor(student_of, dtype=torch.long), shared, by_prefix, markup,
                    size - 1 - shared - by_prefix - markup)


def topk_to_student(encoded: Encoded, top_ids, top_logprobs, vocab: VocabMap, student_ids: list[int]):
    """The teacher's top-k at its completion positions ``top_ids`` / ``top_logprobs`` [n (+1 for EOS), k]
    as a distribution over student ids at each student completion token ``student_ids`` [T].

    Where a teacher token starts with the student token (same text before both), its top-k is mapped
    through ``vocab``; ids that land on the same student id are summed (in probability), an id with
    no student text leaves its mass to the tail; the student's EOS reads the teacher's EOS position.
    Inside a teacher token (a student token starting mid-way), the teacher has already chosen the
    characters: a point mass on the student's own token (log-prob 0, as :func:`map_to_student` gives
    it). Returns ids / log-probs [T, k], descending, absent slots at -inf (an id repeated from the row)."""
    import torch

    starts = {lo: j for j, (lo, _) in enumerate(encoded.teacher_spans)}
    rows = [starts.get(lo, -1) for lo, _ in encoded.student_spans]
    if encoded.eos:
        rows.append(len(encoded.teacher_spans))
    if len(rows) != len(student_ids):
        raise OffsetError(f"{len(student_ids)} student tokens, {len(rows)} mapped")
    rows_t = torch.tensor(rows, dtype=torch.long)
    k = top_ids.shape[-1]
    sids = vocab.student_of[top_ids[rows_t.clamp_min(0)].long()]  # [T, k]
    probs = torch.where(sids >= 0, top_logprobs[rows_t.clamp_min(0)].float().exp(), torch.zeros(()))
    same = sids[:, :, None] == sids[:, None, :]  # [T, k, k]
    merged = (same * probs[:, None, :]).sum(-1)
    first = ~torch.tril(same, diagonal=-1).any(-1)  # the first slot of each student id keeps the sum
    keep = first & (sids >= 0) & (merged > 0)
    logp = torch.where(keep, merged.clamp_min(1e-45).log(), torch.full_like(merged, float("-inf")))
    inside = rows_t < 0
    own = torch.tensor(student_ids, dtype=torch.long)
    sids = torch.where(inside[:, None], own[:, None].expand(-1, k), sids)
    logp = torch.where(inside[:, None], torch.cat([torch.zeros(len(rows), 1), torch.full((len(rows), k - 1), float("-inf"))], 1), logp)
    logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    sids = sids.gather(-1, order)
    # an absent slot repeats the row's first id (its own token if none), so a membership test sees no extra token
    fill = torch.where(torch.isneginf(logp[:, 0]), own, sids[:, 0])
    sids = torch.where(torch.isneginf(logp), fill[:, None].expand(-1, k), sids)
    return sids, logp
