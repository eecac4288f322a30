"""A pool of teacher replicas: prompt groups stay together in a batch; a killed replica fails over, all dead stops."""
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import REPO

from megatron_opd.data.chat import chat_ids
from megatron_opd.records import Sample, SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.teachers.backends import SGLangScorer
from megatron_opd.teachers.scorer import TeacherError
from megatron_opd.teachers.teacher_pool import TeacherPool, prefix_batches
from megatron_opd.wire.process import ServerProcess

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


STUDENT = REPO / "assets" / "tiny" / "student_init"


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
    prompts = [chat_ids(tok, r["messages"][:1], add_generation_prompt=True) for r in rows]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, n=4, seed=3, temperature=1.0))
    return [Sample(r.prompt_ids + r.completion_ids, len(r.prompt_ids), "arithmetic") for r in outs if r.completion_ids]


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


def test_prefix_batches_keep_prompt_groups_together():
    seqs = [[1, 2, 3, 9], [1, 2, 3, 8], [5, 6, 7], [1, 2, 3, 7], [5, 6, 1]]
    batches = prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert [0, 1, 3] in batches and [2, 4] in batches
    assert all(len(b) <= 2 for b in prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=2))


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

