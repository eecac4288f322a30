"""The one way a command refuses: ``error: ...`` on stderr, exit code 2 (every ``opd`` subcommand); and the
way a process that has loaded the whole stack ends once its work is done."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def exit_now(code: int) -> NoReturn:
    """End ``opd`` (every command: a forked rank, a server, a one-process run) or the process that forks the
    ranks without the interpreter's teardown. Each has torch,
    megatron-core and transformers loaded, whose module teardown costs seconds of CPU a process (~3 s a rank,
    measured on these 2 cores: 12 s for a 4-rank job's exit) and does nothing a finished run needs: what a
    run writes is written and closed by the code that opened it (``with`` blocks, the metrics logger's
    close), and a forked child must not run the atexit handlers it inherited from its parent anyway."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(code)
