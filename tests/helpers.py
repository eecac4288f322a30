"""What the tests share beside their fixtures: the repository's paths, tiny HF checkpoints, and the real
processes a test starts (torchrun jobs, the `opd` CLI, a rollout server). Importable as ``helpers`` from any
test file (``pythonpath = ["tests"]``)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_opd.platform.net import free_port

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"
VOCAB = 131  # deliberately not divisible by 2: exercises TP vocab padding


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def make_tiny_hf(out: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A tiny random HF checkpoint built from a config (no download)."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "qwen3":  # q/k norm, tied embeddings, explicit head_dim
        model = Qwen3ForCausalLM(Qwen3Config(**{"head_dim": 16, "tie_word_embeddings": True, **common}))
    elif arch == "qwen2":  # qkv bias
        model = Qwen2ForCausalLM(Qwen2Config(**{"tie_word_embeddings": False, **common}))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": False, "rope_theta": 50000.0, **common}))
    elif arch == "qwen3_moe":  # every layer routed: 4 experts, top 2 renormalised, untied
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        moe = dict(head_dim=16, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                   moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[])
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**moe, **common}))
        with torch.no_grad():  # a router at init scores the experts almost alike: spread it
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
    elif arch == "llama3":  # Llama 3.1 / 3.2's RoPE scaling (frequency bands); theta low enough that it shows
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        rope = ({"rope_parameters": {**scaling, "rope_theta": 10000.0}} if transformers_major() >= 5
                else {"rope_scaling": scaling, "rope_theta": 10000.0})
        common.pop("rope_theta")
        model = LlamaForCausalLM(LlamaConfig(**{**common, "tie_word_embeddings": False, **rope}))
    else:
        raise ValueError(arch)
    # random biases are zero at init: make them non-trivial so the bias mapping is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


def torchrun(nproc: int, script_or_module: list[str], timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run a real multi-process job on 127.0.0.1 (gloo) and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script_or_module]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def opd(*args: str, timeout: int = 900, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `opd` CLI in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"opd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def opd_signalled(*args: str, signum: int, before_step: int, timeout: int = 900, env: dict | None = None,
                  process_group: bool = False) -> subprocess.CompletedProcess:
    """Run the real `opd` CLI and send its process ``signum`` while training: rank 0 waits before step
    ``before_step`` for the signal (``OPD_FAULT_INJECT=signal:N``), so it lands in a known step. With
    ``process_group``, the command runs in its own process group and the signal goes to all of it, as a
    terminal's Ctrl-C does. stderr is merged into stdout."""
    import signal as signals
    import time

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPD_FAULT_INJECT": f"signal:{before_step}",
                **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO, start_new_session=process_group)
    lines, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if f"waits for a stop signal before step {before_step}" in line:
                if process_group:
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)
                break
            if time.monotonic() > deadline:
                raise AssertionError("timed out before the step to signal")
        rest, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        proc.send_signal(signals.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, "")


def sft_recipe(world: dict[str, Path], out: Path, tp: int = 1, pp: int = 1, **train) -> Path:
    """Write a small SFT recipe over ``world`` and return its path."""
    import yaml

    recipe = {
        "kind": "sft",
        "run": {"name": "test", "output_dir": str(out)},
        "model": {"hf_path": str(world["student"]), "vocab_divisible_by": 8},
        "parallel": {"tp": tp, "pp": pp},
        "data": {"train": str(world["train"]), "eval": str(world["test"]), "max_length": 128, "eval_max_rows": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "seed": 7, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def start_rollout_server(model: Path, timeout: float = 180.0, role: str = "rollout",
                         extra_args: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """`opd serve --role ROLE` on a free loopback port; returns (url, process) once healthy."""
    from megatron_opd.wire.process import start_server

    server = start_server(model, role=role, timeout=timeout, extra_args=extra_args)
    return server.url, server.proc


def hf_token_scores(model_dir: Path, seqs, starts, top_k):
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


def train_at_layouts(tmp_path: Path, hf_dir: Path, layouts: list[tuple[int, int, int, int]]) -> dict:
    """tests/workers/dp_worker.py's three optimizer steps on one fixed step of 8 samples at each (tp, pp, dp, ep)
    layout, and the single rank's reference checks: their reports by layout."""
    import json

    reports = {}
    for tp, pp, dp, ep in layouts:
        torchrun(tp * pp * dp, [str(WORKERS / "dp_worker.py"), str(tp), str(pp), str(dp), str(tmp_path), str(hf_dir), str(ep)])
        reports[(tp, pp, dp, ep)] = json.loads((tmp_path / f"dp-{tp}x{pp}x{dp}{f'-ep{ep}' if ep > 1 else ''}.json").read_text())
    reference = reports[layouts[0]]
    assert list(reference) == ["opd_sampled_token", "opd_topk_forward_kl", "sft", "after"]
    assert reference["sft"]["tokens"] == 9 + 14 + 4 + 11 + 7 + 16 + 6 + 10  # every completion token, once
    assert reference["after"]["loss"] != reference["sft"]["loss"]  # the steps changed the weights
    return reports


def assert_trains_like(got: dict, want: dict, layout) -> None:
    """Each step's token count equal, its loss and gradient norm within 1e-5 (relative)."""
    import pytest

    for step, expected in want.items():
        assert got[step]["tokens"] == expected["tokens"], (layout, step)
        assert got[step]["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6), (layout, step)
        if "grad_norm" in expected:
            assert got[step]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), (layout, step)
