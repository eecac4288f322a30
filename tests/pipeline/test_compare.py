"""The methods comparison at an equal token budget: the pure choices (tokens per checkpoint, the
checkpoint at the budget, tokens to reach an accuracy, goals) against hand-computed values, recipe
validation, and a real shrunk comparison (OPD, continued SFT, GRPO stages as processes) whose
numbers are checked against the runs' own metrics and an independent evaluation."""
import json

import pytest
import torch

from helpers import REPO, opd
from megatron_opd.config import ConfigError, load_recipe
from megatron_opd.model.cost import Shape
from megatron_opd.pipeline.compare import (StageCost, at_budget, common_reach, comparison_goals, cumulative_flops,
                                           cumulative_tokens, data_cost, specialist_rows, stage_checkpoints, teacher_share,
                                           tokens_to_reach)

# hidden 4, ffn 8, 2 layers, 2 heads of 2, 1 kv head, vocab 10, tied: per layer 4 x (4 + 2 x 2) + 4 x 4 + 3 x 4 x 8 = 144
# matmul weights, 2 x 144 + 10 x 4 (the LM head) = 328 in all; a forward over P positions (sum of squares Q) costs
# 2 x 328 x P + 2 x 2 layers x 4 x Q = 656 P + 16 Q FLOPs, training three times that
TINY = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 2, "vocab_size": 10, "tie_word_embeddings": True}


def test_cumulative_tokens_sums_every_step_and_a_resume_wins():
    rows = [{"step": 1, "train/tokens": 10}, {"step": 2, "train/tokens": 12}, {"step": 3, "train/tokens": 99},
            {"step": 3, "train/tokens": 7}, {"step": 2, "eval/loss": 1.0}]  # step 3 re-logged after a resume
    assert cumulative_tokens(rows, 3, "a") == {0: 0.0, 1: 10.0, 2: 22.0, 3: 29.0}
    with pytest.raises(ValueError, match=r"stage 'a' logged train/tokens at 3 of 4 steps \(first missing: step 4\).*log_interval=1"):
        cumulative_tokens(rows, 4, "a")


def test_flops_per_step_by_method_against_hand_numbers(tmp_path):
    student = Shape.of(TINY)
    record = {"step": 1, "train/tokens": 4, "train/positions": 10, "train/positions_sq": 60, "data/new_rows": 3}
    forward = 656 * 10 + 16 * 60  # 7,520
    assert StageCost("grpo", student).step(record) == {"student training": 3 * forward, "student sampling": forward}
    assert StageCost("opd", student, teacher=student).step(record) == {
        "student training": 3 * forward, "student sampling": forward, "teacher scoring": forward}
    assert StageCost("sft", student, data_flops_per_row=100.0).step(record) == {
        "student training": 3 * forward, "teacher sampling (SFT data)": 300.0}
    rows = [record, {**record, "step": 2, "data/new_rows": 0}]
    assert cumulative_flops(rows, 2, "s", StageCost("sft", student, data_flops_per_row=100.0)) == {
        0: 0.0, 1: 3 * forward + 300.0, 2: 6 * forward + 300.0}
    with pytest.raises(ValueError, match=r"stage 's' did not log train/positions .* at step 1"):
        cumulative_flops([{"step": 1, "train/tokens": 4}], 1, "s", StageCost("grpo", student))
    # a mixture of experts counts its active experts: 2 of them 3 wide = one dense MLP 6 wide
    moe = {**TINY, "intermediate_size": 999, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 3}
    assert Shape.of(moe).ffn == 6
    # an SFT data file's teacher cost: the sidecar's sampled positions through the teacher, over its rows
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n{"a": 2}\n\n')
    (tmp_path / "d.cost.json").write_text(json.dumps({"teacher_config": "teacher/config.json", "positions": 10,
                                                       "positions_sq": 60, "samples": 4, "kept": 2}))
    (tmp_path / "plain.jsonl").write_text('{"a": 1}\n')
    assert data_cost(tmp_path / "d.jsonl") == (forward, 2) and data_cost(tmp_path / "plain.jsonl") == (0.0, 1)


