"""Cross-tokenizer log-prob mapping (teachers/cross_tokenizer.py): hand-built merges, splits and a
spanning token, then random tokenizations of random text under a character-level model whose token
log-probs are known exactly (a token's log-prob is the sum of its characters' by the chain rule)."""
import math
import random

import pytest

from megatron_opd.teachers.cross_tokenizer import OffsetError, map_to_student, token_offsets


def test_identical_tokenizations_map_one_to_one():
    spans = token_offsets(["ab", "c", "de"])
    assert spans == [(0, 2), (2, 3), (3, 5)]
    got = map_to_student(spans, spans, [-0.5, -1.0, -2.0])
    assert got.logprobs == [-0.5, -1.0, -2.0] and got.aligned == [True, True, True]


def test_merge_split_and_spanning_token_by_hand():
    # merge: the student's "ab" is the teacher's "a" + "b": log p(ab) = log p(a) + log p(b | a), exact
    merged = map_to_student([(0, 2)], [(0, 1), (1, 2)], [-1.0, -2.0])
    assert merged.logprobs == [-3.0] and merged.aligned == [True]
    # split: the teacher's "ab" covers the student's "a" and "b": spread by characters, flagged
    split = map_to_student([(0, 1), (1, 2)], [(0, 2)], [-3.0])
    assert split.logprobs == [-1.5, -1.5] and split.aligned == [False, False]
    # spanning: teacher "a" | "bc" | "d" against student "ab" | "cd"; "bc" straddles the boundary
    span = map_to_student([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)], [-1.0, -2.0, -4.0])
    assert span.logprobs == [-2.0, -5.0] and span.aligned == [False, False]
    # one teacher token over three student tokens, then an aligned tail
    long = map_to_student([(0, 1), (1, 3), (3, 4), (4, 6)], [(0, 4), (4, 5), (5, 6)], [-8.0, -0.25, -0.5])
    assert long.logprobs == [-2.0, -4.0, -2.0, -0.75] and long.aligned == [False, False, False, True]


def _char_logprobs(text: str, seed: int) -> list[float]:
    """log p(c_i | c_<i) of a fixed random character-level model (depends on the previous char)."""
    rng = random.Random(seed)
    table = {}
    out = []
    for i, c in enumerate(text):
        key = (text[i - 1] if i else "^", c)
        if key not in table:
            table[key] = math.log(rng.uniform(0.05, 0.95))
        out.append(table[key])
    return out


def _random_pieces(text: str, rng: random.Random, longest: int) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        n = rng.randint(1, longest)
        pieces.append(text[at:at + n])
        at += n
    return pieces


@pytest.mark.parametrize("seed", range(20))
def test_mapped_logprobs_equal_the_direct_ones_where_boundaries_align(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("0123456789+= ab") for _ in range(rng.randint(1, 60)))
    chars = _char_logprobs(text, seed)
    student, teacher = _random_pieces(text, rng, 3), _random_pieces(text, rng, 4)
    s_spans, t_spans = token_offsets(student), token_offsets(teacher)
    direct_student = [sum(chars[lo:hi]) for lo, hi in s_spans]  # the student's tokens scored by the same model
    teacher_lps = [sum(chars[lo:hi]) for lo, hi in t_spans]
    got = map_to_student(s_spans, t_spans, teacher_lps)
    t_edges = {lo for lo, _ in t_spans} | {t_spans[-1][1]}
    for k, ((lo, hi), value, exact) in enumerate(zip(s_spans, got.logprobs, got.aligned)):
        assert exact == (lo in t_edges and hi in t_edges), k  # flagged exactly where a teacher token crosses
        if exact:
            assert value == pytest.approx(direct_student[k], abs=1e-12)
    # spreading keeps totals: the whole completion's log-prob is the teacher's
    assert sum(got.logprobs) == pytest.approx(sum(teacher_lps), abs=1e-9)


def test_offsets_that_do_not_tile_the_same_text_are_refused():
    with pytest.raises(OffsetError, match="teacher token 1: starts at 2, the previous one ends at 1"):
        map_to_student([(0, 3)], [(0, 1), (2, 3)], [-1.0, -1.0])
    with pytest.raises(OffsetError, match="the student covers characters 0..3, the teacher 0..2"):
        map_to_student([(0, 3)], [(0, 2)], [-1.0])
    with pytest.raises(OffsetError, match="2 teacher tokens but 1 log-probs"):
        map_to_student([(0, 2)], [(0, 1), (1, 2)], [-1.0])
    with pytest.raises(OffsetError, match="student token 0: empty or reversed span"):
        map_to_student([(0, 0), (0, 2)], [(0, 2)], [-1.0])
