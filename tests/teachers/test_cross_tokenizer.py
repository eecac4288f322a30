"""Cross-tokenizer log-prob mapping (teachers/cross_tokenizer.py): hand-built merges, splits and a
spanning token, then random tokenizations of random text under a character-level model whose token
log-probs are known exactly (a token's log-prob is the sum of its characters' by the chain rule)."""
import math
import random

import pytest

from megatron_opd.data.chat import chat_ids
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
    # split: the teacher's "ab" covers the student's "a" and "b": all of it where it starts, flagged
    split = map_to_student([(0, 1), (1, 2)], [(0, 2)], [-3.0])
    assert split.logprobs == [-3.0, 0.0] and split.aligned == [False, False]
    # spanning: teacher "a" | "bc" | "d" against student "ab" | "cd"; "bc" straddles the boundary
    span = map_to_student([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)], [-1.0, -2.0, -4.0])
    assert span.logprobs == [-3.0, -4.0] and span.aligned == [False, False]
    # one teacher token over three student tokens, then an aligned tail
    long = map_to_student([(0, 1), (1, 3), (3, 4), (4, 6)], [(0, 4), (4, 5), (5, 6)], [-8.0, -0.25, -0.5])
    assert long.logprobs == [-8.0, 0.0, 0.0, -0.75] and long.aligned == [False, False, False, True]


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
    # a teacher token's log-prob goes whole to the student token holding its first character
    starts = [sum(lp for (t_lo, _), lp in zip(t_spans, teacher_lps) if lo <= t_lo < hi) for lo, hi in s_spans]
    assert got.logprobs == pytest.approx(starts, abs=1e-12)
    # every stretch keeps its total: the whole completion's log-prob is the teacher's
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


def test_topk_over_the_shared_vocabulary_by_hand():
    """The teacher's top-k as the next student token's distribution: where a teacher token starts,
    its row mapped by first student token (a merged token counts for its first character, summed with
    the shared one; a token with no student text left to the tail), mixed with the tokens of earlier
    rows that run past the point (weighted by the teacher's own tokens up to each row); inside a
    teacher token, only those; the EOS reads the teacher's EOS row."""
    import torch

    from megatron_opd.teachers.cross_tokenizer import Encoded, VocabMap, topk_to_student

    # teacher ids: 0 'a', 1 'b', 2 'ab', 3 a token with no student text, 4 EOS, 5 'abb'; student ids 10 'a', 11 'b', 99 EOS
    first = {"a": 10, "b": 11}
    vocab = VocabMap(torch.tensor([10, 11, 10, -1, 99, 10]), ["a", "b", "ab", "", "", "abb"], lambda text: first.get(text[0], -1),
                     longest=3, shared=2, by_prefix=2, markup=0, unmapped=1)
    log = lambda values: torch.tensor(values).log()  # noqa: E731
    # "ab" + EOS, which the teacher wrote as one token "ab" and the student as "a", "b"
    merged = Encoded([2, 4], 0, student_spans=[(0, 1), (1, 2)], teacher_spans=[(0, 2)], eos=True, text="ab")
    ids, lps = topk_to_student(merged, torch.tensor([[2, 0, 3], [4, 1, 0]]), log([[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]]),
                               log([0.5, 0.9]), vocab, [10, 11, 99])
    assert ids[0, 0] == 10 and lps[0, 0].exp().item() == pytest.approx(0.7)  # "ab" and "a" both begin with 'a'
    assert torch.isneginf(lps[0, 1:]).all() and (ids[0] == 10).all()  # the unmapped 0.1 is in the tail
    # inside "ab" after 'a': of the candidates that run past 'a', "ab" goes on with 'b' ("a" ends there: left out)
    assert ids[1, 0] == 11 and lps[1, 0].item() == pytest.approx(0.0) and torch.isneginf(lps[1, 1:]).all()
    assert ids[2].tolist() == [99, 11, 10] and lps[2].exp().tolist() == pytest.approx([0.9, 0.05, 0.01])
    # the same text the teacher wrote as "a", "b" (p 0.2, 0.3); its first row also holds "abb" (0.1)
    split = Encoded([0, 1, 4], 0, student_spans=[(0, 1), (1, 2)], teacher_spans=[(0, 1), (1, 2)], eos=True, text="ab")
    ids, lps = topk_to_student(split, torch.tensor([[2, 0, 5], [1, 4, 3], [4, 1, 3]]),
                               log([[0.5, 0.2, 0.1], [0.3, 0.7, 0.0], [0.8, 0.1, 0.0]]), log([0.2, 0.3, 0.8]), vocab, [10, 11, 99])
    assert lps[0, 0].exp().item() == pytest.approx(0.8)
    # at 'b': "ab" (0.5) and "abb" (0.1) run past 'a' with 'b'; or "a" (0.2), then the row after it (b 0.3, EOS 0.7)
    assert ids[1, :2].tolist() == [11, 99] and lps[1, :2].exp().tolist() == pytest.approx([0.66 / 0.8, 0.14 / 0.8])
    # at the EOS, two tokens back: "abb" (0.1) goes on with 'b'; or "a", "b" (0.2 x 0.3), then EOS 0.8 / b 0.1
    assert ids[2, :2].tolist() == [11, 99] and lps[2, :2].exp().tolist() == pytest.approx([0.106 / 0.16, 0.048 / 0.16])


