"""Recipes load and validate; a real (shrunk) cascade runs every stage as its own process, evaluates
each output, picks teachers by measured eval, writes results.json + report.md with plots, and a
re-run keeps finished stages."""
import json
from pathlib import Path

import pytest

from helpers import REPO, opd
from megatron_opd.config import CascadeConfig, ConfigError, load_recipe

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.kind in ("sft", "opd", "grpo", "cascade")


def test_bad_cascade_names_the_stage_and_key():
    cascade = REPO / "recipes" / "tiny" / "cascade.yaml"
    cfg = load_recipe(cascade)
    assert isinstance(cfg, CascadeConfig) and [s.name for s in cfg.stages] == ["sft", "opd", "mopd"]
    with pytest.raises(ConfigError, match=r"(?s)stages.1 \(opd\): opd_general.yaml: .*did you mean 'prompts_per_step'"):
        load_recipe(cascade, ["opd.train.prompt_per_step=3"])
    with pytest.raises(ConfigError, match=r"(?s)stages.2 \(mopd\).*loss.top_k"):
        load_recipe(cascade, ["mopd.loss.top_k=0"])
    # stages.<key> reaches every training stage; a value the SFT stage rejects names that stage
    with pytest.raises(ConfigError, match=r"(?s)stages.0 \(sft\).*train.steps"):
        load_recipe(cascade, ["stages.train.steps=0"])
    with pytest.raises(ConfigError, match="start"):
        load_recipe(cascade, ["strat=x"])


def test_cascade_references_are_checked(tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        f"kind: cascade\nstart: {REPO}/assets/tiny/student_init\neval: {{world_dir: {REPO}/assets/tiny}}\n"
        "stages:\n"
        f"  - {{name: a, recipe: {REPO}/recipes/tiny/sft.yaml}}\n"
        f"  - {{name: b, recipe: {REPO}/recipes/tiny/mopd.yaml, teachers_from: pick}}\n"
        "  - {name: pick, select: {candidates: [a], domains: [format]}}\n")
    with pytest.raises(ConfigError, match=r"stages.1 \(b\): refers to \['pick'\], which are not earlier stages"):
        load_recipe(recipe)
    recipe.write_text(
        f"kind: cascade\nstart: {REPO}/assets/tiny/student_init\neval: {{world_dir: {REPO}/assets/tiny}}\n"
        "stages:\n"
        f"  - {{name: a, recipe: {REPO}/recipes/tiny/sft.yaml}}\n"
        "  - {name: pick, select: {candidates: [a], domains: [format]}}\n"
        f"  - {{name: b, recipe: {REPO}/recipes/tiny/sft.yaml, init: pick}}\n")
    with pytest.raises(ConfigError, match=r"init 'pick' is a select stage; use 'select:pick/<domain>'"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("init: pick", "init: select:pick/format"))
    assert load_recipe(recipe).stages[2].init == "select:pick/format"


SHRINK = [
    "stages.train.steps=2", "stages.train.save_interval=1", "stages.train.hf_snapshots=true",
    "sft.train.global_batch_size=8", "sft.train.micro_batch_size=8", "sft.data.eval_max_rows=8",
    "stages.parallel.tp=1", "stages.parallel.pp=1",
    "opd.train.prompts_per_step=4", "opd.train.micro_batch_size=4", "opd.rollout.max_new_tokens=16",
    "mopd.train.prompts_per_step=4", "mopd.train.micro_batch_size=4", "mopd.rollout.max_new_tokens=16",
    "eval.samples=3", "eval.max_new_tokens=16",
    # the engine in the trainer (no rollout server to start per stage: what is tested here is the chain)
    *[f"{stage}.rollout.{key}" for stage in ("opd", "mopd") for key in ("engine=embedded", "sync=in_process")],
]


