"""Teachers beyond "same prompt" (issue 19): a teacher shown a privileged context of the row (on-policy
self-distillation, the student's own starting weights as the teacher) and GKD's lambda mixing of the
rows' own responses into a step. Scores are checked against HF transformers on the exact ids; the
student's prompts are checked never to contain the context."""
import json

import pytest
import torch

from helpers import REPO
from megatron_opd.config import ConfigError, load_recipe
from megatron_opd.config.teachers import render_template, template_fields
from megatron_opd.data.chat import DataError
from megatron_opd.records import DATASET

STUDENT = REPO / "assets" / "tiny" / "student_init"
TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"
STAGE = REPO / "recipes" / "tiny" / "opsd_stage.yaml"
ARITH = str(REPO / "assets/tiny/data/arithmetic/train.jsonl")
HINT = "{prompt}\nhint: {response} (a={meta.a})"
SMALL = [f"model.hf_path={STUDENT}", f"data.train=[{ARITH}]", "train.prompts_per_step=8", "rollout.n=2",
         "train.micro_batch_size=8", "rollout.max_new_tokens=24", "rollout.engine=embedded", "rollout.sync=in_process",
         "rollout.max_staleness=0"]


def test_context_templates_name_row_fields():
    assert template_fields(HINT) == ["prompt", "response", "meta.a"]
    assert render_template(HINT, {"prompt": "add 1 + 2", "response": "3", "meta": {"a": 1}}) == "add 1 + 2\nhint: 3 (a=1)"
    assert render_template("{{literal}} {prompt}", {"prompt": "p"}) == "{literal} p"
    for bad, says in [("{answer}", "unknown field {answer}"), ("{meta}", "unknown field {meta}"),
                      ("{prompt!r}", r"\{prompt!r\}: conversions \(!r\) and format specs"),
                      ("{meta.a:>5}", r"\{meta.a:>5\}: conversions"), ("no field at all", "names no field"), ("{prompt", "brace")]:
        with pytest.raises(ValueError, match=says):
            template_fields(bad)
    with pytest.raises(KeyError, match="meta.b"):
        render_template("{meta.b}", {"meta": {"a": 1}})
    with pytest.raises(KeyError, match="response"):  # a prompt-only row has no reference
        render_template("{response}", {"prompt": "p", "response": None})


def test_recipe_errors_before_anything_starts():
    cfg = load_recipe(STAGE, SMALL)
    assert cfg.teachers.teachers["hinted"].model == STUDENT  # `self`: the student's starting weights
    with pytest.raises(ConfigError, match=r"teachers\.teachers\.hinted\.context.*unknown field \{answer\}"):
        load_recipe(STAGE, SMALL + ['teachers.teachers.hinted.context="{prompt} {answer}"'])
    with pytest.raises(ConfigError, match="the value is not YAML .* quote a string"):  # unquoted braces
        load_recipe(STAGE, SMALL + ["teachers.teachers.hinted.context={prompt} {answer}"])
    with pytest.raises(ConfigError, match="on_policy_fraction 0.5 .* needs a divergence loss"):
        load_recipe(STAGE, SMALL + ["rollout.on_policy_fraction=0.5", "loss.kind=sampled_token"])
    with pytest.raises(ConfigError, match="on_policy_fraction"):
        load_recipe(STAGE, SMALL + ["rollout.on_policy_fraction=1.5"])
    # a teacher with its own tokenizer: its top-k read through the shared vocabulary; not the student's token sets
    with pytest.raises(ConfigError, match=r"teachers \['hinted'\] have their own tokenizer .* student token sets"):
        load_recipe(STAGE, SMALL + ["teachers.teachers.hinted.cross_tokenizer=true", "loss.token_set=union",
                                    "teachers.stream=false"])
    cross = load_recipe(STAGE, SMALL + ["teachers.teachers.hinted.cross_tokenizer=true"])
    assert cross.teachers.teachers["hinted"].cross_tokenizer and cross.loss.kind != "sampled_token"
    with pytest.raises(ConfigError, match="cross_tokenizer: give the teacher's own tokenizer"):
        load_recipe(STAGE, SMALL + ["teachers.teachers.hinted.model=null", "teachers.teachers.hinted.urls=[http://127.0.0.1:1]",
                                    "teachers.teachers.hinted.cross_tokenizer=true", "loss.kind=sampled_token"])


