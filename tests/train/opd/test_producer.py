"""The overlapped loop: which weights sample which batch (rollout.max_staleness), determinism, every
sample trained exactly once, stale samples never trained, and streaming scoring."""
import json

import pytest
import torch

from helpers import REPO, opd, read_metrics
from megatron_opd.data.chat import global_batch_indices
from megatron_opd.records import Generated, Produced, Prompt, SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.weight_push import push_in_process
from megatron_opd.train.opd.producer import RolloutProducer, StaleWeightsError
from megatron_opd.train.opd.step_maker import build_step_batch

STUDENT = REPO / "assets" / "tiny" / "student_init"
RECIPE = REPO / "recipes" / "tiny" / "opd_arith.yaml"


@pytest.fixture(scope="module")
def engine():
    return EmbeddedEngine(STUDENT)


def _producer(engine, first, end, staleness, tamper=None):
    prompts = [Prompt([1, 2, 3 + i], "arithmetic", row=i) for i in range(4)]

    def generate(step):
        rollouts = engine.generate([p.ids for p in prompts], SamplingParams(max_new_tokens=6, n=2, seed=step))
        return Generated(step, prompts, rollouts, 0.0)

    def finish(generated):
        batch = build_step_batch(generated.prompts, generated.rollouts, None, "token", 0)
        if tamper:
            tamper(batch)
        return Produced(generated.step, batch)

    return RolloutProducer(generate, finish, first, end, staleness)


def _run(engine, staleness, first, end, sync=True, tamper=None):
    """The trainer's side: the engine gets the first weights, then the producer starts; take each
    batch, then move the engine to the next weight version."""
    weights = list(engine.model.state_dict().items())
    push_in_process(engine, iter(weights), f"step-{first}")
    producer = _producer(engine, first, end, staleness, tamper)
    seen = []
    try:
        for step in range(first, end):
            produced = producer.get(step)
            seen.append((produced.batch.weight_versions.tolist(), produced.batch.tokens.tolist()))
            producer.before_sync(step + 1)
            if sync:
                push_in_process(engine, iter(weights), f"step-{step + 1}")
            producer.after_sync(step + 1)
    finally:
        producer.close()
    return seen


@pytest.mark.parametrize("staleness,first,expected", [(0, 0, [0, 1, 2, 3, 4]), (1, 0, [0, 0, 1, 2, 3]),
                                                      (2, 0, [0, 0, 0, 1, 2]), (1, 3, [3, 3])])
def test_each_batch_is_sampled_by_the_weights_its_bound_fixes(engine, staleness, first, expected):
    seen = _run(engine, staleness, first, first + len(expected))
    assert [set(v) for v, _ in seen] == [{e} for e in expected]  # batch j from step max(j - S, first)
    again = _run(engine, staleness, first, first + len(expected))
    assert again == seen  # the same samples, whatever the threads' timing


def test_an_engine_serving_old_weights_is_resampled_then_refused(engine):
    # the trainer moves on but the engine never receives the new weights (a failed sync)
    with pytest.raises(StaleWeightsError, match="serves weights step-0, older than step-1"):
        _run(engine, 1, 0, 4, sync=False)


def test_a_sample_older_than_the_bound_is_never_trained(engine):
    def age(batch):  # a batch that claims an older version than its bound allows
        batch.weight_versions[3] = -1

    with pytest.raises(StaleWeightsError, match="2 steps old"):
        _run(engine, 1, 1, 3, tamper=age)


SMALL = ["model.hf_path=assets/tiny/student_init", "parallel.tp=1", "parallel.pp=1", "train.prompts_per_step=4",
         "rollout.n=2", "train.micro_batch_size=4", "rollout.max_new_tokens=16", "train.steps=4", "train.save_interval=2",
         "eval.samples=4", "eval.max_new_tokens=16", "optim.lr=3.0e-4", "run.cpu_threads=1"]
OVERLAP = ["rollout.engine=embedded_server", "rollout.sync=distributed", "rollout.max_staleness=1"]


