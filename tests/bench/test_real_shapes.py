"""Every real-size code path, cheaply: Qwen3's real tokenizer and chat template, Qwen3-0.6B's real
width (hidden 1,024, 16 query / 8 KV heads of head_dim 128, q/k norm, tied embeddings) and its
151,936-token vocabulary with 2 layers instead of 28, two OPD steps at TP2 with a teacher server and a
rollout server (weights synced over the distributed path), the top-k forward KL at the real
vocabulary, and a checkpoint resumed at TP1 x PP2 (resharded) with the disk sync."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.bench.runs import REPO, opd_recipe, run_recipe
from megatron_opd.model.qwen3 import make_random_qwen3

PROMPTS = REPO / "assets" / "tiny" / "data" / "arithmetic" / "train.jsonl"


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return (make_random_qwen3(root / "student", "Qwen3-0.6B", seed=0, num_layers=2),
            make_random_qwen3(root / "teacher", "Qwen3-0.6B", seed=1, num_layers=2))


@pytest.mark.slow
def test_two_layer_qwen3_at_real_width_trains_syncs_and_resumes_resharded(qwen_pair, tmp_path):
    student, teacher = qwen_pair
    config = json.loads((student / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["head_dim"], config["num_hidden_layers"]) == (151936, 1024, 128, 2)
    settings = dict(steps=2, prompts=2, samples=2, max_new_tokens=8, loss="topk_forward_kl", top_k=20, save_interval=1,
                    keep_last=2, micro_batch_size=4)
    straight = run_recipe(opd_recipe(student, teacher, PROMPTS, tp=2, pp=1, sync="distributed", **settings),
                          tmp_path / "tp2")
    assert [r["step"] for r in straight.rows] == [1, 2]
    for row in straight.rows:
        assert row["rollout/response_length"] == 8 and row["train/tokens"] == 2 * 2 * 8  # a random model never stops
        assert row["opd/train_inference_mismatch"] < 1e-4  # the rollout server holds exactly the trainer's weights
        assert row["teacher/teacher/reverse_kl"] == pytest.approx(row["opd/reverse_kl"], abs=1e-3)
        assert row["opd/token_set_size"] == 20 and row["train/grad_norm"] > 0
        assert row["memory/loss_forward_extra_mib"] > 0 and row["memory/rank1_peak_rss_mib"] > 1000
    # the prompts went through Qwen3's template and tokenizer: '<|im_start|>user\n...<|im_start|>assistant\n'
    assert straight.results["teacher_counters"]["teacher"]["computed_tokens"] > 2 * 2 * 8
    exported = load_file(str(straight.out / "hf" / "model.safetensors"))
    assert exported["model.embed_tokens.weight"].shape == (151936, 1024) and "lm_head.weight" not in exported
    assert torch.isfinite(exported["model.layers.1.self_attn.q_norm.weight"]).all()

    resumed = tmp_path / "tp1pp2"
    shutil.copytree(straight.out / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001",
                    copy_function=os.link)  # hard links: no second copy of a 3 GB checkpoint
    (resumed / "checkpoints" / "latest").write_text("step-00000001\n")
    other = run_recipe(opd_recipe(student, teacher, PROMPTS, tp=1, pp=2, sync="disk", **{**settings, "keep_last": 1}),
                       resumed)
    assert "resumed from" in other.stdout and "saved at another layout" in other.stdout
    assert [r["step"] for r in other.rows] == [2]
    assert other.rows[0]["train/loss"] == pytest.approx(straight.rows[1]["train/loss"], abs=1e-5)
    assert other.rows[0]["opd/train_inference_mismatch"] < 1e-4  # the disk sync delivered the resharded weights
