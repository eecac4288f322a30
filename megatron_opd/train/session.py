"""Open a trainable student: distributed init, model build, DDP/optimizer, resume or fresh load.

Every training stage (SFT, OPD/MOPD, GRPO) starts from :func:`open_student` and saves through
:func:`save_step`, so checkpoint/resume behaves the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_opd.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig
from megatron_opd.model import ModelBundle, build_model, load_hf_config, load_hf_weights
from megatron_opd.model.bridge import save_hf_checkpoint
from megatron_opd.model.hf_config import num_experts
from megatron_opd.model.checkpoint import find_latest, load_checkpoint, save_checkpoint
from megatron_opd.platform import DistInfo, init_distributed
from megatron_opd.train.common import capture_train_state, restore_train_state
from megatron_opd.train.metrics import MetricsLogger
from megatron_opd.train.optim import OptimSettings, TrainState, wrap_for_training


@dataclass
class StudentSession:
    info: DistInfo
    bundle: ModelBundle
    state: TrainState
    start_step: int
    out_dir: Path
    metrics: MetricsLogger
    hf_path: Path
    resumed_counters: dict  # the server pools' counters at the checkpoint resumed from ({} when fresh)
    load_seconds: float | None = None  # loading the checkpoint resumed from (None when fresh)

    @property
    def is_rank0(self) -> bool:
        return self.info.rank == 0

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"


def optim_settings(optim: OptimConfig, total_steps: int) -> OptimSettings:
    return OptimSettings(
        lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps, clip_grad=optim.clip_grad,
        warmup_steps=optim.warmup_steps, decay_steps=total_steps, decay_style=optim.decay_style,
    )


def open_student(
    model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig, out_dir: Path, tag: str,
    optimizer_steps: int | None = None, run: RunConfig | None = None, recipe: dict | None = None,
) -> StudentSession:
    """``run`` / ``recipe``: the run's settings and resolved recipe, for the metrics sink (W&B's run name
    and config). ``optimizer_steps``: the LR schedule's length when it differs from ``train.steps`` (OPD with
    ``loss.epochs`` optimizer steps per rollout batch)."""
    info = init_distributed(parallel.tp, parallel.pp, parallel.dp, train.seed, ep=parallel.ep)
    dtype = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
    overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if model.recompute == "full" else {}
    hf_config = load_hf_config(model.hf_path)
    if num_experts(hf_config):
        overrides.update(model.moe.overrides(), moe_enable_routing_replay=getattr(train, "routing_replay", False))
    bundle = build_model(hf_config, dtype=dtype, vocab_divisible_by=model.vocab_divisible_by, initialize=False,
                         **overrides)  # its weights: the HF model's or the checkpoint's, loaded below
    state = wrap_for_training(bundle, optim_settings(optim, optimizer_steps or train.steps))
    ckpt_root = out_dir / "checkpoints"
    latest = find_latest(ckpt_root) if train.resume and ckpt_root.exists() else None
    start_step, saved, load_seconds = 0, None, None
    if latest is not None:
        loading = time.perf_counter()
        saved = load_checkpoint(latest, bundle, state.optimizer)
        load_seconds = time.perf_counter() - loading
        start_step = restore_train_state(state, saved) if saved else 0
        if info.rank == 0:
            note = "" if saved is None or "rng" in saved else " (saved at another layout: resharded, RNG fresh)"
            print(f"[{tag}] resumed from {latest} at step {start_step}{note}; loaded in {load_seconds:.1f} s", flush=True)
    else:
        load_hf_weights(bundle, model.hf_path)
    if saved is None:  # fresh weights: bf16 optimizers' fp32 main params start as copies of them
        state.optimizer.reload_model_params()
    metrics = MetricsLogger(out_dir, info.rank == 0, resume_step=start_step, wandb=run.wandb if run else None,
                            run_name=run.name if run else tag, run_config=recipe)
    return StudentSession(info, bundle, state, start_step, out_dir, metrics, Path(model.hf_path),
                          dict((saved or {}).get("counters") or {}), load_seconds)


def save_step(session: StudentSession, step: int, consumed_samples: int, keep_last: int,
              hf_snapshot: bool = False, counters: dict | None = None) -> Path:
    """Checkpoint weights + optimizer/scheduler/RNG/data position (collective); with ``hf_snapshot``
    also an HF directory ``snapshots/step-N`` that later stages can evaluate and serve."""
    path = save_checkpoint(
        session.ckpt_root, step, session.bundle, session.state.optimizer,
        capture_train_state(session.state, step, consumed_samples, counters),
        keep_last=keep_last, tokenizer_src=session.hf_path,
    )
    if hf_snapshot:
        save_hf_checkpoint(session.bundle, session.out_dir / "snapshots" / f"step-{step:06d}", tokenizer_src=session.hf_path)
    return path