def test_common_reach_is_the_best_accuracy_every_method_reaches():
    methods = {"opd": {"curve": [(0.0, 0.1), (10.0, 0.5), (20.0, 0.8)]},
               "sft": {"curve": [(0.0, 0.1), (50.0, 0.4), (100.0, 0.6), (150.0, 0.55)]},
               "grpo": {"curve": [(0.0, 0.1), (40.0, 0.7)]}}
    common = common_reach(methods, "opd")
    assert {k: common[k] for k in ("accuracy", "cost", "ratio_to_focus", "start")} == {
        "accuracy": 0.6, "cost": {"opd": 20.0, "sft": 100.0, "grpo": 40.0},
        "ratio_to_focus": {"opd": 1.0, "sft": 5.0, "grpo": 2.0}, "start": 0.1}
    assert common["pairs"] == {"sft": {"accuracy": 0.6, "focus_cost": 20.0, "cost": 100.0, "ratio": 5.0},
                               "grpo": {"accuracy": 0.7, "focus_cost": 20.0, "cost": 40.0, "ratio": 2.0}}
    # a method that never beat the start: no ratio for everyone together, the pairs of the others still have theirs
    methods["grpo"]["curve"] = [(0.0, 0.1), (40.0, 0.0)]
    common = common_reach(methods, "opd")
    assert common["accuracy"] == 0.1 and common["ratio_to_focus"] == {"opd": None, "sft": None, "grpo": None}
    assert common["pairs"]["sft"]["ratio"] == 5.0 and common["pairs"]["grpo"]["ratio"] is None


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
        "opd": {"accuracy": 0.95, "cost": 1000.0, "curve": [(0.0, 0.0), (100.0, 0.2), (500.0, 0.95)]},
        "sft": {"accuracy": 0.97, "cost": 990.0, "curve": []},
        "grpo": {"accuracy": 0.2, "cost": 1000.0, "curve": []},
    }
    goals = {g["goal"]: g for g in comparison_goals(methods, "opd", "grpo", 1 / 9, 1.0, 0.9)}
    assert goals["opd >= 90% of the teacher's accuracy"]["met"]  # 0.95 >= 0.9
    assert not goals["opd above sft at equal tokens"]["met"]  # 0.95 < 0.97: reported, not hidden
    assert goals["opd above grpo at equal tokens"]["met"]
    reach = goals["opd reaches grpo's final accuracy with <= 0.111 of its tokens"]
    assert reach["met"] and "after 100 (0.100 of them)" in reach["measured"]  # 100 / 1000
    methods["opd"]["curve"] = [(0.0, 0.0), (200.0, 0.2)]
    reach = comparison_goals(methods, "opd", "grpo", 1 / 9, None, 0.9)[-1]
    assert not reach["met"] and "(0.200 of them)" in reach["measured"]


def test_focus_never_wins_by_more_tokens_and_a_vacuous_reach_is_not_met():
    methods = {
        # OPD is ahead at its budget checkpoint (1000 tokens) but behind at SFT's 600 tokens
        "opd": {"accuracy": 0.9, "cost": 1000.0, "curve": [(0.0, 0.1), (500.0, 0.4), (1000.0, 0.9)]},
        "sft": {"accuracy": 0.5, "cost": 600.0, "curve": []},
        "grpo": {"accuracy": 0.1, "cost": 1000.0, "curve": []},  # no better than the start
    }
    goals = {g["goal"]: g for g in comparison_goals(methods, "opd", "grpo", 1 / 9, None, 0.9)}
    above = goals["opd above sft at equal tokens"]
    assert not above["met"] and "opd 0.400 after 500 tokens vs sft 0.500 after 600" in above["measured"]
    reach = goals["opd reaches grpo's final accuracy with <= 0.111 of its tokens"]
    assert reach["met"] is None and reach["measured"].startswith("n/a")


def test_report_sections_have_consistent_columns():
    from megatron_opd.pipeline.report import comparison_section, specialists_section

    cmp = {"name": "c", "domain": "arithmetic", "unit": "flops", "budget": 100.0, "choice_rows": "100..199", "rows": "0..99",
           "teacher": "t", "teacher_accuracy": 1.0, "spec": {"focus": "opd"},
           "common": {"accuracy": 0.5, "cost": {"opd": 45.0, "sft": 90.0}, "ratio_to_focus": {"opd": 1.0, "sft": 2.0},
                      "pairs": {"sft": {"accuracy": 0.5, "focus_cost": 45.0, "cost": 90.0, "ratio": 2.0}}},
           "methods": {m: {"pick": f"{m}_a", "cost": 90.0, "tokens": 7.0, "accuracy": 0.5, "curve": [(0.0, 0.0), [90.0, 0.5]],
                           "flops_by_part": {"student training": 90.0},
                           "grid": {f"{m}_a": {"choice_accuracy": 0.4, "checkpoint": {"tokens": 7.0, "flops": 90.0}}}}
                       for m in ("opd", "sft")},
           "goals": [{"goal": "g1", "met": True, "measured": "x"}, {"goal": "g2", "met": None, "measured": "n/a: y"}]}
    seq = {"consolidated": "mopd", "sequential": "seq", "margin": 0.02,
           "rows": [{"domain": "a", "specialist": "sa", "specialist_accuracy": 0.5, "consolidated_accuracy": 0.4,
                     "sequential_accuracy": 0.1, "gap": -0.1, "met": False,
                     "training": {"sa": {"samples_per_step": 32.0, "samples": 6400.0, "kl_first": 0.9, "kl_last": 0.2},
                                  "mopd": None}}]}
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
    assert "| a | `sa` | 32.0 | 6400 | 0.900 -> 0.200 |" in "\n".join(specialists_section(seq))
    text = "\n".join(comparison_section(cmp))
    assert "| g2 | n/a | n/a: y |" in text and "| 90 (90%) | 7 |" in text and "at 100 FLOPs" in text
    assert "opd and sft reach 0.500: opd after 45, sft after 90 (2x)" in text