@pytest.mark.slow
def test_cascade_runs_stages_evaluates_picks_and_reports(tmp_path):
    out = tmp_path / "cascade"
    recipe = tmp_path / "cascade_pick.yaml"
    # the tiny cascade plus a select stage: MOPD's teachers are the best measured checkpoints
    raw = (REPO / "recipes" / "tiny" / "cascade.yaml").read_text().replace("recipe: ", f"recipe: {REPO}/recipes/tiny/")
    raw = raw.replace("start: assets", f"start: {REPO}/assets").replace("world_dir: assets", f"world_dir: {REPO}/assets")
    raw += ("  - name: pick\n    select: {candidates: [opd, mopd], domains: [arithmetic, format], offset: 100, samples: 3}\n"
            f"  - name: consolidate\n    recipe: {REPO}/recipes/tiny/mopd.yaml\n    teachers_from: pick\n")
    recipe.write_text(raw)
    shrink = SHRINK + ["consolidate.rollout.engine=embedded", "consolidate.rollout.sync=in_process",
                       "consolidate.train.prompts_per_step=4", "consolidate.train.micro_batch_size=8",
                       "consolidate.rollout.max_new_tokens=16", f"run.output_dir={out}"]
    # the first part as one job of a Slurm chain would run it: through the opd stage, no results yet
    bad = opd("run", str(recipe), *shrink, "--through", "nope", check=False)
    assert bad.returncode == 2 and "--through 'nope': not a stage of this cascade" in bad.stderr
    part = opd("run", str(recipe), *shrink, "--through", "opd")
    assert "[cascade] stopped after stage opd (--through)" in part.stdout and not (out / "results.json").exists()
    assert set(json.loads((out / "cascade_state.json").read_text())) == {"start", "sft", "opd"}
    run = opd("run", str(recipe), *shrink)
    assert run.stdout.count("done in an earlier run, kept") == 2  # sft and opd, from the first part
    results = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in results["stages"]]
    assert names == ["sft", "opd", "mopd", "pick", "consolidate"]
    for stage in results["stages"]:
        if stage["kind"] != "select":
            assert set(stage["eval"]) == {"arithmetic", "strings", "format"}
            assert (Path(stage["hf"]) / "model.safetensors").is_file()
    by_name = {s["name"]: s for s in results["stages"]}
    # each stage starts from the previous training stage's output
    assert by_name["opd"]["init"] == by_name["sft"]["hf"] and by_name["mopd"]["init"] == by_name["opd"]["hf"]
    assert by_name["consolidate"]["init"] == by_name["mopd"]["hf"]
    picks = by_name["pick"]["picks"]
    for domain, pick in picks.items():
        # candidates: each stage's input, snapshots and output; the pick is the arg-max of the measured scores
        # sft/hf (opd's input), opd step-1, step-2, opd/hf (= mopd's input, once), mopd step-1, step-2, mopd/hf
        assert len(pick["scores"]) == 7 and pick["score"] == max(pick["scores"].values())
        assert pick["scores"][pick["path"]] == pick["score"]
    stage_cfg = (out / "consolidate" / "config.yaml").read_text()
    assert picks["arithmetic"]["path"] in stage_cfg and picks["format"]["path"] in stage_cfg
    report = (out / "report.md").read_text()
    assert "| start |" in report and "| consolidate |" in report and "Selection `pick`" in report
    # the wall time is this invocation's; the stages kept from the first part count in the stages' total
    total = sum(s["wall_s"] for s in results["stages"])
    assert by_name["sft"]["wall_s"] > 0 and by_name["opd"]["wall_s"] > 0  # measured in the first part, kept
    assert (f"s in this invocation (sft, opd kept from an earlier one; the stages' own wall times: {total:.0f} s in all)"
            in report)
    assert "`opd/step-000001`" in report and "`mopd/step-000002`" in report  # snapshots named by their stage
    # the verdict on "every domain rises at every stage" follows the measured tables
    greedy = {s["name"]: {d: r["accuracy"] for d, r in s["eval"].items()} for s in results["stages"] if s.get("eval")}
    order = ["sft", "opd", "mopd", "consolidate"]
    before = {"sft": {d: r["accuracy"] for d, r in results["start_eval"].items()}, **{b: greedy[a] for a, b in zip(order, order[1:])}}
    falls = [(stage, d) for stage in order for d in greedy[stage] if greedy[stage][d] <= before[stage][d]]
    assert f"Every domain rises at every stage: **{'no' if falls else 'yes'}**" in report
    for stage, d in falls:
        assert f"{d} in {stage} (" in report
    for png in ("accuracy_by_stage.png", "reverse_kl.png", "response_length.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "[cascade] after stage mopd" in run.stdout and "[cascade] Every domain rises at every stage: " in run.stdout
    # the goal against each domain's specialist: the final student's accuracy over the teacher's, measured here
    goal = results["teacher_goal"]
    assert goal["student"] == "consolidate" and [r["domain"] for r in goal["rows"]] == ["arithmetic", "strings", "format"]
    for r in goal["rows"]:
        assert r["student_accuracy"] == greedy["consolidate"][r["domain"]] and 0 <= r["teacher_accuracy"] <= 1
        assert r["met"] == (r["student_accuracy"] >= 0.9 * r["teacher_accuracy"])
    verdict = f"Final student (consolidate) >= 90% of each domain's teacher, held-out greedy: **{'met' if goal['met'] else 'missed'}**"
    assert verdict in report and verdict.replace("**", "") in run.stdout
    assert (out / "opd" / "report.md").is_file()  # every stage's own run directory has its report too

    again = opd("run", str(recipe), *shrink)  # finished stages are kept, not re-run
    assert again.stdout.count("done in an earlier run, kept") == 5
    assert json.loads((out / "results.json").read_text())["kept_from_earlier_run"] == names
    # a finished stage whose inputs changed is never reported as if it were current
    stale = opd("run", str(recipe), *shrink, "opd.optim.lr=0.0005", check=False)
    assert stale.returncode == 2 and "[cascade] stage sft: done in an earlier run, kept" in stale.stdout
    assert "stage 'opd' finished in an earlier run" in stale.stderr and "config optim.lr: 0.003 -> 0.0005" in stale.stderr


def test_stage_inputs_name_what_changed(tmp_path, monkeypatch):
    from megatron_opd.pipeline.inputs import input_changes, stage_inputs

    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("a\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_bytes(b"12345")
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "ckpt" / "x").write_text("written by the stage itself")
    config = {"data": {"train": [str(tmp_path / "data.jsonl")]}, "model": {"hf_path": "model"},
              "run": {"output_dir": str(tmp_path / "run")}, "optim": {"lr": 0.001}, "here": "."}
    before = stage_inputs(config, skip=tmp_path / "run")
    assert set(before["files"]) == {str(tmp_path / "data.jsonl"), str(tmp_path / "model" / "w.safetensors")}
    assert before["config"]["data.train.0"] == str(tmp_path / "data.jsonl") and before["config"]["optim.lr"] == 0.001
    assert input_changes(before, stage_inputs(config, skip=tmp_path / "run")) == []
    (tmp_path / "run" / "ckpt" / "x").write_text("the stage's own output is not an input")
    assert input_changes(before, stage_inputs(config, skip=tmp_path / "run")) == []

    (tmp_path / "data.jsonl").write_text("b, rebuilt\n")
    (tmp_path / "model" / "extra.json").write_text("{}")
    config["optim"]["lr"] = 0.002
    assert input_changes(before, stage_inputs(config, skip=tmp_path / "run")) == [
        "config optim.lr: 0.001 -> 0.002",
        f"file {tmp_path / 'data.jsonl'}: changed",
        f"file {tmp_path / 'model' / 'extra.json'}: new",
    ]
    assert input_changes(None, before) == ["no record of its inputs (written by an older version)"]


@pytest.mark.parametrize("expect_rises", [True, False])
def test_rises_verdict_only_where_the_cascade_expects_it(tmp_path, expect_rises):
    from megatron_opd.pipeline.report import write_cascade_report

    def scores(acc):
        return {"arithmetic": {"accuracy": acc, "format_score": acc, "n": 10, "sampled_accuracy": acc, "sampled_format_score": acc}}

    # a regression built to fall (recovery's mid-training), then its recovery
    stages = [{"name": "midtrain", "kind": "sft", "dir": str(tmp_path / "m"), "hf": "m/hf", "init": "start", "wall_s": 1.0, "eval": scores(0.2)},
              {"name": "recover", "kind": "sft", "dir": str(tmp_path / "r"), "hf": "r/hf", "init": "m/hf", "wall_s": 1.0, "eval": scores(0.9)}]
    results = {"name": "t", "recipe": "t.yaml", "eval_samples": 10, "start_eval": scores(0.8), "stages": stages,
               "rises": {"midtrain": {"arithmetic": -0.6}, "recover": {"arithmetic": 0.7}},
               "expect_rises": expect_rises, "wall_time_s": 2.0}
    report = write_cascade_report(tmp_path, results).read_text()
    assert "midtrain: arithmetic -0.600; recover: arithmetic +0.700" in report  # the deltas are always shown
    verdict = "Every domain rises at every stage: **no** — not rising: arithmetic in midtrain (-0.600)."
    assert (verdict in report) is expect_rises
    assert ("Every domain rises" in report) is expect_rises


def test_a_domain_held_at_the_ceiling_counts_as_held_not_as_a_fall():
    from megatron_opd.pipeline.report import rises_verdict

    rises = {"opd": {"strings": 0.4, "format": 0.3}, "mopd": {"strings": 0.0, "format": 0.0}}
    finals = {"opd": {"strings": 1.0, "format": 0.9}, "mopd": {"strings": 1.0, "format": 0.9}}
    # strings stayed at 1.000 (nowhere to rise); format stayed at 0.9: that is not a rise
    assert rises_verdict(rises, finals) == ("Every domain rises at every stage: no — not rising: format in mopd (+0.000)."
                                            " (Held at 1.000, nowhere to rise: strings in mopd.)")
    finals["mopd"]["format"] = finals["opd"]["format"] = 1.0
    assert rises_verdict(rises, finals).startswith("Every domain rises at every stage: yes.")