def test_a_row_without_the_templates_field_stops_the_run_naming_both(tmp_path):
    from transformers import AutoTokenizer

    from megatron_opd.data.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(str(STUDENT))
    with pytest.raises(DataError, match=r"teachers\.teachers\.hinted\.context names \{meta\.c\}, which .* row 0"):
        load_prompts([ARITH], tok, "messages", "domain", 64, {"hinted": "{prompt} {meta.c}"})
    rows = tmp_path / "prompt_only.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "add 1 + 2"}]}\n')
    with pytest.raises(DataError, match=r"row 0 does not have"):
        load_prompts([str(rows)], tok, "messages", "domain", 64, {"hinted": "{prompt} {response}"})
    prompts, skipped, _ = load_prompts([str(rows), ARITH], tok, "messages", "domain", 64, need_reference=True)
    assert skipped == {"no assistant turn (rollout.on_policy_fraction < 1 trains on the rows' own responses)": 1}
    assert len(prompts) == 2000


def test_rows_over_a_teachers_context_window_are_counted_and_skipped_or_stop_the_run(tmp_path):
    """The hinted prompt (the context template over the row) is checked against the teacher's window less the
    completion budget before the run starts: rows over it counted and skipped, or the first named (a setting)."""
    from transformers import AutoTokenizer

    from megatron_opd.data.prompts import load_prompts
    from megatron_opd.teachers.service import context_windows

    tok = AutoTokenizer.from_pretrained(str(STUDENT))
    rows = tmp_path / "rows.jsonl"
    short, long = "add 1 + 2", "add " + " + ".join(["12345"] * 60)  # ~480 characters: its hinted prompt ~1,300 tokens
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "3"}],
                                        "meta": {"a": 1}}) + "\n" for q in [short, long, short]))
    cfg = load_recipe(STAGE, SMALL)
    window = context_windows(cfg.teachers.teachers, STUDENT)["hinted"]  # `self`: the student's max_position_embeddings
    assert window == json.loads((STUDENT / "config.json").read_text())["max_position_embeddings"]
    contexts = {"hinted": "{prompt}\n" + "hint: {response} " * 40 + "{prompt}"}
    room = {"hinted": 600}  # the short rows' hinted prompts are ~360 tokens (a character tokenizer)
    prompts, skipped, problems = load_prompts([str(rows)], tok, "messages", "domain", 512, contexts, teacher_room=room)
    assert len(prompts) == 2 and [p.row for p in prompts] == [0, 1]
    assert skipped == {"over the context window of teacher 'hinted'": 1}
    assert "row 1: over the context window of teacher 'hinted': its prompt of" in problems[0]
    assert all(len(p.contexts["hinted"]) <= 600 for p in prompts)
    with pytest.raises(DataError, match=r"row 1: over the context window of teacher 'hinted'.*data.over_teacher_window: error"):
        load_prompts([str(rows)], tok, "messages", "domain", 512, contexts, teacher_room=room, over_teacher_window="error")


