"""``opd bench scale``: how the trainer's loss head grows with the vocabulary and tensor parallelism.

Each point is a real ``torchrun`` of TP ranks over gloo: every rank holds its logits shard
[tokens, V_pad / TP] (fp32, megatron's padded vocabulary) and runs the top-k forward KL with the
tail bucket (the heaviest loss: a logsumexp over the ids outside the top-k) forward and backward
through ``algo.vocab_parallel``. Its extra peak memory is the rise of the process's resident set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the shard is allocated
and the kernels warmed up) — what the operating system actually had to provide — reported against
the shard's own size. At TP1 the same is measured for the full-vocabulary path the loss had before
(log-softmax of the gathered logits, then ``divergences.topk_forward_kl_with_tail``).

It also sends one step of rollouts with teacher top-k from rank 0 to DP ranks through
``train.batches.distribute`` and reports the bytes each rank receives (its own share only: ~1/DP of the step).

And it runs a few steps of ``recipes/tiny/opd_general.yaml`` (after ``opd run recipes/tiny/sft.yaml``)
and reports the share of padded positions in its micro-batches (``train/padding_fraction``), as the
recipe batches them and by a token budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class MemoryPoint:
    vocab: int
    tp: int
    tokens: int
    path: str  # "sharded" or "gathered"
    shard_bytes: int
    extra_bytes: int  # the largest over the TP ranks

    @property
    def ratio(self) -> float:
        return self.extra_bytes / self.shard_bytes

    def line(self) -> str:
        return (f"V {self.vocab}, TP{self.tp}, {self.tokens} tokens, {self.path}: logits shard "
                f"{self.shard_bytes / 2**20:.0f} MiB per rank, loss extra peak {self.extra_bytes / 2**20:.0f} MiB "
                f"= {self.ratio:.2f}x the shard")


def _run_worker(nproc: int, spec: dict, what: str) -> list[dict]:
    """One torchrun of ``nproc`` scale_worker ranks; their reports, by rank."""
    from megatron_opd.platform.net import free_port

    with tempfile.TemporaryDirectory(prefix="opd-bench-scale-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_opd.bench.scale_worker",
               json.dumps({**spec, "out": tmp})]
        # glibc's dynamic mmap threshold would keep freed chunk buffers resident (counted before, reused
        # unseen): fixed thresholds return every large block to the system when it is freed
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
               "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"bench worker failed ({what}):\n{proc.stderr[-3000:]}")
        ranks = [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(nproc)
                 if (Path(tmp) / f"rank-{r}.json").is_file()]
    if len(ranks) != nproc:
        raise RuntimeError(f"expected {nproc} rank reports, got {len(ranks)} ({what})")
    return ranks


def memory_point(vocab: int, tp: int, tokens: int, top_k: int, chunk_mib: float, path: str = "sharded") -> MemoryPoint:
    """One torchrun of ``tp`` ranks; each reports its shard and extra peak bytes."""
    spec = {"vocab": vocab, "tokens": tokens, "top_k": top_k, "chunk_mib": chunk_mib, "path": path}
    ranks = _run_worker(tp, spec, f"V {vocab}, TP{tp}")
    return MemoryPoint(vocab, tp, tokens, path, max(r["shard_bytes"] for r in ranks), max(r["extra_bytes"] for r in ranks))


PADDING_RECIPE = REPO / "recipes" / "tiny" / "opd_general.yaml"


def dp_line(dp: int, samples: int, top_k: int) -> str:
    """Bytes each DP rank receives for one step of ``samples`` rollouts (vocabulary 151,936)."""
    ranks = _run_worker(dp, {"mode": "distribute", "vocab": 151936, "top_k": top_k, "samples": samples}, f"DP{dp}")
    step, shares = ranks[0]["step_bytes"], [r["received_bytes"] for r in ranks[1:]] or [0]
    if sum(r["samples"] for r in ranks) != samples:
        raise RuntimeError(f"DP{dp}: the shares hold {sum(r['samples'] for r in ranks)} samples, expected {samples}")
    return (f"DP{dp}: a step of {samples} samples (teacher top-{top_k}) is {step / 2**20:.2f} MiB; the most any rank "
            f"receives is {max(shares) / 2**20:.2f} MiB = {max(shares) / step:.3f} of it (1/DP: {1 / dp:.3f})")


def bench_scale(vocabs: list[int], tps: list[int], tokens: int, top_k: int, chunk_mib: float, gathered: bool,
                padding_budgets: list[int | None], student: Path, dps: list[int] = (), dp_samples: int = 256,
                log=print) -> list[str]:
    dp_lines = []
    for dp in dps:
        dp_lines.append(dp_line(dp, dp_samples, top_k))
        log(f"[bench] {dp_lines[-1]}")
    padding = []
    for budget in padding_budgets:
        overrides = [f"model.hf_path={student}"] + ([] if budget is None else [f"train.max_tokens_per_micro_batch={budget}"])
        padding.append((budget, padding_point(PADDING_RECIPE, overrides)))
        log(f"[bench] {_padding_line(*padding[-1])}")
    points = []
    for vocab in vocabs:
        for tp in tps:
            points.append(memory_point(vocab, tp, tokens, top_k, chunk_mib))
            log(f"[bench] {points[-1].line()}")
        if gathered:
            points.append(memory_point(vocab, 1, tokens, top_k, chunk_mib, "gathered"))
            log(f"[bench] {points[-1].line()}")
    lines = dp_lines + [_padding_line(*p) for p in padding] + [p.line() for p in points]
    for vocab in vocabs:
        sharded = {p.tp: p for p in points if p.vocab == vocab and p.path == "sharded"}
        if len(sharded) > 1:
            first, last = min(sharded), max(sharded)
            lines.append(f"V {vocab}: extra peak per rank TP{last} / TP{first} = "
                         f"{sharded[last].extra_bytes / sharded[first].extra_bytes:.2f} (1/TP: {first / last:.2f})")
        lines.append(f"V {vocab}: largest extra peak / own shard over TP {','.join(map(str, sorted(sharded)))}: "
                     f"{max(p.ratio for p in sharded.values()):.2f}x")
    return lines


def _padding_line(budget: int | None, fraction: float) -> str:
    how = "recipe's micro-batches" if budget is None else f"train.max_tokens_per_micro_batch={budget}"
    return f"padded share of a tiny-world OPD step ({PADDING_RECIPE.name}, {how}): {fraction:.1%}"


def padding_point(recipe: Path, overrides: list[str], steps: int = 3) -> float:
    """Mean ``train/padding_fraction`` over a short real ``opd run`` of ``recipe`` (no eval)."""
    with tempfile.TemporaryDirectory(prefix="opd-bench-pad-") as tmp:
        cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(recipe), f"train.steps={steps}", "eval.world_dir=null",
               "train.save_interval=0", f"run.output_dir={tmp}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"opd run failed ({' '.join(overrides)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return sum(r["train/padding_fraction"] for r in rows) / len(rows)
