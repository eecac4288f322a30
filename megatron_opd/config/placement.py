"""Where a stage runs on a cluster: the recipe's ``launch.slurm`` section (used by ``opd launch``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict


class ServerGroup(Strict):
    """Servers on their own nodes of a Slurm job (rollout engines or one teacher): SGLang on GPUs, or
    the embedded engine (``opd serve``) on CPU nodes."""

    nodes: int = Field(1, ge=1, description="nodes of this group, each running servers_per_node servers")
    gpus_per_node: int = Field(8, ge=0, description="GPUs requested per node (sglang: split evenly among the "
                               "node's servers, each tensor-parallel over its share); 0: CPU nodes (engine embedded)")
    servers_per_node: int = Field(1, ge=1, description="servers per node (SGLang: each on gpus_per_node / servers_per_node GPUs)")
    port: int = Field(30000, ge=1024, le=65535, description="first port; server i on a node listens on port + i")
    model: str | None = Field(None, description="checkpoint to serve (default: the student / the teacher's `model`)")
    engine: Literal["sglang", "embedded"] = Field("sglang", description="sglang: `sglang.launch_server` on the node's "
                                                  "GPUs; embedded: `opd serve` (CPU)")
    host: str = Field("0.0.0.0", description="bind address (every server requires the job's API key): the "
                      "trainer reaches the servers from other nodes; "
                      "127.0.0.1 where every node is this machine")
    extra_args: list[str] = Field(default_factory=list, description="more server arguments")

    @model_validator(mode="after")
    def _split(self) -> "ServerGroup":
        if self.engine == "sglang":
            if self.gpus_per_node < 1:
                raise ValueError("engine 'sglang' needs gpus_per_node >= 1 (engine 'embedded' serves on CPU)")
            if self.gpus_per_node % self.servers_per_node:
                raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must be a multiple of servers_per_node ({self.servers_per_node})")
        return self


class TrainerGroup(Strict):
    nodes: int = Field(1, ge=1, description="trainer nodes (torchrun --nnodes); nodes x processes per node must be "
                        "tp x pp x dp")
    gpus_per_node: int = Field(8, ge=0, description="GPUs requested per trainer node, one process each unless "
                               "procs_per_node says otherwise (0: CPU nodes)")
    procs_per_node: int | None = Field(None, ge=1, description="trainer processes per node (default: one per GPU; "
                                       "CPU nodes: set it, with gpus_per_node 0)")

    @property
    def procs(self) -> int:
        return self.procs_per_node or self.gpus_per_node

    @model_validator(mode="after")
    def _procs(self) -> "TrainerGroup":
        if self.procs < 1:
            raise ValueError("launch.slurm.trainer: gpus_per_node 0 needs procs_per_node (processes per CPU node)")
        return self


class SlurmConfig(Strict):
    """One heterogeneous Slurm job: trainer nodes (torchrun), rollout servers, teacher servers."""

    account: str | None = Field(None, description="Slurm account the job is charged to (None: the user's default)")
    partition: str | None = Field(None, description="Slurm partition (None: the cluster's default)")
    time: str = Field("04:00:00", description="the job's time limit (sbatch --time, e.g. HH:MM:SS); in a cascade, "
                      "each stage's job")
    container_image: str | None = Field(None, description="container image every group runs in (pyxis "
                                        "--container-image; None: on the host)")
    container_mounts: list[str] = Field(default_factory=list, description="container mounts, "
                                        "'host_path:container_path' each")
    workdir: str = Field(".", description="this repository on the cluster (inside the container)")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables set for every group (trainer "
                                "and servers)")
    job_dir: str = Field("slurm_jobs", description="where `opd launch` has nemo-run write the sbatch script, the logs and "
                         "the experiment's records, on the submitting host (`opd launch --job-dir` overrides it)")
    trainer: TrainerGroup = Field(TrainerGroup(), description="the trainer's nodes (torchrun); a cascade's stage "
                                  "jobs use one node")
    rollout: ServerGroup | None = Field(None, description="rollout.engine 'servers': SGLang rollout servers")
    teachers: dict[str, ServerGroup] = Field(default_factory=dict, description="teacher name -> its SGLang servers")
    server_timeout_s: int = Field(1800, ge=1, description="how long the trainer waits for every server's /health")
    signal_grace_s: int | None = Field(
        300, ge=60, description="Slurm sends the trainer SIGUSR1 this many seconds before the time limit (sbatch "
        "--signal=USR1@N; Slurm may send it up to 60 s earlier): the run finishes its step, writes a checkpoint and "
        "exits. Cover one step plus one checkpoint save. None: no warning (the limit's SIGTERM is then the only one)")
    monitor_interval_s: int = Field(60, ge=1, description="a het job's batch script checks its groups this often; "
                                    "when one has ended it waits this long again, then stops the others (nemo-run's "
                                    "monitor): a finished job ends up to twice this after its trainer")
    requeue: bool = Field(True, description="a job that stopped on a signal with a checkpoint requeues itself "
                          "(scontrol requeue) and resumes from that checkpoint; Slurm caps the requeues of a job "
                          "at its MaxBatchRequeue (5 by default)")


class LaunchConfig(Strict):
    slurm: SlurmConfig | None = Field(None, description="the Slurm job `opd launch --executor slurm` submits (None: "
                                      "no Slurm placement)")
