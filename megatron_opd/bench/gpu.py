"""``opd bench gpu``: OPD steps of a random Qwen3-shaped student on one CUDA GPU, in bf16 at TP1, the
embedded rollout engine and the teacher on the same GPU, weights synced in process. Prints the trainer's
tokens/s, its MFU (model FLOPs, 6 x matmul parameters x tokens + attention, against the GPU's dense bf16
peak) and the trainer's peak GPU memory. What ``tools/gpu_check.sh`` runs; without CUDA it stops at once."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from megatron_opd.model import cost
from megatron_opd.bench.runs import REPO, opd_recipe, run_recipe

# Dense (no sparsity) bf16 tensor-core peak, TFLOPS, from NVIDIA's data sheets; matched in this order
# against torch.cuda.get_device_name() (so "H100 PCIe" before "H100", "L40S" before "L4", "A100" before "A10").
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
]
SIZES = {"0.6B": "Qwen3-0.6B", "1.7B": "Qwen3-1.7B"}
PROMPTS = REPO / "assets" / "tiny" / "data" / "arithmetic" / "train.jsonl"


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def mfu(flops_per_s: float, peak_tflops: float) -> float:
    return flops_per_s / (peak_tflops * 1e12)


def bench_gpu(size: str, steps: int, out: Path, peak_tflops: float | None = None, prompts: int = 16, samples: int = 4,
              max_new_tokens: int = 256, log: Any = print) -> list[str]:
    import json

    import torch

    from megatron_opd.model.qwen3 import make_random_qwen3

    if not torch.cuda.is_available():
        raise RuntimeError("opd bench gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {sorted(SIZES)}")
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops or peak_bf16_tflops(name)
    if peak is None:
        raise ValueError(f"no bf16 peak known for {name!r}: give --peak-tflops")
    out = Path(out)
    models = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        models[role] = out / f"{SIZES[size]}-{role}"
        if not (models[role] / "config.json").is_file():
            log(f"[bench gpu] a random {SIZES[size]} ({role}) in {models[role]}")
            make_random_qwen3(models[role], SIZES[size], seed=seed)
    recipe = opd_recipe(models["student"], models["teacher"], PROMPTS, tp=1, pp=1, steps=steps, prompts=prompts,
                        samples=samples, max_new_tokens=max_new_tokens, sync="in_process", loss="topk_forward_kl",
                        micro_batch_size=samples * prompts)
    recipe["model"]["dtype"] = "bfloat16"
    recipe["run"].pop("cpu_threads", None)
    recipe["rollout"].update(engine="embedded", device="cuda")
    recipe["teachers"]["teachers"]["teacher"]["device"] = "cuda"
    run = run_recipe(recipe, out / "run", log=log)
    timed = [r for r in run.rows if r["step"] > 1] or run.rows  # the first step compiles and warms the allocator
    train_s = statistics.median(r["time/train_s"] for r in timed)
    positions = statistics.median(r["train/positions"] for r in timed)
    squares = statistics.median(r["train/positions_sq"] for r in timed)
    shape = cost.Shape.of(json.loads((models["student"] / "config.json").read_text()))
    flops_per_s = shape.train_flops(positions, squares) / train_s
    gpu_mib = max(r.get("memory/rank0_peak_gpu_mib", 0.0) for r in run.rows)
    step_s = statistics.median(r["time/step_s"] for r in timed)
    return [
        f"device: {name}, bf16 peak {peak:.0f} TFLOPS; {SIZES[size]} student and teacher (random weights), "
        f"{prompts} prompts x {samples} samples x {max_new_tokens} new tokens, median of steps {timed[0]['step']}-{timed[-1]['step']}",
        f"OPD step: {step_s:.2f} s (rollout {statistics.median(r['time/rollout_s'] for r in timed):.2f}, scoring "
        f"{statistics.median(r['time/scoring_s'] for r in timed):.2f}, train {train_s:.2f}, sync "
        f"{statistics.median(r['time/sync_s'] for r in timed):.2f})",
        f"trainer tokens/s: {positions / train_s:.0f}",
        f"trainer MFU: {mfu(flops_per_s, peak):.1%} ({flops_per_s / 1e12:.1f} TFLOPS of model FLOPs)",
        f"trainer peak GPU memory: {gpu_mib / 1024:.1f} GiB",
    ]
