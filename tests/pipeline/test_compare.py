"""The methods comparison at an equal token budget: the pure choices (tokens per checkpoint, the
checkpoint at the budget, tokens to reach an accuracy, goals) against hand-computed values, recipe
validation, and a real shrunk comparison (OPD, continued SFT, GRPO stages as processes) whose
numbers are checked against the runs' own metrics and an independent evaluation."""
import json

import pytest

from helpers import REPO, opd
from megatron_opd.config import ConfigError, load_recipe
from megatron_opd.pipeline.compare import (at_budget, comparison_goals, cumulative_tokens, specialist_rows,
                                           stage_checkpoints, tokens_to_reach)


def test_cumulative_tokens_sums_every_step_and_a_resume_wins():
    rows = [{"step": 1, "train/tokens": 10}, {"step": 2, "train/tokens": 12}, {"step": 3, "train/tokens": 99},
            {"step": 3, "train/tokens": 7}, {"step": 2, "eval/loss": 1.0}]  # step 3 re-logged after a resume
    assert cumulative_tokens(rows, 3, "a") == {0: 0.0, 1: 10.0, 2: 22.0, 3: 29.0}
    with pytest.raises(ValueError, match=r"stage 'a' logged train/tokens at 3 of 4 steps \(first missing: step 4\).*log_interval=1"):
        cumulative_tokens(rows, 4, "a")


def test_stage_checkpoints_budget_and_reach(tmp_path):
    for step in (2, 4):
        (tmp_path / "snapshots" / f"step-{step:06d}").mkdir(parents=True)
    tokens = {0: 0.0, 1: 5.0, 2: 10.0, 3: 15.0, 4: 20.0, 5: 25.0}
    points = stage_checkpoints(tmp_path, "init", 5, tokens)
    assert [(p.step, p.tokens) for p in points] == [(0, 0.0), (2, 10.0), (4, 20.0), (5, 25.0)]
    assert points[0].path == "init" and points[-1].path == str(tmp_path / "hf")
    assert points[1].path == str(tmp_path / "snapshots" / "step-000002")
    assert at_budget(points, 24.0).step == 4 and at_budget(points, 25.0).step == 5 and at_budget(points, 3.0).step == 0
    curve = [(20.0, 0.5), (0.0, 0.1), (10.0, 0.3)]
    assert tokens_to_reach(curve, 0.3) == 10.0 and tokens_to_reach(curve, 0.1) == 0.0
    assert tokens_to_reach(curve, 0.6) is None


def test_comparison_goals_against_hand_numbers():
    methods = {
        "opd": {"accuracy": 0.95, "tokens": 1000.0, "curve": [(0.0, 0.0), (100.0, 0.2), (500.0, 0.95)]},
        "sft": {"accuracy": 0.97, "tokens": 990.0, "curve": []},
        "grpo": {"accuracy": 0.2, "tokens": 1000.0, "curve": []},
    }
    goals = {g["goal"]: g for g in comparison_goals(methods, "opd", "grpo", 1 / 9, 1.0, 0.9)}
    assert goals["opd >= 90% of the teacher's accuracy"]["met"]  # 0.95 >= 0.9
    assert not goals["opd above sft at equal tokens"]["met"]  # 0.95 < 0.97: reported, not hidden
    assert goals["opd above grpo at equal tokens"]["met"]
    reach = goals["opd reaches grpo's final accuracy with <= 0.111 of its tokens"]
    assert reach["met"] and "after 100 tokens (0.100 of them)" in reach["measured"]  # 100 / 1000
    methods["opd"]["curve"] = [(0.0, 0.0), (200.0, 0.2)]
    reach = comparison_goals(methods, "opd", "grpo", 1 / 9, None, 0.9)[-1]
    assert not reach["met"] and "(0.200 of them)" in reach["measured"]


