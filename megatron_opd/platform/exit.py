"""The one way a command refuses: ``error: ...`` on stderr, exit code 2 (every ``opd`` subcommand)."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