@pytest.mark.slow
def test_one_step_off_policy_run_is_deterministic_and_trains_every_sample_once(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        opd("run", str(RECIPE), *SMALL, *OVERLAP, f"run.output_dir={out}")
        runs.append(out)
    a, b = read_metrics(runs[0]), read_metrics(runs[1])
    keys = ("train/loss", "opd/reverse_kl", "rollout/response_length", "train/grad_norm")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert [r["rollout/staleness_1"] for r in a] == [0.0, 1.0, 1.0, 1.0]  # batch 1 from the start, the rest 1 behind
    assert all(r["opd/train_inference_mismatch"] > 0 for r in a[1:])  # the off-policy gap is measured
    from transformers import AutoTokenizer

    from megatron_opd.data.prompts import load_prompts

    cfg_rows = load_prompts([str(REPO / "assets/tiny/data/arithmetic/train.jsonl")], AutoTokenizer.from_pretrained(str(STUDENT)),
                            "messages", "domain", 64)[0]
    audit = [json.loads(line) for line in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in audit] == [1, 2, 3, 4]  # each step once
    for r in audit:
        drawn = global_batch_indices(len(cfg_rows), 1234, r["step"] - 1, 4)
        assert sorted(r["prompt_rows"]) == sorted(drawn * 2)  # every drawn prompt's 2 samples, none twice or lost
        assert set(r["weight_versions"]) == {max(r["step"] - 2, 0)}
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["teacher_counters"]["arithmetic"]["samples"] == 4 * 4 * 2  # each sample scored once


def test_streaming_scores_equal_whole_step_scores(tmp_path):
    """teachers.stream: a prompt's samples scored as soon as they are generated get the numbers the
    whole step scored at once gets (the same rollouts; the teacher's batches differ)."""
    from megatron_opd.config import load_recipe
    from megatron_opd.teachers.service import TeacherSet
    from megatron_opd.data.prompts import load_prompts
    from megatron_opd.train.opd.step_maker import StepMaker
    from transformers import AutoTokenizer

    cfg = load_recipe(RECIPE, SMALL + ["train.prompts_per_step=6", "rollout.n=3", "train.micro_batch_size=6"])
    tok = AutoTokenizer.from_pretrained(str(STUDENT))
    prompts = load_prompts(cfg.data.train, tok, "messages", "domain", 64)[0]
    from megatron_opd.train.opd.engine import RolloutEngine

    engine = RolloutEngine(EmbeddedEngine(STUDENT, weight_version="step-0"), tok.eos_token_id)
    with TeacherSet.start(cfg.teachers) as teachers:
        batches = []
        for stream in (True, False):
            cfg.teachers.stream = stream
            maker = StepMaker(cfg, prompts, engine, teachers, tok.eos_token_id, tok.decode)
            batches.append(maker.finish(maker.generate(0)).batch)
    streamed, whole = batches
    assert torch.equal(streamed.tokens, whole.tokens)
    assert torch.allclose(streamed.teacher_logprobs, whole.teacher_logprobs, atol=2e-5)
    assert torch.equal(streamed.topk.ids, whole.topk.ids)


@pytest.mark.slow
def test_data_parallel_ranks_train_their_own_shares(tmp_path):
    """DP=2 inside the loop: each rank receives its half of the step's samples as tensors and the
    step trains every completion token once over both shares (that DP layouts train exactly what
    one rank trains is ``tests/train/test_dp.py``)."""
    out = tmp_path / "dp2"
    opd("run", str(RECIPE), *SMALL, "parallel.dp=2", "train.micro_batch_size=2", "train.steps=1",
        "eval.world_dir=null", f"run.output_dir={out}")
    (record,) = read_metrics(out)
    samples = 4 * 2  # SMALL: 4 prompts x 2 samples
    assert record["train/tokens"] == pytest.approx(samples * record["rollout/response_length"])
    assert record["train/tokens"] > 0 and record["train/grad_norm"] > 0
