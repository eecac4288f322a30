"""Progress of a training loop: a rich progress bar on a terminal, plain log lines otherwise (and always
inside a Slurm job, whose step output goes to a log file even where the task's stdout reports a terminal)."""

from __future__ import annotations

import os
import sys


class StepProgress:
    def __init__(self, label: str, total: int, start: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._bar = None
        if enabled and sys.stdout.isatty() and "SLURM_JOB_ID" not in os.environ:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            print(f"[{self.label}] step {step}/{self.total} {info}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