def test_specialist_rows_against_hand_numbers():
    def table(**acc):
        return {d: {"accuracy": a} for d, a in acc.items()}

    evals = {"mopd": table(a=0.50, b=0.30), "sa": table(a=0.51, b=0.0), "sb": table(a=0.0, b=0.40),
             "seq": table(a=0.10, b=0.35)}
    rows = {r["domain"]: r for r in specialist_rows(evals, "mopd", {"a": "sa", "b": "sb"}, "seq", 0.02)}
    assert rows["a"]["met"] and rows["a"]["gap"] == pytest.approx(-0.01) and rows["a"]["sequential_accuracy"] == 0.10
    assert not rows["b"]["met"] and rows["b"]["gap"] == pytest.approx(-0.10)
    assert specialist_rows(evals, "mopd", {"a": "sa"}, None, 0.0)[0]["sequential_accuracy"] is None


def test_teacher_share_against_hand_numbers():
    """The samples count is a running total per process (a resume restarts it: 6 before, 5 after); the KL windows
    take only the steps that scored with this teacher."""
    records = [{"step": 1, "teachers/t/samples": 4.0, "teacher/t/reverse_kl": 1.0},
               {"step": 2, "teachers/t/samples": 4.0, "teachers/u/samples": 8.0, "teacher/u/reverse_kl": 5.0},
               {"step": 3, "teachers/t/samples": 6.0, "teacher/t/reverse_kl": 0.5},
               {"step": 4, "teachers/t/samples": 2.0, "teacher/t/reverse_kl": 0.3},  # resumed after step 3
               {"step": 5, "teachers/t/samples": 5.0, "teacher/t/reverse_kl": 0.2}]
    share = teacher_share(records, "t", steps=5, window=2)
    assert share == pytest.approx({"samples": 11.0, "samples_per_step": 2.2, "kl_first": 0.75, "kl_last": 0.25})
    assert teacher_share(records, "v", steps=5) is None


