"""Tiny-world domains: exact verifiers (right, wrong and near-miss answers), seeded generators,
disjoint train/test splits."""
import json

import pytest

from megatron_opd.data.chat import DataError
from megatron_opd.data.domains import DOMAINS, Verdict, get_domain
from megatron_opd.data.domains.arithmetic import scratchpad
from megatron_opd.data.world import draw, make_splits, read_rows, write_rows


def test_arithmetic_scratchpad_and_verifier():
    assert scratchpad(4827, 9356) == "7+6+0=13\n2+5+1=8\n8+3+0=11\n4+9+1=14\nanswer: 14183"
    assert scratchpad(95, 7) == "5+7+0=12\n9+0+1=10\nanswer: 102"
    d, meta = get_domain("arithmetic"), {"a": 4827, "b": 9356}
    right = "7+6+0=13\n2+5+1=8\n8+3+0=11\n4+9+1=14\nanswer: 14183"
    assert d.verify(meta, right).correct and d.verify(meta, right).format_score == 1.0
    assert not d.verify(meta, right.replace("14183", "14173")).correct  # off by one digit
    assert not d.verify(meta, right.replace("14183", "141830")).correct  # extra digit
    assert not d.verify(meta, "answer: 14183 answer: 1").correct  # not the final answer
    lucky = "7+6+0=13\n2+5+0=7\nanswer: 14183"  # right answer, wrong working
    assert d.verify(meta, lucky).correct and d.verify(meta, lucky).format_score < 1.0
    assert d.verify(meta, "").format_score == 0.0 and not d.verify(meta, "").correct


def test_strings_verifier():
    d = get_domain("strings")
    assert d.verify({"op": "reverse", "word": "garden"}, "nedrag").correct
    assert d.verify({"op": "reverse", "word": "garden"}, " nedrag\n").correct
    assert not d.verify({"op": "reverse", "word": "garden"}, "nedrga").correct  # two letters swapped
    assert not d.verify({"op": "reverse", "word": "garden"}, "garden").correct
    assert d.verify({"op": "upper", "word": "abc"}, "ABC").correct
    assert not d.verify({"op": "upper", "word": "abc"}, "ABc").correct
    assert d.verify({"op": "double", "word": "abc"}, "aabbcc").correct
    assert not d.verify({"op": "double", "word": "abc"}, "aabbc").correct  # one short
    assert d.verify({"op": "double", "word": "abc"}, "aa bb cc").format_score == 0.0


def test_format_verifier_counts_constraints():
    d = get_domain("format")
    meta = {"kind": "repeat", "word": "lamp", "case": "upper", "count": 3, "brackets": "[]", "sep": " | "}
    assert d.verify(meta, "[LAMP] | [LAMP] | [LAMP]").correct
    near = d.verify(meta, "[LAMP] | [LAMP]")  # one short
    assert not near.correct and near.format_score == 0.75
    lower = d.verify(meta, "[lamp] | [lamp] | [lamp]")
    assert not lower.correct and lower.format_score == 0.5  # count + brackets right, word/case wrong
    assert not d.verify(meta, "(LAMP) | (LAMP) | (LAMP)").correct
    jmeta = {"kind": "json", "word": "moon", "count": 2}
    assert d.verify(jmeta, '{"word": "moon", "n": 2}').correct
    assert d.verify(jmeta, '{"n": 2, "word": "moon"}').correct  # key order is not a constraint
    assert not d.verify(jmeta, '{"word": "moon", "n": "2"}').correct
    assert d.verify(jmeta, '{"word": "moon", "n": 2').format_score == 0.0  # not JSON


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_reference_solutions_verify_and_generators_are_seeded(name):
    domain = get_domain(name)
    a = draw(domain, 50, seed=3)
    assert a == draw(domain, 50, seed=3)
    assert a != draw(domain, 50, seed=4)
    assert all(domain.verify(p.meta, p.response).correct for p in a)
    assert all(domain.verify(p.meta, p.response).format_score == 1.0 for p in a)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_train_and_test_never_share_a_problem(name):
    splits = make_splits(name, 500, 100, seed=0)
    train = {r["messages"][0]["content"] for r in splits["train"]}
    test = {r["messages"][0]["content"] for r in splits["test"]}
    assert len(train) == 500 and len(test) == 100 and not train & test
    assert splits == make_splits(name, 500, 100, seed=0)


def test_arithmetic_answers_are_long_enough_to_compound(tmp_path):
    from megatron_opd.data.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(tmp_path / "tok")
    problems = draw(get_domain("arithmetic"), 100, seed=0)
    lengths = [len(tokenizer(p.response)["input_ids"]) for p in problems]
    assert min(lengths) >= 30
    assert sum("+1=" in p.response for p in problems) > 50  # carries are common


def test_multiply_scratchpad_against_hand_worked_example_and_its_length(tmp_path):
    from megatron_opd.data.domains.multiply import scratchpad
    from megatron_opd.data.tokenizer import build_char_tokenizer

    # 47 x 36 by hand: 47 x 6 = 282 (7x6 = 42, carry 4; 4x6 + 4 = 28), 47 x 3 = 141, 282 + 1410 = 1692
    assert scratchpad(47, 36) == ("47*6: 7*6+0=42 4*6+4=28 -> 282\n"
                                  "47*3: 7*3+0=21 4*3+2=14 -> 141\n"
                                  "282+1410: 2+0+0=2 8+1+0=9 2+4+0=6 0+1+0=1 -> 1692\n"
                                  "answer: 1692")
    domain = get_domain("multiply")
    meta = {"a": 47, "b": 36}
    assert domain.verify(meta, scratchpad(47, 36)) == Verdict(True, 1.0)
    slipped = ("47*6: 7*6+0=42 4*6+4=27 -> 272\n"  # one slip, copied into every line after it that reads it
               "47*3: 7*3+0=21 4*3+2=14 -> 141\n"
               "272+1410: 2+0+0=2 7+1+0=8 2+4+0=6 0+1+0=1 -> 1682\n"
               "answer: 1682")
    assert domain.verify(meta, slipped) == Verdict(False, 1 / 4)
    assert domain.verify(meta, "answer: 1692").correct and domain.verify(meta, "answer: 1692").format_score == 0.0
    tokenizer = build_char_tokenizer(tmp_path / "tok")
    lengths = [len(tokenizer(p.response)["input_ids"]) for p in draw(domain, 300, seed=0)]
    assert 130 <= min(lengths) and max(lengths) <= 340 and sum(lengths) / len(lengths) > 180  # a long horizon


def test_malformed_world_rows_name_file_and_line(tmp_path):
    rows = make_splits("strings", 3, 1, seed=0)["train"]
    path = write_rows(rows, tmp_path / "ok.jsonl")
    assert len(read_rows(path)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + json.dumps({"id": "x", "domain": "strings", "messages": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:4: malformed row"):
        read_rows(bad)
    with pytest.raises(KeyError, match="unknown domain 'poetry'"):
        get_domain("poetry")


def test_format_json_share_is_alike_in_train_and_test():
    """A prompt kind rare in train but common in test is forgotten by on-policy training (measured:
    json at 2.6% of train and 22% of test made every OPD run lose format accuracy)."""
    splits = make_splits("format", 2000, 200, seed=0)
    share = {split: sum(json.loads(r["meta"])["kind"] == "json" for r in rows) / len(rows)
             for split, rows in splits.items()}
    assert 0.18 <= share["train"] <= 0.32 and 0.18 <= share["test"] <= 0.32, share
    assert abs(share["train"] - share["test"]) <= 0.07, share