def _hf_logprobs(model, context: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    return logp[len(context) - 1:-1].gather(-1, ids[0, len(context):, None]).squeeze(-1)


@pytest.fixture(scope="module")
def world():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.train.opd.engine import RolloutEngine

    tok = AutoTokenizer.from_pretrained(str(STUDENT))
    engine = RolloutEngine(EmbeddedEngine(STUDENT, weight_version="step-0"), tok.eos_token_id)
    return tok, engine, AutoModelForCausalLM.from_pretrained(str(TEACHER)).eval()


def _maker(cfg, tok, engine, teachers):
    from megatron_opd.data.prompts import load_prompts
    from megatron_opd.train.opd.step_maker import StepMaker

    contexts = {n: t.context for n, t in cfg.teachers.teachers.items() if t.context}
    prompts = load_prompts(cfg.data.train, tok, "messages", "domain", 64, contexts, cfg.rollout.on_policy_fraction < 1)[0]
    return StepMaker(cfg, prompts, engine, teachers, tok.eos_token_id, tok.decode), prompts


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.slow
def test_a_context_teacher_scores_the_students_tokens_after_its_own_prompt(world, stream):
    """The teacher (a real embedded server) scores each completion after the row's hinted prompt:
    its log-probs equal HF's on [hinted prompt + the student's completion], not on the student's
    prompt; the rollout engine was given, and the trainer trains on, the hint-free prompts only."""
    from megatron_opd.teachers.service import TeacherSet

    tok, engine, hf = world
    cfg = load_recipe(STAGE, SMALL + [f"teachers.teachers.hinted.model={TEACHER}", f"teachers.stream={str(stream).lower()}",
                                      f"teachers.teachers.hinted.context={json.dumps(HINT)}"])
    with TeacherSet.start(cfg.teachers, student_dir=STUDENT) as teachers:
        maker, prompts = _maker(cfg, tok, engine, teachers)
        generated = maker.generate(0)
        produced = maker.finish(generated)
    batch = produced.batch
    assert len(generated.rollouts) == 16
    offset = 0
    for r in generated.rollouts:
        prompt = generated.prompts[r.prompt_index]
        text = tok.decode(r.prompt_ids)
        assert r.prompt_ids == prompt.ids and "hint:" not in text  # the leakage guard: the student never sees it
        assert tok.decode(prompt.reference, skip_special_tokens=True) not in text
        assert "hint: " + tok.decode(prompt.reference, skip_special_tokens=True) in tok.decode(prompt.contexts["hinted"])
        n = len(r.completion_ids)
        scored = batch.teacher_logprobs[offset:offset + n]
        assert torch.allclose(scored, _hf_logprobs(hf, prompt.contexts["hinted"], r.completion_ids), atol=1e-4)
        if n > 2:  # and the context matters: the same tokens after the student's prompt score differently
            assert not torch.allclose(scored, _hf_logprobs(hf, prompt.ids, r.completion_ids), atol=1e-3)
        offset += n
    trained = batch.tokens.tolist()
    for i, length in enumerate(batch.sample_lens.tolist()):  # what the trainer trains on: student prompt + completion
        seq, trained = trained[:length], trained[length:]
        assert "hint:" not in tok.decode(seq)


def test_gkd_lambda_trains_on_the_expected_mix(world):
    """rollout.on_policy_fraction=0.5: of each step's 8 prompts exactly 4 are sampled by the student
    (8 samples); the other 4 contribute their own responses (n = 2 each), scored by the teacher like
    rollouts (equal to HF's scores of the reference) and trained without an IS correction."""
    from megatron_opd.teachers.service import TeacherSet

    tok, engine, hf = world
    cfg = load_recipe(STAGE, SMALL + [f"teachers.teachers.hinted.model={TEACHER}", "teachers.teachers.hinted.context=null",
                                      "rollout.on_policy_fraction=0.5"])
    with TeacherSet.start(cfg.teachers, student_dir=STUDENT) as teachers:
        maker, prompts = _maker(cfg, tok, engine, teachers)
        seen = []
        for step in range(3):
            generated = maker.generate(step)
            produced = maker.finish(generated)
            seen.append({tuple(r.prompt_ids) for r in generated.rollouts if r.finish_reason == DATASET})
            mixed = [r for r in generated.rollouts if r.finish_reason == DATASET]
            assert len(generated.rollouts) == 16 and len(mixed) == 8
            assert produced.metrics["rollout/dataset_samples"] == 8 and produced.metrics["rollout/on_policy_samples"] == 8
            assert int(produced.batch.on_policy.sum()) == 8
            assert sorted(produced.batch.prompt_rows.tolist()) == sorted(p.row for p in generated.prompts for _ in range(2))
            offset = 0
            for r in generated.rollouts:
                n = len(r.completion_ids)
                if r.finish_reason == DATASET:
                    prompt = generated.prompts[r.prompt_index]
                    assert r.completion_ids == prompt.reference and r.completion_ids[-1] == tok.eos_token_id
                    assert torch.allclose(produced.batch.teacher_logprobs[offset:offset + n],
                                          _hf_logprobs(hf, prompt.ids, r.completion_ids), atol=1e-4)
                offset += n
    assert len(seen[0] | seen[1] | seen[2]) > 4  # which prompts are mixed is drawn per step


@pytest.mark.slow
def test_opsd_with_gkd_mixing_runs_the_loop_at_tp2(tmp_path):
    """The whole loop, TP2 over gloo: the student's own starting weights behind a hinted context as
    the only teacher, half of every step's prompts on the rows' own responses. Counted per step: 8
    sampled and 8 dataset samples, every completion token of both trained once, each step's 16
    samples from its 8 drawn prompts."""
    import json

    from helpers import opd, read_metrics
    from megatron_opd.data.chat import global_batch_indices

    out = tmp_path / "opsd"
    opd("run", str(STAGE), *SMALL, "parallel.tp=2", "rollout.on_policy_fraction=0.5", "train.steps=2",
        "train.save_interval=0", "eval.world_dir=null", "run.cpu_threads=1", f"run.output_dir={out}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/dataset_samples"] == 8 and r["rollout/on_policy_samples"] == 8
        assert r["train/tokens"] > 8 * r["rollout/response_length"]  # the sampled ones and the mixed-in ones
        # the trainer's KL estimate and mismatch are over the sampled tokens only: equal to the scorer's
        # per-teacher figure (which leaves the rows' own responses out), not diluted by the mixed-in ones
        assert r["opd/reverse_kl"] == pytest.approx(r["teacher/hinted/reverse_kl"], rel=1e-3, abs=1e-4)
        assert r["opd/train_inference_mismatch"] < 1e-3
    audit = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for a in audit:
        drawn = global_batch_indices(2000, 1234, a["step"] - 1, 8)
        assert sorted(a["prompt_rows"]) == sorted(drawn * 2)
    assert json.loads((out / "results.json").read_text())["teacher_counters"]["hinted"]["samples"] == 2 * 16


@pytest.mark.slow
def test_a_live_teacher_is_the_student_itself_in_the_rollout_servers(tmp_path):
    """model: live — the rollout server (holding the trainer's synced weights) scores: without a
    context its log-probs are the student's own, so the reverse KL the trainer measures is 0 at every
    step, after each weight sync too; with the hint in its context it is not."""
    from helpers import opd, read_metrics

    live = SMALL[:-3] + ["rollout.engine=embedded_server", "rollout.sync=distributed", "rollout.max_staleness=0",
                         "teachers.teachers.hinted.model=live", "train.steps=2", "train.save_interval=0",
                         "eval.world_dir=null", "run.cpu_threads=1"]
    with pytest.raises(ConfigError, match="model 'live' is scored by the rollout servers"):
        load_recipe(STAGE, SMALL + ["teachers.teachers.hinted.model=live"])  # the embedded engine has no server
    for context, out in (("null", tmp_path / "plain"), (json.dumps(HINT), tmp_path / "hinted")):
        opd("run", str(STAGE), *live, f"teachers.teachers.hinted.context={context}", f"run.output_dir={out}")
    plain, hinted = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "hinted")
    assert [abs(r["opd/reverse_kl"]) < 1e-5 for r in plain] == [True, True]
    assert all(abs(r["opd/reverse_kl"]) > 1e-3 for r in hinted)  # a random student barely reads the hint, but does
