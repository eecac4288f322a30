"""A pool of rollout servers: a killed server's share is retried on the others exactly once."""
import threading
import time

import pytest
from helpers import REPO, start_rollout_server

from megatron_opd.data.chat import chat_ids
from megatron_opd.records import SamplingParams
from megatron_opd.wire.client import SGLangClient

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def _prompts(tokenizer, texts):
    return [chat_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts]


@pytest.mark.slow
def test_pool_retries_a_killed_servers_share_exactly_once():
    from transformers import AutoTokenizer

    from megatron_opd.rollout.rollout_pool import RolloutPool

    tok = AutoTokenizer.from_pretrained(TEACHER)
    servers = [start_rollout_server(TEACHER) for _ in range(2)]
    try:
        pool = RolloutPool([SGLangClient(url) for url, _ in servers])
        prompts = _prompts(tok, [f"add {1000 + 37 * i} + {2000 + 91 * i}" for i in range(48)])  # each server busy for well over the 0.5 s before the kill
        sampling = SamplingParams(temperature=1.0, max_new_tokens=64, n=2, seed=5)
        victim = servers[1][1]
        killer = threading.Timer(0.5, victim.kill)  # mid-batch: the server is busy generating
        killer.start()
        started = time.time()
        rollouts = pool.generate(prompts, sampling)
        killer.join()
        assert time.time() - started > 0.5, "the batch finished before the kill; it did not test a retry"
        assert pool.retries == 1 and pool.dead == {1}
        assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, k) for i in range(48) for k in range(2)]
        assert all(r.prompt_ids == prompts[r.prompt_index] and r.completion_ids for r in rollouts)
        assert pool.health() and pool.dead == {1}
        from megatron_opd.wire.failover import PoolError

        with pytest.raises(PoolError, match="token ids must be in"):  # a bad request is not a dead server
            pool.generate([[1, 10**6]], SamplingParams(max_new_tokens=2))
        assert pool.dead == {1} and pool.retries == 1
        again = pool.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=8))
        assert [r.prompt_index for r in again] == [0, 1]
    finally:
        for _, proc in servers:
            proc.kill()
            proc.wait(timeout=30)