# -- the teacher with its own tokenizer, in the scoring path -------------------------------------------

ARITH_TEXTS = ["add 3972 + 5751", "2+1+0=3\n7+5+0=12\n9+7+1=17\n3+5+1=9\nanswer: 9723", "add 712 + 567",
               "2+7+0=9\n1+6+0=7\n7+5+0=12\nanswer: 1279"] * 20


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory):
    """A random micro Qwen3 reading a BPE tokenizer (multi-character tokens, other special-token ids)."""
    from megatron_opd.data.tokenizer import build_bpe_tokenizer
    from megatron_opd.model.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("bpe")
    tok = build_bpe_tokenizer(root / "tok", ARITH_TEXTS, vocab_size=160)
    return make_tiny_qwen3(root / "model", len(tok), "micro", seed=3, tokenizer_dir=root / "tok")


def test_a_completion_is_re_tokenized_over_the_same_characters(bpe_teacher):
    from helpers import REPO
    from transformers import AutoTokenizer

    from megatron_opd.teachers.cross_tokenizer import CrossTokenizer

    student, teacher = AutoTokenizer.from_pretrained(str(REPO / "assets/tiny/tokenizer")), AutoTokenizer.from_pretrained(str(bpe_teacher))
    assert student.eos_token_id != teacher.eos_token_id  # the ids mean different things
    cross = CrossTokenizer(student, teacher)
    text = "2+1+0=3\n7+5+0=12\nanswer: 9723"
    completion = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    enc = cross.encode([7, 8], completion)
    teacher_part = enc.teacher_ids[enc.start:]
    assert enc.teacher_ids[:2] == [7, 8] and enc.eos and teacher_part[-1] == teacher.eos_token_id
    assert teacher.decode(teacher_part[:-1]) == text and len(teacher_part) < len(completion)  # merges: fewer tokens
    assert enc.student_spans == [(i, i + 1) for i in range(len(text))]  # one character per student token
    lps = [-0.1 * (j + 1) for j in range(len(teacher_part))]
    mapped, valid = cross.to_student(enc, lps)
    assert len(mapped.logprobs) == len(completion) and all(valid)
    assert math.isclose(sum(mapped.logprobs), sum(lps), abs_tol=1e-9)  # the sequence's log-prob is kept
    assert mapped.logprobs[-1] == lps[-1]  # EOS <- the teacher's EOS
    single = [j for j, (lo, hi) in enumerate(enc.teacher_spans) if hi - lo == 1]  # one-character teacher tokens: exact
    for j in single:
        assert mapped.logprobs[enc.teacher_spans[j][0]] == lps[j] and mapped.aligned[enc.teacher_spans[j][0]]
    # a non-finite teacher score invalidates exactly the student tokens under it
    bad = [True] * len(lps)
    bad[1] = False
    _, valid = cross.to_student(enc, lps, bad)
    lo, hi = enc.teacher_spans[1]
    assert [i for i, v in enumerate(valid) if not v] == list(range(lo, hi))