def test_focus_never_wins_by_more_tokens_and_a_vacuous_reach_is_not_met():
    methods = {
        # OPD is ahead at its budget checkpoint (1000 tokens) but behind at SFT's 600 tokens
        "opd": {"accuracy": 0.9, "tokens": 1000.0, "curve": [(0.0, 0.1), (500.0, 0.4), (1000.0, 0.9)]},
        "sft": {"accuracy": 0.5, "tokens": 600.0, "curve": []},
        "grpo": {"accuracy": 0.1, "tokens": 1000.0, "curve": []},  # no better than the start
    }
    goals = {g["goal"]: g for g in comparison_goals(methods, "opd", "grpo", 1 / 9, None, 0.9)}
    above = goals["opd above sft at equal tokens"]
    assert not above["met"] and "opd 0.400 after 500 tokens vs sft 0.500 after 600" in above["measured"]
    reach = goals["opd reaches grpo's final accuracy with <= 0.111 of its tokens"]
    assert reach["met"] is None and reach["measured"].startswith("n/a")


def test_report_sections_have_consistent_columns():
    from megatron_opd.pipeline.report import comparison_section, specialists_section

    cmp = {"name": "c", "domain": "arithmetic", "token_budget": 100.0, "choice_rows": "100..199", "rows": "0..99",
           "teacher": "t", "teacher_accuracy": 1.0,
           "methods": {m: {"pick": f"{m}_a", "tokens": 90.0, "accuracy": 0.5, "curve": [(0.0, 0.0), [90.0, 0.5]],
                           "grid": {f"{m}_a": {"choice_accuracy": 0.4, "checkpoint": {"tokens": 90.0}}}}
                       for m in ("opd", "sft")},
           "goals": [{"goal": "g1", "met": True, "measured": "x"}, {"goal": "g2", "met": None, "measured": "n/a: y"}]}
    seq = {"consolidated": "mopd", "sequential": "seq", "margin": 0.02,
           "rows": [{"domain": "a", "specialist": "sa", "specialist_accuracy": 0.5, "consolidated_accuracy": 0.4,
                     "sequential_accuracy": 0.1, "gap": -0.1, "met": False}]}
    for lines in (comparison_section(cmp), specialists_section(seq), specialists_section({**seq, "sequential": None})):
        tables: list[list[str]] = []
        for line in lines:  # consecutive "|" lines form one table: every row has the header's cells
            if line.startswith("|"):
                if not tables or not tables[-1]:
                    tables.append([])
                tables[-1].append(line)
            elif tables and tables[-1]:
                tables.append([])
        for table in filter(None, tables):
            assert len({row.count("|") for row in table}) == 1, table
    text = "\n".join(comparison_section(cmp))
    assert "| g2 | n/a | n/a: y |" in text and "90 (90%)" in text


def test_specialist_rows_against_hand_numbers():
    def table(**acc):
        return {d: {"accuracy": a} for d, a in acc.items()}

    evals = {"mopd": table(a=0.50, b=0.30), "sa": table(a=0.51, b=0.0), "sb": table(a=0.0, b=0.40),
             "seq": table(a=0.10, b=0.35)}
    rows = {r["domain"]: r for r in specialist_rows(evals, "mopd", {"a": "sa", "b": "sb"}, "seq", 0.02)}
    assert rows["a"]["met"] and rows["a"]["gap"] == pytest.approx(-0.01) and rows["a"]["sequential_accuracy"] == 0.10
    assert not rows["b"]["met"] and rows["b"]["gap"] == pytest.approx(-0.10)
    assert specialist_rows(evals, "mopd", {"a": "sa"}, None, 0.0)[0]["sequential_accuracy"] is None


