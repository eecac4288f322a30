"""Where a stage runs on a cluster: the recipe's ``launch.slurm`` section (used by ``opd launch``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict


class ServerGroup(Strict):
    """SGLang servers on their own nodes of a Slurm job (rollout engines or one teacher)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    servers_per_node: int = Field(1, ge=1, description="SGLang servers per node, each on gpus_per_node / servers_per_node GPUs")
    port: int = Field(30000, ge=1024, le=65535, description="first port; server i on a node listens on port + i")
    model: str | None = Field(None, description="checkpoint to serve (default: the student / the teacher's `model`)")
    extra_args: list[str] = Field(default_factory=list, description="more `sglang.launch_server` arguments")

    @model_validator(mode="after")
    def _split(self) -> "ServerGroup":
        if self.gpus_per_node % self.servers_per_node:
            raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must be a multiple of servers_per_node ({self.servers_per_node})")
        return self


class TrainerGroup(Strict):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)


class SlurmConfig(Strict):
    """One heterogeneous Slurm job: trainer nodes (torchrun), rollout servers, teacher servers."""

    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    container_mounts: list[str] = Field(default_factory=list)
    workdir: str = Field(".", description="this repository on the cluster (inside the container)")
    env: dict[str, str] = Field(default_factory=dict)
    job_dir: str = Field("slurm_jobs", description="where the sbatch script and logs go (on the submitting host)")
    trainer: TrainerGroup = TrainerGroup()
    rollout: ServerGroup | None = Field(None, description="rollout.engine 'servers': SGLang rollout servers")
    teachers: dict[str, ServerGroup] = Field(default_factory=dict, description="teacher name -> its SGLang servers")
    server_timeout_s: int = Field(1800, ge=1, description="how long the trainer waits for every server's /health")


class LaunchConfig(Strict):
    slurm: SlurmConfig | None = None