def test_a_cross_tokenizer_teacher_scores_in_its_own_ids(bpe_teacher):
    """TeacherSet with a real teacher server reading its own tokenizer: per sample, the student-token
    log-probs sum to HF's log-prob of the same completion text in the teacher's ids (after the
    teacher's own chat-templated prompt), the EOS gets the teacher's EOS log-prob exactly, and the
    parity check reports the teacher as cross-tokenizer instead of stopping."""
    import torch
    from helpers import REPO
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.config.teachers import RoutingSpec
    from megatron_opd.records import Sample
    from megatron_opd.teachers.parity import TokenizerMismatch
    from megatron_opd.teachers.service import TeacherSet

    student_dir = REPO / "assets/tiny/student_init"
    student, teacher = AutoTokenizer.from_pretrained(str(student_dir)), AutoTokenizer.from_pretrained(str(bpe_teacher))
    plain = {"teachers": {"t": {"model": str(bpe_teacher)}}, "default": "t"}
    with pytest.raises(TokenizerMismatch):
        TeacherSet.start(RoutingSpec.model_validate(plain), student_dir=student_dir)
    spec = RoutingSpec.model_validate({"teachers": {"t": {"model": str(bpe_teacher), "cross_tokenizer": True}}, "default": "t"})
    messages = [{"role": "user", "content": "add 3972 + 5751"}]
    prompt = chat_ids(student, messages, add_generation_prompt=True)
    teacher_prompt = chat_ids(teacher, messages, add_generation_prompt=True)
    texts = ["2+1+0=3\n7+5+0=12\nanswer: 9723", "answer: 12", "9+7+1=1"]
    samples = []
    for k, text in enumerate(texts):
        completion = student(text, add_special_tokens=False)["input_ids"] + ([student.eos_token_id] if k < 2 else [])
        samples.append(Sample(prompt + completion, len(prompt), contexts={"t": teacher_prompt}))
    with TeacherSet.start(spec, student_dir=student_dir) as teachers:
        scored = teachers.score(samples)
        metrics = teachers.check_finite(scored, 1)
    hf = AutoModelForCausalLM.from_pretrained(str(bpe_teacher)).eval()
    for k, (text, sample, sc) in enumerate(zip(texts, samples, scored)):
        ids = teacher(text, add_special_tokens=False)["input_ids"] + ([teacher.eos_token_id] if k < 2 else [])
        full = torch.tensor([teacher_prompt + ids])
        with torch.no_grad():
            logp = hf(full).logits.log_softmax(-1)[0]
        direct = logp[len(teacher_prompt) - 1:-1].gather(-1, full[0, len(teacher_prompt):, None]).squeeze(-1)
        got = sc.scores["t"].logprobs
        assert len(got) == len(sample.token_ids) - sample.start
        assert got.sum().item() == pytest.approx(direct.sum().item(), abs=1e-3)
        if k < 2:
            assert got[-1].item() == pytest.approx(direct[-1].item(), abs=1e-4)
    assert 0 < metrics["teachers/t/aligned_fraction"] < 1  # single-character teacher tokens exact, merges not
    # with its whole vocabulary as the top-k, the mapped rows are the teacher's next-character distribution,
    # one token deep (a character-level student), computed here from HF's softmax and the token strings (the
    # server's float32 scores differ from HF's by ~1e-5, which the division inside a token enlarges)
    with TeacherSet.start(spec, student_dir=student_dir) as teachers:
        full_k = teachers.score(samples[:1], top_k=len(teacher))[0].scores["t"]
    text = texts[0]
    enc = teacher(text, add_special_tokens=False, return_offsets_mapping=True)
    seq = torch.tensor([teacher_prompt + enc["input_ids"] + [teacher.eos_token_id]])
    with torch.no_grad():
        probs = hf(seq).logits.softmax(-1)[0, len(teacher_prompt) - 1:].tolist()
    strings = {t: teacher.decode([t]) for t in range(len(teacher)) if t not in teacher.all_special_ids}
    eos_text = student.decode([student.eos_token_id])

    spans = enc["offset_mapping"]
    lows = [lo for lo, _ in spans]
    own = [probs[j][t] for j, t in enumerate(enc["input_ids"])]  # the teacher's probability of each of its own tokens
    longest = max(len(x) for x in strings.values())
    starts = {lo: j for j, lo in enumerate(lows)}
    for i in range(len(text) + 1):  # every student character, then its EOS
        want, total = {}, 0.0
        for r in [r for r, lo in enumerate(lows) if i - longest <= lo < i]:  # a token from row r running past i
            reach = math.prod(own[r2] for r2 in range(r)) if r else 1.0
            for t, string in strings.items():
                q = text[lows[r]:i]
                if len(string) > len(q) and string.startswith(q):
                    total += reach * probs[r][t]
                    want[string[len(q)]] = want.get(string[len(q)], 0.0) + reach * probs[r][t]
        j = starts.get(i, len(spans) if i == len(text) else None)
        if j is not None:  # the teacher's own tokens up to i, then its row there
            reach = math.prod(own[:j])
            total += reach
            want[eos_text] = want.get(eos_text, 0.0) + reach * probs[j][teacher.eos_token_id]
            for t, string in strings.items():  # an added token both have (ChatML's) is one student token
                key = string if t in teacher.added_tokens_decoder else string[0]
                want[key] = want.get(key, 0.0) + reach * probs[j][t]
        want = {c: p / total for c, p in want.items()}
        got = {student.decode([int(t)]): p for t, p in zip(full_k.top_ids[i], full_k.top_logprobs[i].exp().tolist()) if p > 0}
        assert all(got[c] == pytest.approx(want.get(c, 0.0), abs=1e-3) for c in got), (i, sorted(got.items()), sorted(want.items()))
        assert sum(got.values()) == pytest.approx(sum(want.values()), abs=1e-3), i
    assert any(i not in starts for i in range(len(text)))  # inside rows were checked ("answer:" is one token)