def test_compare_recipes_fail_at_load_not_after_training(tmp_path):
    recipe = REPO / "recipes" / "tiny" / "compare_methods.yaml"
    cfg = load_recipe(recipe, ["methods.compare.budget=5e12"])  # edits the measuring stage's own spec
    assert cfg.stages[-1].compare.budget == 5e12
    assert cfg.seed == 1 and {s.init for s in cfg.stages[:-1]} == {"start"}
    with pytest.raises(ConfigError, match=r"stages.3 \(sft_lr3e-4\): compared by 'methods', so it needs "
                                          r"train.log_interval=1.*\(has 10, true, 10\)"):
        load_recipe(recipe, ["sft_lr3e-4.train.log_interval=10"])
    with pytest.raises(ConfigError, match=r"offset 50 overlaps the reported rows 0..99"):
        load_recipe(recipe, ["methods.compare.offset=50"])
    with pytest.raises(ConfigError, match=r"reach: 'opd' is the focus method"):
        load_recipe(recipe, ["methods.compare.reach=opd"])
    with pytest.raises(ConfigError, match=r"\['opd_lr1e-3'\] listed more than once"):
        load_recipe(recipe, ["methods.compare.methods.sft=[opd_lr1e-3]"])
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

    def matmul_weights(hf_dir):  # independent of model/cost.py: transformers' own modules, the LM head included
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        layers = sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in name)
        config = model.config
        return layers + model.lm_head.weight.numel(), 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim

    def forward(hf_dir, r):  # 2 FLOPs per weight and position, plus causal attention's two L^2/2 x d_q products per layer
        weights, attention = matmul_weights(hf_dir)
        return 2 * weights * r["train/positions"] + attention * r["train/positions_sq"]

    student, teacher = f"{REPO}/assets/tiny/student_init", f"{REPO}/assets/tiny/teachers/arithmetic"
    step_flops = {"opd_a": lambda r: 4 * forward(student, r) + forward(teacher, r),  # train 3 + sample 1 + teacher 1
                  "grpo_a": lambda r: 4 * forward(student, r),  # SFT's rows are reference solutions: no sampling cost
                  "sft_a": lambda r: 3 * forward(student, r), "sft_b": lambda r: 3 * forward(student, r)}

    def cumulative(stage):  # independent: cumulative tokens and FLOPs per step from the run's own records
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        per_step = {r["step"]: r for r in rows if "train/tokens" in r}
        return ([sum(per_step[k]["train/tokens"] for k in range(1, s + 1)) for s in range(0, 4)],
                [sum(step_flops[stage](per_step[k]) for k in range(1, s + 1)) for s in range(0, 4)])

    grids = {"opd": ["opd_a"], "sft": ["sft_a", "sft_b"], "grpo": ["grpo_a"]}
    tokens, flops = {}, {}
    for g in step_flops:
        tokens[g], flops[g] = cumulative(g)
    budget = min(max(flops[g][-1] for g in grid) for grid in grids.values())
    assert cmp["unit"] == "flops" and cmp["budget"] == pytest.approx(budget, rel=1e-9) and budget > 0
    for method, m in cmp["methods"].items():
        for name, tried in m["grid"].items():  # every step is a snapshot here: the last one within the budget
            expected = max(s for s in range(4) if flops[name][s] <= budget * (1 + 1e-9))
            point = tried["checkpoint"]
            assert (point["step"], point["tokens"]) == (expected, tokens[name][expected])
            assert point["flops"] == pytest.approx(flops[name][expected], rel=1e-9)
        assert m["cost"] == m["flops"] == m["grid"][m["pick"]]["checkpoint"]["flops"] > 0
        assert sum(m["flops_by_part"].values()) == pytest.approx(m["flops"], rel=1e-9)
        assert [t for t, _ in m["curve"]] == pytest.approx([f for f in flops[m["pick"]] if f <= budget * (1 + 1e-9)])
    assert set(cmp["methods"]["opd"]["flops_by_part"]) == {"student training", "student sampling", "teacher scoring"}
    assert cmp["common"]["ratio_to_focus"]["opd"] in (1.0, None)
    # the reported accuracy of OPD's pick, re-measured by the CLI's own evaluation of that checkpoint
    opd_point = cmp["methods"]["opd"]["grid"]["opd_a"]["checkpoint"]
    again = opd("eval", opd_point["path"], "--domains", "arithmetic", "--samples", "3",
                "--max-new-tokens", "16", "--json", str(tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text())["arithmetic"]["accuracy"] == cmp["methods"]["opd"]["accuracy"], again.stdout
    assert cmp["teacher_accuracy"] is not None and len(cmp["goals"]) == 4
    report = (out / "report.md").read_text()
    assert "Comparison `cmp`: arithmetic at" in report and "FLOPs by part at the reported checkpoint" in report and "| goal | met | measured |" in report
    assert (out / "plots" / "compare_cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert "[cascade] cmp:" in run.stdout
    # the specialists table is read from the stages' own evaluations
    by_name = {s["name"]: s for s in results["stages"]}
    row = by_name["see"]["rows"][0]
    assert row["consolidated_accuracy"] == by_name["opd_a"]["eval"]["arithmetic"]["accuracy"]
    assert row["specialist_accuracy"] == by_name["sft_a"]["eval"]["arithmetic"]["accuracy"]
    assert row["sequential_accuracy"] == by_name["grpo_a"]["eval"]["arithmetic"]["accuracy"]
    assert "`opd_a` vs each specialist vs sequential single-domain OPD (`grpo_a`)" in report
    # and each run's share of the domain from its own records: every sample the audit saw, routed to `arithmetic`
    audit = [json.loads(line) for line in (out / "opd_a" / "samples.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (out / "opd_a" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["teacher/arithmetic/reverse_kl"] for r in records if "teacher/arithmetic/reverse_kl" in r]
    share = row["training"]["opd_a"]
    assert share["samples"] == sum(len(a["prompt_rows"]) for a in audit) == 3 * 4 * 2
    assert share["kl_first"] == share["kl_last"] == pytest.approx(sum(kls) / 3) and len(kls) == 3
    assert row["training"]["sft_a"] is None  # no teacher in an SFT stage
    assert "| arithmetic | `opd_a` | 8.0 | 24 |" in report
