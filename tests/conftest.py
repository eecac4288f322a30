import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
VOCAB = 131  # deliberately not divisible by 2: exercises TP vocab padding

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    else:
        raise ValueError(arch)
    # random biases are zero at init: make them non-trivial so the bias mapping is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: make_tiny_hf(root / arch, arch, seed=i) for i, arch in enumerate(["qwen3", "qwen2", "llama"])}


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


from megatron_opd.platform.net import free_port  # noqa: E402,F401  (one free-port helper)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer, a random tiny student and count-domain chat data, made by the project's own code."""
    from megatron_opd.data.tokenizer import build_char_tokenizer
    from megatron_opd.data.toy import chat_rows
    from megatron_opd.data.world import write_rows
    from megatron_opd.model.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_world")
    tok = build_char_tokenizer(root / "tokenizer")
    student = make_tiny_qwen3(root / "student", len(tok), "nano", seed=0, tokenizer_dir=root / "tokenizer")
    test = chat_rows("count", 64, seed=2)
    train = chat_rows("count", 400, seed=1, exclude={r["messages"][0]["content"] for r in test})
    return {
        "root": root,
        "student": student,
        "train": write_rows(train, root / "train.jsonl"),
        "test": write_rows(test, root / "test.jsonl"),
    }


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


def pytest_terminal_summary(terminalreporter) -> None:
    """The slow (real-process, end-to-end) tests and the quick ones, shown apart: count and test time."""
    totals: dict[str, tuple[int, float]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                kind = "slow" if "slow" in report.keywords else "quick"
                count, seconds = totals.get(kind, (0, 0.0))
                totals[kind] = (count + 1, seconds + report.duration)
    for kind, (count, seconds) in sorted(totals.items()):
        terminalreporter.write_line(f"{kind} tests: {count} run, {seconds:.0f} s of test time")