def test_compare_recipes_fail_at_load_not_after_training(tmp_path):
    recipe = REPO / "recipes" / "tiny" / "compare_methods.yaml"
    cfg = load_recipe(recipe, ["methods.compare.token_budget=5000"])  # edits the measuring stage's own spec
    assert cfg.stages[-1].compare.token_budget == 5000
    with pytest.raises(ConfigError, match=r"stages.3 \(sft_lr3e-3\): compared by 'methods', so it needs "
                                          r"train.log_interval=1.*\(has 10, true, 20\)"):
        load_recipe(recipe, ["sft_lr3e-3.train.log_interval=10"])
    with pytest.raises(ConfigError, match=r"offset 50 overlaps the reported rows 0..99"):
        load_recipe(recipe, ["methods.compare.offset=50"])
    with pytest.raises(ConfigError, match=r"reach: 'opd' is the focus method"):
        load_recipe(recipe, ["methods.compare.reach=opd"])
    with pytest.raises(ConfigError, match=r"\['opd_lr3e-3'\] listed more than once"):
        load_recipe(recipe, ["methods.compare.methods.sft=[opd_lr3e-3]"])
    with pytest.raises(ConfigError, match=r"\['overrides'\] only apply to training stages"):
        load_recipe(recipe, ["methods.overrides=[a=1]"])


BAD_MEASURING_STAGES = [  # (the stage line after stages a (sft) and pick (select), the error it must raise)
    ("{name: cmp, compare: {domain: arithmetic, methods: {opd: [a], grpo: [pick]}}}",
     r"stages.2 \(cmp\): compare methods list \['pick'\], which are not training stages"),
    ("{name: cmp, compare: {domain: arithmetic, methods: {opd: [a], sft: [a]}}}",
     r"reach: 'grpo' is not one of methods \['opd', 'sft'\]"),
    ("{name: cmp, compare: {domain: arithmetic, methods: {opd: [a], grpo: [b]}}}",
     r"refers to \['b'\], which are not earlier stages"),
    ("{name: s, specialists: {consolidated: a, specialists: {format: pick}}}",
     r"stages.2 \(s\): specialists list \['pick'\], which are not training stages"),
    ("{name: s, specialists: {consolidated: a, specialists: {strings: a}}}",
     r"specialists for \['strings'\], which eval.domains does not evaluate"),
]


@pytest.mark.parametrize("stage,error", BAD_MEASURING_STAGES)
def test_compare_stage_references_are_checked(tmp_path, stage, error):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"kind: cascade\nstart: {REPO}/assets/tiny/student_init\n"
                      f"eval: {{world_dir: {REPO}/assets/tiny, domains: [arithmetic, format]}}\n"
                      f"stages:\n  - {{name: a, recipe: {REPO}/recipes/tiny/sft.yaml}}\n"
                      f"  - {{name: pick, select: {{candidates: [a], domains: [format]}}}}\n  - {stage}\n")
    with pytest.raises(ConfigError, match=error):
        load_recipe(recipe)


