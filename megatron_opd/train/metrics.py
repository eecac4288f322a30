"""Metrics sink of a run: ``metrics.jsonl`` (one record per log event) + TensorBoard, and
``samples.jsonl`` (which samples each step trained on: an audit that no sample is trained twice or
lost), rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.samples_path = out_dir / "samples.jsonl"
        self._writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.samples_path):
            _truncate_after(path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

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


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps that were computed after the checkpoint we resume from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
