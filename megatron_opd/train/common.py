"""Pieces every training loop shares: train-state capture/restore, cross-stage metric reduction."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.train.optim import TrainState


def capture_train_state(state: TrainState, step: int, consumed_samples: int,
                        counters: dict[str, Any] | None = None) -> dict[str, Any]:
    """This rank's state besides the weights and optimizer (which the checkpoint shards): schedule,
    RNG, data position and (rank 0) the server pools' counters (weights_only-loadable)."""
    from megatron.core import tensor_parallel

    return {"counters": counters or {},
        "scheduler": state.scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        },
        "data": {"step": step, "consumed_samples": consumed_samples},
    }


def restore_train_state(state: TrainState, saved: dict[str, Any]) -> int:
    """Restore the schedule and (when saved at this layout) the RNG; returns the step to continue from."""
    from megatron.core import tensor_parallel

    state.scheduler.load_state_dict(saved["scheduler"])
    if "rng" in saved:
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        tensor_parallel.get_cuda_rng_tracker().set_states(saved["rng"]["tracker"])
    return int(saved["data"]["step"])


def sum_from_last_stage(results: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Sum ``keys`` of the last pipeline stage's per-micro-batch metrics over micro-batches and DP
    ranks; every rank gets the totals. TP ranks of the last stage hold identical values, so only
    TP rank 0 contributes."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(len(keys), dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for record in results:
            totals += torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        from megatron_opd.platform.dist import comm_device

        totals = totals.to(comm_device())
        dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))
