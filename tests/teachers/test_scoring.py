"""A teacher's scores, from a real teacher server through the scorer and the pool: equal to transformers', at requested ids, the binary payload and prefix sharing, retries, non-finite scores masked and counted, a URL checked for its model and key. Servers are real processes on 127.0.0.1."""

import httpx
import pytest
import torch
from helpers import REPO, hf_token_scores, start_rollout_server

from megatron_opd.config.teachers import RoutingSpec
from megatron_opd.records import TokenScores
from megatron_opd.teachers.backends import SGLangScorer
from megatron_opd.teachers.scorer import TeacherError
from megatron_opd.teachers.service import TeacherSet
from megatron_opd.teachers.teacher_pool import TeacherPool

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


@pytest.fixture(scope="module")
def teacher_server():
    url, proc = start_rollout_server(TEACHER, role="teacher")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


class _FailsOnce:
    """A real replica that answers its first request with a 503 (overloaded), then works."""

    def __init__(self, url: str) -> None:
        self.scorer, self.calls, self.name, self.url = SGLangScorer(url), 0, "flaky", url

    def score(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            from megatron_opd.wire.client import ServerError

            raise ServerError("HTTP 503: overloaded", 503)
        return self.scorer.score(*args, **kwargs)

    def health(self):
        return self.scorer.health()


class _Poisoned:
    """A real replica whose answers come back with NaN / +Inf / -Inf at chosen completion positions
    (what a teacher with broken weights or kernels returns), the rest untouched."""

    def __init__(self, url: str, bad: dict[int, list[int]]) -> None:
        self.scorer, self.url, self.bad, self.name = SGLangScorer(url), url, bad, "poisoned"

    def score(self, sequences, starts, top_k=0, token_ids=None):
        out = self.scorer.score(sequences, starts, top_k)
        values = [float("nan"), float("inf"), float("-inf")]
        for i, positions in self.bad.items():
            for j, t in enumerate(positions):
                out[i].logprobs[t] = values[j % 3]
        return out

    def health(self):
        return self.scorer.health()


def _routed(scores: TokenScores):
    from megatron_opd.records import SampleScores

    return SampleScores({"arithmetic": scores}, {"arithmetic": torch.ones(len(scores))})


@pytest.mark.slow
def test_embedded_teacher_equals_transformers(teacher_server, rollouts):
    seqs, starts = [s.token_ids for s in rollouts], [s.start for s in rollouts]
    reference = hf_token_scores(TEACHER, seqs, starts, 5)
    # within 2e-5 absolute, plus fp32's relative 1e-6 for tail log-probs of magnitude > 10: the server
    # runs each prompt once and its samples after its KV cache, in batches of other shapes than the
    # reference's one full forward, so fp32 sums run in another order (measured: up to 1.5e-5)
    close = dict(rtol=1e-6, atol=2e-5)
    for binary in (False, True):
        scorer = SGLangScorer(teacher_server, binary=binary, top_dtype="float32")
        for got, (lp, values, ids) in zip(scorer.score(seqs, starts, top_k=5), reference):
            assert torch.allclose(got.logprobs, lp, **close)
            assert torch.equal(got.top_ids, ids)
            assert torch.allclose(got.top_logprobs, values, **close)
    # float16 top-k (the default binary format): ids exact, values to fp16 precision
    for got, (lp, values, ids) in zip(SGLangScorer(teacher_server).score(seqs, starts, top_k=5), reference):
        assert torch.allclose(got.logprobs, lp, **close) and torch.equal(got.top_ids, ids)
        assert torch.allclose(got.top_logprobs, values, rtol=1e-3, atol=1e-3)
    # SGLang's layout: logprob_start_len = start - 1 gives [None, lp(start), ...] over the tokens seq[start-1:]
    seq, start = seqs[0], starts[0]
    body = {"input_ids": seq, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": start - 1}
    meta = httpx.post(teacher_server + "/generate", json=body).json()["meta_info"]
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["input_token_logprobs"]] == seq[start - 1:]
    assert torch.allclose(torch.tensor([e[0] for e in meta["input_token_logprobs"][1:]]), reference[0][0], atol=1e-5)


def test_teacher_reports_log_probs_at_requested_ids(teacher_server, rollouts):
    """SGLang's token_ids_logprob (the student-side token sets): the log-probs of named ids at every
    completion position, per sequence its own ids, equal to transformers'; the binary payload refuses it."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.algo.token_sets import ids_to_score, teacher_at

    seqs, starts = [s.token_ids for s in rollouts[:4]], [s.start for s in rollouts[:4]]
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    wanted = [sorted(set(torch.randint(0, model.config.vocab_size, (7,), generator=g).tolist())) for _ in seqs]
    got = SGLangScorer(teacher_server).score(seqs, starts, top_k=3, token_ids=wanted)
    with torch.no_grad():
        for sc, seq, start, ids in zip(got, seqs, starts, wanted):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)[start - 1:len(seq) - 1]
            assert sc.ids_logprobs.shape == (len(seq) - start, len(ids))
            assert torch.allclose(sc.ids_logprobs, lp[:, ids], rtol=1e-6, atol=2e-5)
            # picking a per-position set out of the answer: the student's top-3 at each position here
            student_top = torch.topk(lp, 3, -1).indices
            scored = ids_to_score(student_top)
            again = SGLangScorer(teacher_server).score([seq], [start], token_ids=[scored])[0]
            assert torch.allclose(teacher_at(scored, again.ids_logprobs, student_top), lp.gather(-1, student_top),
                                  rtol=1e-6, atol=2e-5)
    body = {"input_ids": seqs[0], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": starts[0] - 1, "token_ids_logprob": [1, 2]}
    refused = httpx.post(teacher_server + "/generate", json=body, headers={"Accept": "application/x-opd-scores"})
    assert refused.status_code == 400 and "token_ids_logprob" in refused.json()["error"]
    bad = httpx.post(teacher_server + "/generate", json={**body, "token_ids_logprob": [10**6]})
    assert bad.status_code == 400 and "token_ids_logprob" in bad.json()["error"]


def test_teacher_server_refuses_weight_updates(teacher_server):
    r = httpx.post(teacher_server + "/update_weights_from_disk", json={"model_path": "/tmp/x"})
    assert r.status_code == 403 and "teacher" in r.json()["error"]


def test_binary_payload_and_prefix_sharing(teacher_server):
    """Acceptance 2 and 3 (figures also printed by tools/bench_teachers.py)."""
    torch.manual_seed(0)
    prompt = torch.randint(4, 100, (40,)).tolist()
    n, completion = 8, 64
    seqs = [prompt + torch.randint(4, 100, (completion,)).tolist() for _ in range(n)]
    starts = [len(prompt)] * n
    json_scorer, bin_scorer = SGLangScorer(teacher_server, binary=False), SGLangScorer(teacher_server)
    js, bs = json_scorer.score(seqs, starts, top_k=20), bin_scorer.score(seqs, starts, top_k=20)
    for a, b in zip(js, bs):
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.top_ids, b.top_ids)
    tokens = n * completion
    assert bin_scorer.last_response_bytes * 8 <= json_scorer.last_response_bytes, (
        bin_scorer.last_response_bytes / tokens, json_scorer.last_response_bytes / tokens)
    # the prompt is prefilled once for the 8 samples (SGLang's accounting: tokens - cached tokens)
    computed = sum(s.computed_tokens for s in bs)
    assert computed == len(prompt) + n * completion == sum(s.computed_tokens for s in js)
    assert computed / tokens == 1 + len(prompt) / (n * completion)
    assert sum(s.cached_tokens for s in bs) == (n - 1) * len(prompt) == sum(s.cached_tokens for s in js)
    # a sample with an empty completion scores nothing and breaks nothing
    empty = bin_scorer.score([prompt], [len(prompt)], top_k=3)[0]
    assert len(empty) == 0 and empty.top_ids.shape == (0, 3)


def test_single_replica_retries_after_a_transient_error(teacher_server, rollouts):
    seqs, starts = [s.token_ids for s in rollouts[:4]], [s.start for s in rollouts[:4]]
    pool = TeacherPool("arith", [_FailsOnce(teacher_server)], batch_size=8, backoff_s=0.01)
    got = pool.score(seqs, starts)
    assert len(got) == 4 and pool.counters.retries == 1 and pool.counters.failures == 1
    reference = SGLangScorer(teacher_server).score(seqs, starts)
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(got, reference))


def test_nonfinite_teacher_scores_are_masked_counted_and_stop_the_run_past_a_threshold(teacher_server, rollouts):
    from megatron_opd.records import Prompt, Rollout
    from megatron_opd.train.batches import micro_batches
    from megatron_opd.train.opd.step_maker import build_step_batch

    samples = rollouts[:4]
    seqs, starts = [s.token_ids for s in samples], [s.start for s in samples]
    clean = SGLangScorer(teacher_server).score(seqs, starts)
    bad = {0: [0, 2, 3], 2: [1]}
    pool = TeacherPool("arithmetic", [_Poisoned(teacher_server, bad)], batch_size=8)
    got = pool.score(seqs, starts)
    assert pool.counters.nonfinite_tokens == 4
    for i, (g, ref) in enumerate(zip(got, clean)):
        positions = bad.get(i, [])
        if positions:
            assert g.valid.tolist() == [t not in positions for t in range(len(g))]
        else:
            assert g.valid is None
        assert torch.isfinite(g.logprobs).all()  # nothing downstream sees a NaN ...
        keep = torch.tensor([t not in positions for t in range(len(g))])
        assert torch.equal(g.logprobs[keep], ref.logprobs[keep])  # ... and the finite scores are the server's own

    spec = RoutingSpec.model_validate({"teachers": {"arithmetic": {"urls": [teacher_server]}},
                                       "routes": {"arithmetic": "arithmetic"}, "max_nonfinite_fraction": 0.05})
    teachers = TeacherSet(spec, {"arithmetic": pool})
    scored = [_routed(g) for g in got]
    total = sum(len(g) for g in got)
    assert 4 <= 0.05 * total  # below the threshold: counted in the step's metrics, not fatal
    assert teachers.check_finite(scored, step=1) == {"teachers/arithmetic/nonfinite_tokens_step": 4.0}
    teachers.spec = spec.model_copy(update={"max_nonfinite_fraction": 3 / total})
    with pytest.raises(TeacherError, match=r"teacher 'arithmetic': step 1: 4 of its \d+ scored tokens were NaN/Inf"):
        teachers.check_finite(scored, step=1)

    # the masked positions are not trained: loss mask 0 there, 1 at every other completion position
    prompts = [Prompt(ids=s.token_ids[:s.start], domain="arithmetic", row=i) for i, s in enumerate(samples)]
    rolls = [Rollout(prompt_ids=s.token_ids[:s.start], completion_ids=s.token_ids[s.start:], logprobs=[0.0] * len(g),
                     finish_reason="stop", weight_version="step-0", prompt_index=i, sample_index=0)
             for i, (s, g) in enumerate(zip(samples, got))]
    batch = build_step_batch(prompts, rolls, scored, "token", 0)
    assert batch.token_mask.sum() == total - 4
    micro = micro_batches(batch, 8, pad_id=0)
    assert sum(float(m.loss_mask.sum()) for m in micro) == total - 4


def test_a_teacher_url_is_checked_for_its_model_and_key_before_scoring(teacher_server, monkeypatch):
    from megatron_opd.wire.process import start_server

    def spec(**teacher):
        return RoutingSpec.model_validate({"teachers": {"arithmetic": teacher}, "routes": {"arithmetic": "arithmetic"}})

    with TeacherSet.start(spec(urls=[teacher_server], model=str(TEACHER))) as teachers:  # the right model: accepted
        assert teachers.pools["arithmetic"].replicas[0].served_models() == [str(TEACHER)]
    wrong = REPO / "assets" / "tiny" / "original"
    with pytest.raises(TeacherError, match=rf"teacher 'arithmetic': {teacher_server} serves \['{TEACHER}'\], the "
                                           rf"recipe expects '{wrong}' \(teachers.teachers.arithmetic.model\)"):
        TeacherSet.start(spec(urls=[teacher_server], model=str(wrong)))

    keyed = start_server(TEACHER, role="teacher", api_key="the-right-key")
    try:
        monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "a-wrong-key")
        with pytest.raises(TeacherError, match=r"refused the API key \(HTTP 401\): check teachers.teachers.arithmetic.api_key_env "
                                               r"\(OPD_TEST_TEACHER_KEY\)"):
            TeacherSet.start(spec(urls=[keyed.url], model=str(TEACHER), api_key_env="OPD_TEST_TEACHER_KEY"))
        monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "the-right-key")
        with TeacherSet.start(spec(urls=[keyed.url], model=str(TEACHER), api_key_env="OPD_TEST_TEACHER_KEY")) as teachers:
            assert len(teachers.pools["arithmetic"].replicas) == 1
    finally:
        keyed.stop()

