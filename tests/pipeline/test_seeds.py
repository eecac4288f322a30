"""`opd seeds`: a cascade's repeats side by side; numbers against hand-computed means and spreads, and a goal met
by some seeds only reported as mixed, never as met."""
import json

from helpers import opd


def _run(seed_acc, opd_acc, sft_acc, met, ratio):
    return {"name": "cmp", "start_eval": {"multiply": {"accuracy": 0.3}},
            "stages": [{"name": "opd_a", "kind": "opd", "eval": {"multiply": {"accuracy": opd_acc, "format_score": opd_acc / 2}}},
                       {"name": "sft_a", "kind": "sft", "eval": {"multiply": {"accuracy": sft_acc}}},
                       {"name": "methods", "kind": "compare", "unit": "flops", "domain": "multiply",
                        "teacher_accuracy": 0.95,
                        "methods": {"opd": {"pick": "opd_a", "accuracy": opd_acc, "cost": 2e12,
                                            "curve": [[0.0, 0.3], [1e12 + 1e11 * ratio, opd_acc - 0.1], [2e12, opd_acc]]},
                                    "sft": {"pick": "sft_a", "accuracy": sft_acc, "cost": 1e12,
                                            "curve": [[0.0, 0.3], [1e12, sft_acc]][: 2 if ratio < 10 else 1]}},
                        "common": {"accuracy": seed_acc, "cost": {"opd": 1e11, "sft": 1e11 * ratio},
                                   "ratio_to_focus": {"opd": 1.0, "sft": ratio},
                                   "pairs": {"sft": {"accuracy": seed_acc, "focus_cost": 1e11, "cost": 1e11 * ratio,
                                                     "ratio": ratio}}},
                        "goals": [{"goal": "opd above sft at equal FLOPs", "met": met, "measured": "x"},
                                  {"goal": "opd reaches sft", "met": None, "measured": "n/a"}]},
                       {"name": "see_saw", "kind": "specialists", "consolidated": "opd_a", "margin": 0.02,
                        "rows": [{"domain": "multiply", "specialist_accuracy": sft_acc, "consolidated_accuracy": opd_acc,
                                  "gap": opd_acc - sft_acc, "met": opd_acc >= sft_acc - 0.02}]}]}


def test_seeds_table_against_hand_numbers(tmp_path):
    runs = [_run(0.5, 0.9, 0.6, True, 9.0), _run(0.6, 0.8, 0.7, False, 12.0), _run(0.55, 0.85, 0.5, True, 3.0)]
    dirs = []
    for i, run in enumerate(runs):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.json").write_text(json.dumps(run))
        dirs.append(str(tmp_path / f"s{i}"))
    out = opd("seeds", *dirs, "--plots", str(tmp_path / "plots")).stdout
    assert "| opd_a | multiply | 0.85 [0.8..0.9] (0.9, 0.8, 0.85) | 0.425 [0.4..0.45] (0.45, 0.4, 0.425) |" in out
    assert "| sft_a | multiply | 0.6 [0.5..0.7] (0.6, 0.7, 0.5) | n/a (n/a, n/a, n/a) |" in out
    assert "| sft | 0.6 [0.5..0.7] (0.6, 0.7, 0.5) | 1e+12 [1e+12..1e+12] (1e+12, 1e+12, 1e+12) | sft_a, sft_a, sft_a |" in out
    assert "| 0.55 [0.5..0.6] (0.5, 0.6, 0.55) | 8 [3..12] (9, 12, 3) |" in out  # SFT's compute over OPD's: (9 + 12 + 3) / 3
    assert "Best accuracy every method reaches: 0.55 [0.5..0.6] (0.5, 0.6, 0.55); teacher 0.95" in out
    assert "| methods: opd above sft at equal FLOPs | 2 of 3 | mixed |" in out
    assert "| methods: opd reaches sft | 0 of 3 | n/a |" in out
    # opd_a - sft_a per run: 0.3, 0.1, 0.35
    assert "| multiply | 0.6 [0.5..0.7] (0.6, 0.7, 0.5) | 0.85 [0.8..0.9] (0.9, 0.8, 0.85) | 0.25 [0.1..0.35] (0.3, 0.1, 0.35) | 3 of 3 |" in out
    # each method's curve point by point: cost as the runs' mean ((1.9e12 + 2.2e12 + 1.3e12) / 3), accuracy spread;
    # sft's second point is missing from the run at ratio 12, so its curve stops at its first
    assert "| opd | 0 | 0.3 [0.3..0.3] (0.3, 0.3, 0.3) |" in out
    assert "| opd | 1.8e+12 | 0.75 [0.7..0.8] (0.8, 0.7, 0.75) |" in out and "| opd | 2e+12 | 0.85 [0.8..0.9]" in out
    assert "| sft | 0 | 0.3 [0.3..0.3] (0.3, 0.3, 0.3) |" in out and "| sft | 1e+12 |" not in out
    plot = tmp_path / "plots" / "compare_methods_seeds.png"
    assert f"plot: {plot}" in out and plot.read_bytes().startswith(b"\x89PNG")
    bad = opd("seeds", dirs[0], str(tmp_path), check=False)
    assert bad.returncode == 2 and f"{tmp_path}: no results.json" in bad.stderr + bad.stdout
