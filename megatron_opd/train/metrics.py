"""Metrics sink of a run: ``metrics.jsonl`` (one record per log event) + TensorBoard (+ Weights & Biases
when ``run.wandb`` is set: the same names and steps), and ``samples.jsonl`` (which samples each step
trained on: an audit that no sample is trained twice or lost), rank 0 only."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from megatron_opd.config.stages import WandbConfig


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0, wandb: WandbConfig | None = None,
                 run_name: str = "run", run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.samples_path = out_dir / "samples.jsonl"
        self._writer = None
        self._wandb_run = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.samples_path):
            _truncate_after(path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if wandb is not None:
            self._wandb_run = open_wandb_run(wandb, out_dir, run_name, run_config or {})

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

    def log_samples(self, step: int, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.samples_path.open("a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def open_wandb_run(cfg: WandbConfig, out_dir: Path, run_name: str, run_config: dict):
    """A W&B run under ``out_dir/wandb``. Its id is kept in ``out_dir/wandb_id``, so a resumed run logs
    to the same W&B run (offline: one more offline directory with that id, which `wandb sync` merges).
    W&B keeps the first value it received for a step: after a crash, the steps between the checkpoint
    and the crash are logged again and W&B (online) keeps their first values; metrics.jsonl is the record."""
    try:
        import wandb
    except ImportError as e:  # preflight checks this before any process starts; here for direct callers
        raise RuntimeError("run.wandb is set but the wandb package is not installed: "
                           "pip install 'megatron-opd[wandb]' (or unset run.wandb)") from e
    id_file = out_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
    id_file.write_text(run_id + "\n")
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True, save_code=False)
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, tags=cfg.tags or None,
                      mode=cfg.mode, dir=str(out_dir), id=run_id, resume="allow", config=run_config,
                      settings=settings)


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps that were computed after the checkpoint we resume from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