@pytest.mark.slow
def test_real_comparison_at_equal_tokens(tmp_path):
    out = tmp_path / "cmp"
    recipe = tmp_path / "compare.yaml"
    tiny = f"{REPO}/recipes/tiny"
    snap = "[parallel.tp=1, parallel.pp=1, train.steps=3, train.save_interval=1, train.hf_snapshots=true, train.log_interval=1]"
    recipe.write_text(
        f"kind: cascade\nrun: {{output_dir: {out}}}\nstart: {REPO}/assets/tiny/student_init\n"
        f"eval: {{world_dir: {REPO}/assets/tiny, domains: [arithmetic], samples: 3, max_new_tokens: 16}}\n"
        "stages:\n"
        f"  - {{name: opd_a, recipe: {tiny}/opd_arith.yaml, overrides: {snap}}}\n"
        f"  - {{name: sft_a, recipe: {tiny}/sft.yaml, init: {REPO}/assets/tiny/student_init, overrides: {snap}}}\n"
        f"  - {{name: sft_b, recipe: {tiny}/sft.yaml, init: {REPO}/assets/tiny/student_init, overrides: {snap}}}\n"
        f"  - {{name: grpo_a, recipe: {tiny}/grpo_arith.yaml, init: {REPO}/assets/tiny/student_init, overrides: {snap}}}\n"
        "  - name: cmp\n    compare:\n      domain: arithmetic\n"
        "      methods: {opd: [opd_a], sft: [sft_a, sft_b], grpo: [grpo_a]}\n"
        f"      teacher: {REPO}/assets/tiny/teachers/arithmetic\n      offset: 100\n      samples: 3\n"
        "  - name: see\n    specialists: {consolidated: opd_a, specialists: {arithmetic: sft_a}, sequential: grpo_a}\n")
    shrink = ["opd_a.train.prompts_per_step=4", "opd_a.train.micro_batch_size=8", "opd_a.rollout.max_new_tokens=16",
              "grpo_a.train.prompts_per_step=1", "grpo_a.train.micro_batch_size=8", "grpo_a.rollout.max_new_tokens=16",
              "sft_a.train.global_batch_size=8", "sft_a.train.micro_batch_size=8", "sft_a.data.eval_max_rows=8",
              "sft_b.train.global_batch_size=4", "sft_b.train.micro_batch_size=4", "sft_b.data.eval_max_rows=8",
              "sft_b.optim.lr=1e-3",
              *[f"{stage}.rollout.{key}" for stage in ("opd_a", "grpo_a") for key in ("engine=embedded", "sync=in_process")]]
    run = opd("run", str(recipe), *shrink)
    results = json.loads((out / "results.json").read_text())
    cmp = next(s for s in results["stages"] if s["kind"] == "compare")

    def tokens(stage):  # independent: sum the run's own per-step records
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        return sum(r["train/tokens"] for r in rows if "train/tokens" in r)

    def steps_tokens(stage):  # independent: cumulative tokens per step from the run's own records
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        per_step = {r["step"]: r["train/tokens"] for r in rows if "train/tokens" in r}
        return [sum(per_step[k] for k in range(1, s + 1)) for s in range(0, 4)]

    grids = {"opd": ["opd_a"], "sft": ["sft_a", "sft_b"], "grpo": ["grpo_a"]}
    totals = {g: steps_tokens(g) for grid in grids.values() for g in grid}
    budget = min(max(totals[g][-1] for g in grid) for grid in grids.values())
    assert cmp["token_budget"] == budget > 0
    for method, m in cmp["methods"].items():
        for name, tried in m["grid"].items():  # every step is a snapshot here: the last one within the budget
            expected = max(s for s in range(4) if totals[name][s] <= budget)
            assert (tried["checkpoint"]["step"], tried["checkpoint"]["tokens"]) == (expected, totals[name][expected])
        assert m["tokens"] == m["grid"][m["pick"]]["checkpoint"]["tokens"] > 0
        assert [t for t, _ in m["curve"]] == [t for t in totals[m["pick"]] if t <= budget]
    # the reported accuracy of OPD's pick, re-measured by the CLI's own evaluation of that checkpoint
    opd_point = cmp["methods"]["opd"]["grid"]["opd_a"]["checkpoint"]
    again = opd("eval", opd_point["path"], "--domains", "arithmetic", "--samples", "3",
                "--max-new-tokens", "16", "--json", str(tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text())["arithmetic"]["accuracy"] == cmp["methods"]["opd"]["accuracy"], again.stdout
    assert cmp["teacher_accuracy"] is not None and len(cmp["goals"]) == 4
    report = (out / "report.md").read_text()
    assert "Comparison `cmp`: arithmetic at" in report and "| goal | met | measured |" in report
    assert (out / "plots" / "compare_cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert "[cascade] cmp:" in run.stdout
    # the specialists table is read from the stages' own evaluations
    by_name = {s["name"]: s for s in results["stages"]}
    row = by_name["see"]["rows"][0]
    assert row["consolidated_accuracy"] == by_name["opd_a"]["eval"]["arithmetic"]["accuracy"]
    assert row["specialist_accuracy"] == by_name["sft_a"]["eval"]["arithmetic"]["accuracy"]
    assert row["sequential_accuracy"] == by_name["grpo_a"]["eval"]["arithmetic"]["accuracy"]
    assert "`opd_a` vs each specialist vs sequential single-domain OPD (`grpo_a`)" in report