@pytest.mark.slow
def test_opd_with_the_shipped_other_tokenizer_teacher_runs_the_loop(tmp_path):
    """recipes/tiny/opd_cross_tokenizer.yaml for two steps at TP2 with the top-k forward KL: the BPE
    arithmetic teacher scores every sample (counted), its log-probs and top-k mapped onto the student's
    tokens (fewer than k student ids where its tokens share a first character); the teacher's mean
    gap to the student is measured and the share of exactly mapped tokens logged."""
    import json

    from helpers import REPO, opd, read_metrics

    out = tmp_path / "cross"
    opd("run", str(REPO / "recipes/tiny/opd_cross_tokenizer.yaml"), "model.hf_path=assets/tiny/student_init",
        "parallel.tp=2", "train.steps=2", "train.prompts_per_step=4", "train.micro_batch_size=4", "rollout.max_new_tokens=24",
        "train.save_interval=0", "eval.world_dir=null", f"run.output_dir={out}", "loss.kind=topk_forward_kl", "loss.top_k=8")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["teachers/arithmetic/aligned_fraction"] < 1
        assert r["teacher/arithmetic/reverse_kl"] > 0.5  # a random student against a trained teacher
        assert r["train/tokens"] == 8 * r["rollout/response_length"]
        assert 1 <= r["opd/token_set_size"] < 8 and math.isfinite(r["train/loss"]) and r["train/loss"] > 0
    assert json.loads((out / "results.json").read_text())["teacher_counters"]["arithmetic"]["samples"] == 16


def test_a_topk_loss_needs_a_shared_vocabulary_before_anything_starts(tmp_path, capsys):
    """The shipped BPE teacher shares its single characters with the student: a top-k loss is
    allowed and its mapping summarised; a teacher whose tokens are none of the student's (Greek
    letters for an ASCII student) stops the run in preflight, naming the teacher."""
    from helpers import REPO

    from megatron_opd.config import load_recipe
    from megatron_opd.data.tokenizer import build_bpe_tokenizer
    from megatron_opd.pipeline.preflight import preflight_opd

    recipe = REPO / "recipes/tiny/opd_cross_tokenizer.yaml"
    topk = ["model.hf_path=assets/tiny/student_init", "loss.kind=topk_forward_kl", "loss.top_k=8"]
    preflight_opd(load_recipe(recipe, topk))
    assert "teacher 'arithmetic' top-k over the shared vocabulary: 96 teacher tokens are student tokens" in capsys.readouterr().out
    greek = "αβγδεζηθικλμνξοπρστυφχψω"
    build_bpe_tokenizer(tmp_path / "greek", [greek * 3, greek[::-1] * 2], vocab_size=60, alphabet=greek)
    cfg = load_recipe(recipe, topk + [f"teachers.teachers.arithmetic.tokenizer={tmp_path / 'greek'}"])
    with pytest.raises(ValueError, match=r"teachers\.teachers\.arithmetic: cross_tokenizer with loss\.kind "
                                         r"'topk_forward_kl': no token of the teacher's vocabulary is a student token"):
        preflight_opd(cfg)
    preflight_opd(load_recipe(recipe, ["model.hf_path=assets/tiny/student_init",
                                       f"teachers.teachers.arithmetic.tokenizer={tmp_path / 'greek'}"]))  # sampled-token: fine
