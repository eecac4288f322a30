"""Launchers: Slurm (and local) jobs through nemo-run."""
