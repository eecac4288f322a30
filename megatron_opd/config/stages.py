"""The training stages' recipe models: SFT and OPD / MOPD / GRPO."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.placement import LaunchConfig
from megatron_opd.config.teachers import RoutingSpec


class ParallelConfig(Strict):
    tp: int = Field(1, ge=1, description="tensor-parallel size: each layer's weights (and the vocabulary) split "
                    "over this many ranks")
    pp: int = Field(1, ge=1, description="pipeline-parallel size: the layers split into this many consecutive stages")
    dp: int = Field(1, ge=1, description="data-parallel size: model replicas, each training on its share of a "
                    "step's batch; the run needs tp x pp x dp processes")
    ep: int = Field(1, ge=1, description="expert-parallel size (MoE students): each rank holds num_experts / ep of "
                    "every layer's experts; carved out of the data-parallel ranks, so ep divides dp")

    @model_validator(mode="after")
    def _experts_over_replicas(self) -> "ParallelConfig":
        if self.dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp ({self.dp}): expert-parallel ranks are data-parallel "
                             "ranks for the attention")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class ChatDataConfig(Strict):
    train: str | list[str] = Field(description="jsonl/json/parquet file(s) (or hub id when online) with chat 'messages'")
    eval: str | None = Field(None, description="held-out file for eval loss")
    messages_field: str = Field("messages", description="the row key holding the chat messages ({role, content} "
                                "objects)")
    max_length: int = Field(512, ge=2, description="most tokens of a conversation as the chat template renders it; "
                            "longer ones are handled by `overlong`")
    overlong: Literal["truncate", "drop"] = Field(
        "drop", description="a conversation over max_length: drop: skipped (counted); truncate: cut to its first "
        "max_length tokens (skipped when no assistant token is left)")
    eval_max_rows: int = Field(256, ge=1, description="the eval loss uses at most this many held-out examples (the "
                               "first ones)")


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0, description="peak learning rate, reached at the end of warmup")
    min_lr: float = Field(1e-4, ge=0, description="learning rate the decay ends at, on the last optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="Adam's decoupled weight decay (AdamW), constant over the run")
    adam_beta1: float = Field(0.9, description="Adam's first-moment decay")
    adam_beta2: float = Field(0.95, description="Adam's second-moment decay")
    adam_eps: float = Field(1e-8, description="Adam's epsilon (added to the denominator)")
    clip_grad: float = Field(1.0, gt=0, description="clip the global gradient norm (L2, all parameters) to this")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0 to lr (0: start at lr)")
    decay_style: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay from lr to min_lr over the optimizer steps after warmup (the run's "
        "last step ends it); constant: lr throughout")


class TrainConfig(Strict):
    steps: int = Field(ge=1, description="optimizer steps to train (the learning-rate schedule's length)")
    global_batch_size: int = Field(ge=1, description="examples per optimizer step over all data-parallel ranks, drawn "
                                   "from reshuffled epochs of data.train")
    micro_batch_size: int = Field(1, ge=1, description="examples per forward/backward on a rank (gradients accumulate "
                                  "over the rank's share of the step); also the eval loss's micro-batch")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="micro-batches by token budget: each rank's examples of the step, longest first, fill a "
        "micro-batch while its rows x its longest row stay within this many tokens (a longer example trains alone); "
        "None: train.micro_batch_size rows each, in draw order")
    seed: int = Field(1234, description="seed of the data order (each epoch's shuffle) and of megatron's RNG")
    save_interval: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept on disk")
    eval_interval: int = Field(0, ge=0, description="eval every N steps (0: only before and after)")
    log_interval: int = Field(1, ge=1, description="write metrics (metrics.jsonl, TensorBoard) every N steps and at "
                              "the last")
    resume: bool = Field(True, description="continue from the newest checkpoint in run.output_dir/checkpoints when "
                         "there is one (false: start from model.hf_path)")
    resume_changed_config: bool = Field(False, description="resume even though the run directory's config differs "
                                        "from this one (by default the run stops, naming the keys)")
    hf_snapshots: bool = Field(False, description="also export an HF directory at every save (snapshots/step-N), "
                               "kept for a later stage to evaluate and pick from")


class WandbConfig(Strict):
    project: str = Field(min_length=1, description="the Weights & Biases project the run logs to")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: the run is written under <run.output_dir>/wandb/ and needs no network "
        "(`wandb sync` uploads it later); online: streamed to the W&B server (needs WANDB_API_KEY)")
    entity: str | None = Field(None, description="the W&B team or user (None: the API key's default)")
    name: str | None = Field(None, description="the W&B run's display name (None: run.name)")
    tags: list[str] = Field(default_factory=list, description="W&B tags of the run")


class RunConfig(Strict):
    name: str = Field("run", description="the run's name: `opd launch` titles its Slurm jobs and nemo-run "
                      "experiment with it; a cascade records it in results.json")
    output_dir: Path = Field(Path("outputs/run"), description="the run directory: checkpoints, metrics, config.yaml, "
                             "the final HF export (hf/); a cascade puts each stage in <output_dir>/<stage name>")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads of every trainer process and of every "
                                    "server the run starts (None: torch's default, one per core); on a small CPU box "
                                    "with rollout, teachers and trainer in their own processes, 1 each")
    memory_probe: bool = Field(False, description="log each rank's peak resident memory and the loss head's extra "
                               "memory (forward, backward) per step: memory/* metrics (Linux; for benchmarks)")
    save_on_signals: list[Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"],
        description="signals on which the run finishes its current step, writes a checkpoint and exits with 75 (run "
        "the same command to resume; a second signal exits at once): a Slurm time limit or preemption (SIGTERM), "
        "Ctrl-C (SIGINT), Slurm's warning before the limit (SIGUSR1, `opd launch` asks for it); [] keeps the "
        "default actions")
    wandb: WandbConfig | None = Field(
        None, description="also log to Weights & Biases (rank 0; the same metric names and steps as TensorBoard and "
        "metrics.jsonl; a resumed run continues the same W&B run id); None: TensorBoard and metrics.jsonl only")


class StageBase(Strict):
    """What every training stage has: where it writes, the student, its layout and optimizer."""

    run: RunConfig = Field(RunConfig(), description="where the run writes, and process-level settings")
    model: ModelConfig = Field(description="the student: its starting checkpoint and how it is built")
    parallel: ParallelConfig = Field(ParallelConfig(), description="the trainer's layout: tp x pp x dp processes")
    optim: OptimConfig = Field(OptimConfig(), description="Adam and its learning-rate schedule")
    launch: LaunchConfig = Field(LaunchConfig(), description="placement on a cluster, for `opd launch --executor "
                                 "slurm`")

    @model_validator(mode="after")
    def _placement(self) -> "StageBase":
        slurm = self.launch.slurm
        if slurm is not None:
            procs = slurm.trainer.nodes * slurm.trainer.procs
            if procs != self.parallel.world_size:
                unit = "processes" if slurm.trainer.procs_per_node else "GPUs"
                raise ValueError(f"launch.slurm.trainer: {slurm.trainer.nodes} nodes x {slurm.trainer.procs} {unit} = {procs} "
                                 f"processes, but parallel tp x pp x dp = {self.parallel.world_size}")
        return self


class SFTStageConfig(StageBase):
    kind: Literal["sft"] = Field(description="sft: supervised fine-tuning (next-token loss on assistant tokens)")
    data: ChatDataConfig = Field(description="the chat data to train (and evaluate the loss) on")
    train: TrainConfig = Field(description="steps, batch sizes, checkpoints and logging")

    @model_validator(mode="after")
    def _batch_layout(self) -> "SFTStageConfig":
        by_tokens = self.train.max_tokens_per_micro_batch is not None
        per_step = self.parallel.dp if by_tokens else self.train.micro_batch_size * self.parallel.dp
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                + ("parallel.dp" if by_tokens else "train.micro_batch_size x parallel.dp") + f" ({per_step})"
            )
        return self


class PromptDataConfig(Strict):
    train: list[str] = Field(min_length=1, description="jsonl/json/parquet files with chat 'messages' (+ 'domain' tags)")
    messages_field: str = Field("messages", description="the row key holding the chat messages; the prompt is the "
                                "conversation through its last user turn (a last assistant turn is the row's own "
                                "response)")
    domain_field: str = Field("domain", description="the row key holding the domain tag that routes a prompt to its "
                              "teachers (teachers.routes / default) and, with `reward`, to its verifier")
    max_prompt_length: int = Field(256, ge=2, description="prompts longer than this many tokens (chat template and "
                                   "generation prompt included) are skipped (counted)")
    over_teacher_window: Literal["skip", "error"] = Field(
        "skip", description="a row whose prompt as a teacher sees it (its context included) plus rollout.max_new_tokens "
        "is over that teacher's context window: skip: counted and skipped; error: the run stops before it starts, "
        "naming the first")


class RolloutConfig(Strict):
    engine: Literal["embedded", "embedded_server", "servers", "vllm"] = Field(
        "embedded", description="embedded: in-process on trainer rank 0; embedded_server: the run starts `replicas` x "
        "`opd serve --role rollout` on 127.0.0.1 (generation beside the trainer, not in it); servers: SGLang / "
        "`opd serve --role rollout` already running at `urls`; vllm: vLLM OpenAI servers (dev mode) at `urls`, or "
        "`replicas` the run starts on 127.0.0.1 from `vllm_python` (weights synced by disk, checked after each sync)")
    vllm_python: str | None = Field(None, description="vllm: the python of the vLLM virtual environment the run starts "
                                    "its servers from (default: $OPD_VLLM_PYTHON; tools/setup_vllm_venv.sh builds one)")
    reload_check_tol: float = Field(1e-3, gt=0, description="vllm: after every weight sync each server's "
                                    "log-probs of a fixed probe sequence must equal the trainer's within this (max "
                                    "absolute difference per token), else the run stops naming the server and the "
                                    "version (a reload that silently did nothing)")
    urls: list[str] = Field(default_factory=list, description="servers: base URLs of the running rollout servers "
                            "(http://host:port; launch.slurm.rollout fills them)")
    api_key_env: str | None = Field(None, description="servers: environment variable holding their API key")
    replicas: int = Field(1, ge=1, description="embedded_server, vllm: servers to start (vllm: when `urls` is empty)")
    max_staleness: int = Field(0, ge=0, description="how many optimizer steps older than the weights being trained the "
                               "weights that sampled a batch may be: 0 = strictly on-policy (exact reproduction); 1 = "
                               "batch k+1 is generated and scored while step k trains (one step off-policy, corrected "
                               "by truncated importance sampling against the sampler's log-probs)")
    sync: Literal["in_process", "disk", "distributed"] = Field(
        "in_process", description="how the student's weights reach the engine after each update: in_process: copied "
        "into the embedded engine (engine 'embedded' only); disk: safetensors buckets under <run dir>/sync, loaded by "
        "each server; distributed: broadcast over a weight-update group rank 0 forms with the servers")
    device: Literal["cpu", "cuda"] = Field("cpu", description="embedded engine (in process or its servers): where its "
                                           "model and KV cache live; cuda puts it on the rank's GPU (the GPU check)")
    n: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens whose probability "
                         "reaches this (1: off)")
    top_k: int = Field(-1, description="sample among the k most likely tokens (-1: off)")
    max_new_tokens: int = Field(96, ge=1, description="most tokens sampled per completion; one that reaches it is cut "
                                "(counted in the truncation rate, see guard)")
    batch_size: int = Field(256, ge=1, description="embedded engine: most sequences in one decode loop (a step's "
                            "batch up to this runs as one)")
    bucket_mb: int = Field(64, ge=1, description="weight-sync bucket size")
    timeout_s: float = Field(3600.0, gt=0, description="servers: one generation request (a step's share of prompts) "
                             "or weight update gives up after this; a timed-out request counts as the server failing, so "
                             "it must outlast the longest legitimate generation (4,096 tokens at a CPU engine's 0.2 s "
                             "each are 14 minutes)")
    on_policy_fraction: float = Field(1.0, ge=0, le=1, description="GKD's lambda: the share of each step's prompts "
                                      "whose samples are the student's own; the rest train on the row's own response "
                                      "(its last assistant turn), scored by the teachers like a rollout")

    @model_validator(mode="after")
    def _engine(self) -> "RolloutConfig":
        if self.engine == "embedded" and self.sync != "in_process":
            raise ValueError("rollout.engine 'embedded' lives in the trainer: use rollout.sync 'in_process'")
        if self.engine != "embedded" and self.sync == "in_process":
            raise ValueError(f"rollout.engine {self.engine!r} needs rollout.sync 'disk' or 'distributed'")
        if self.engine == "vllm" and self.sync != "disk":
            raise ValueError("rollout.engine 'vllm' reloads its weights from disk: use rollout.sync 'disk' (vLLM's "
                             "weight-transfer backends need CUDA; on CPU they silently do nothing)")
        return self


class LossConfig(Strict):
    kind: Literal["sampled_token", "topk_forward_kl", "topk_reverse_kl", "jsd"] = Field(
        "sampled_token", description="sampled_token: policy gradient on A_t = log p_T - log p_S; the others: "
        "differentiable divergences over each position's token set (loss.token_set; the teacher's top-k by default): "
        "topk_forward_kl with a tail bucket for the rest, topk_reverse_kl and jsd with both distributions "
        "renormalised over the set)")
    top_k: int = Field(0, ge=0, description="teacher top-k to request (needed by top-k losses and confidence weights)")
    token_set: Literal["teacher", "student", "union"] = Field(
        "teacher", description="the ids a top-k loss compares on, per position: the teacher's top-k; the student's "
        "top-k (from the rollout engine, loss.top_k of them; the teachers report their log-probs at those ids); "
        "or the union of both (Li et al. 2026, 'Rethinking OPD')")
    clip_low: float = Field(0.2, ge=0, description="sampled_token: PPO clips the ratio from below at 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="sampled_token: PPO clips the ratio from above at 1 + clip_high "
                             "(above clip_low: DAPO's clip-higher)")
    dual_clip: float | None = Field(None, gt=1, description="sampled_token: dual clip c bounds a negative-advantage "
                                    "token's loss by -c x A (None: off)")
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance sampling cap: every token's loss is weighted by "
                                  "min(p_old / p_sampler, cap), p_old the trainer's probability before the update and p_sampler the engine's, at any max_staleness "
                                  "(the engine's numerics differ from the trainer's even on-policy); None: off")
    kl_discount: float = Field(0.0, ge=0, le=1, description="sampled_token: discount gamma of the teacher advantage: "
                               "a token's advantage is the gamma-discounted sum of its own and the later tokens' "
                               "log-ratios (0: its own only)")
    logratio_clamp: float | None = Field(20.0, gt=0, description="clamp each token's teacher/student log-ratio to "
                                         "[-c, c] before it forms the teacher advantage (None: no clamp)")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: beta of beta KL(T || M) + (1 - beta) KL(S || M), "
                            "M = beta T + (1 - beta) S")
    chunk_mib: float = Field(16.0, gt=0, description="the loss head works on as many positions at a time as fit "
                             "this many MiB of fp32 vocabulary shard (recomputed in the backward): its extra memory "
                             "is the logits' gradient plus one chunk's temporaries, whatever the response length")
    epochs: int = Field(1, ge=1, description="optimizer steps on each rollout batch")
    normalize: Literal["token", "domain", "sequence"] = Field(
        "token", description="token: every completion token of the step weighs the same (DAPO's token mean); domain: "
        "each domain's tokens share an equal part of the loss (MOPD: short-answer domains are not drowned by long "
        "ones); sequence: each sample's tokens share an equal part (GRPO's original per-sample mean, verl's "
        "seq-mean-token-mean: long samples no longer dominate the step; per token they weigh less)")

    domain_weights: dict[str, float] = Field(
        default_factory=dict, description="normalize 'domain': each named domain's share of the loss is its weight "
        "over the sum of the step's domains' weights (an unnamed domain weighs 1); e.g. `{strings: 0.5}` halves a "
        "domain whose larger per-token gap would otherwise dominate MOPD's shared, clipped update")

    @model_validator(mode="after")
    def _topk(self) -> "LossConfig":
        if self.domain_weights and self.normalize != "domain":
            raise ValueError(f"loss.domain_weights sets domains' shares of the loss: it needs loss.normalize 'domain', "
                             f"not {self.normalize!r}")
        bad = {d: w for d, w in self.domain_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"loss.domain_weights {bad}: each weight must be > 0 (leave a domain out of the data "
                             "to drop it)")
        if self.kind != "sampled_token" and self.top_k < 1:
            raise ValueError(f"loss.kind {self.kind!r} needs loss.top_k >= 1")
        if self.token_set != "teacher" and self.kind == "sampled_token":
            raise ValueError(f"loss.token_set {self.token_set!r} is for the top-k losses, not loss.kind 'sampled_token'")
        return self


class RewardConfig(Strict):
    """Verifiable rewards (GRPO): each completion is checked by its domain's verifier."""

    kind: Literal["verifier"] = Field("verifier", description="verifier (the only kind): the prompt's domain "
                                      "verifier checks the completion against the row's `meta` (correct: 1, else 0)")
    normalize_std: bool = Field(True, description="GRPO: divide group-centred rewards by the group std")
    lambda_opd: float = Field(0.0, ge=0, description="with teachers too: A = A_task + lambda_opd * A_opd")
    format_weight: float = Field(0.0, ge=0, description="reward = correct + format_weight * format_score")


class GuardConfig(Strict):
    min_abs_advantage: float = Field(1e-4, ge=0, description="warn when mean |A| stays below this (teacher == student?)")
    patience: int = Field(3, ge=1, description="consecutive steps a guard's condition must hold before it acts (the "
                          "|A| warning; the truncation warning or stop)")
    max_truncation_rate: float = Field(0.9, gt=0, le=1, description="the length-inflation guard: acts when more than "
                                       "this share of a step's samples runs to rollout.max_new_tokens, `patience` steps "
                                       "in a row (rollout/truncation_rate)")
    stop_on_guard: bool = Field(False, description="the length-inflation guard stops the run (else it warns and the "
                                "run goes on)")


class OPDTrainConfig(Strict):
    steps: int = Field(ge=1, description="training steps, each sampling and scoring a batch and taking loss.epochs "
                       "optimizer steps on it")
    prompts_per_step: int = Field(ge=1, description="prompts drawn per step (reshuffled epochs of data.train), each "
                                  "sampled rollout.n times")
    micro_batch_size: int = Field(4, ge=1, description="samples per forward/backward on a rank (gradients "
                                  "accumulate over the rank's share of the step)")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="micro-batches by token budget: the samples, longest first, fill a micro-batch while "
        "its rows x its longest row stay within this many tokens (a longer sample trains alone); None: "
        "train.micro_batch_size rows each")
    seed: int = Field(1234, description="seed of the prompt order, the rollouts' sampling (per step), eval "
                      "sampling and megatron's RNG")
    save_interval: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept on disk")
    eval_interval: int = Field(0, ge=0, description="eval every N steps (0: before and after only)")
    log_interval: int = Field(1, ge=1, description="write metrics (metrics.jsonl, TensorBoard) every N steps and at "
                              "the last")
    resume: bool = Field(True, description="continue from the newest checkpoint in run.output_dir/checkpoints when "
                         "there is one (false: start from model.hf_path)")
    resume_changed_config: bool = Field(False, description="resume even though the run directory's config differs "
                                        "from this one (by default the run stops, naming the keys)")
    hf_snapshots: bool = Field(False, description="also export an HF directory at every save (snapshots/step-N)")
    routing_replay: bool = Field(False, description="MoE students: the rollout engine returns the experts each layer "
                                 "chose at every token (SGLang: return_routed_experts, its servers started with "
                                 "--enable-return-routed-experts) and the trainer's forward uses them (megatron-core's "
                                 "RouterReplay) in place of its own routing, so trainer and sampler compute the same "
                                 "experts; false: the trainer routes again")


class EvalConfig(Strict):
    world_dir: Path | None = Field(None, description="tiny-world directory with data/<domain>/test.jsonl (None: no eval)")
    domains: list[str] = Field(default_factory=list, description="domains to evaluate (empty: every domain under "
                               "world_dir/data)")
    samples: int = Field(100, ge=1, description="held-out rows per domain: the first `samples` of its test.jsonl (in "
                         "a cascade, the reported rows)")
    max_new_tokens: int = Field(96, ge=1, description="most tokens generated per eval completion")


class OPDStageConfig(StageBase):
    """On-policy distillation (one teacher), MOPD (several, routed by domain tag), or GRPO
    (``kind: grpo``: verifier rewards, optionally plus a teacher's advantage)."""

    kind: Literal["opd", "grpo"] = Field(description="opd: distillation from `teachers` (several, routed by domain "
                                         "tag: MOPD); grpo: verifier rewards (`reward`), optionally plus the "
                                         "teachers' advantage")
    data: PromptDataConfig = Field(description="the prompts to sample completions for")
    rollout: RolloutConfig = Field(RolloutConfig(), description="the engine that samples the completions, and how")
    teachers: RoutingSpec | None = Field(None, description="the teachers and which of them score each domain tag "
                                         "(kind opd needs them; None: GRPO on rewards alone)")
    reward: RewardConfig | None = Field(None, description="verifiable rewards (kind grpo needs them)")
    loss: LossConfig = Field(LossConfig(), description="the training loss")
    guard: GuardConfig = Field(GuardConfig(), description="checks on every step: no learning signal, truncated "
                               "samples")
    train: OPDTrainConfig = Field(description="steps, batch sizes, checkpoints and logging")
    eval: EvalConfig = Field(EvalConfig(), description="held-out domain accuracy before and after training (and "
                             "every train.eval_interval steps)")

    @model_validator(mode="after")
    def _layout(self) -> "OPDStageConfig":
        samples = self.train.prompts_per_step * self.rollout.n
        by_tokens = self.train.max_tokens_per_micro_batch is not None
        per_step = self.parallel.dp if by_tokens else self.train.micro_batch_size * self.parallel.dp
        if samples % per_step:
            raise ValueError(f"train.prompts_per_step x rollout.n ({samples}) must be a multiple of "
                             + ("parallel.dp" if by_tokens else "train.micro_batch_size x parallel.dp") + f" ({per_step})")
        if self.teachers is not None and self.teachers.weighting == "confidence" and self.loss.top_k < 1:
            raise ValueError("teachers.weighting 'confidence' needs loss.top_k >= 1")
        if self.kind == "opd" and self.teachers is None:
            raise ValueError("kind 'opd' needs `teachers`")
        for teacher in (self.teachers.teachers.values() if self.teachers else []):
            if teacher.model is not None and str(teacher.model) == "self":  # OPSD: the student's starting weights
                teacher.model = self.model.hf_path
        live = sorted(n for n, t in (self.teachers.teachers.items() if self.teachers else []) if t.live)
        if live and (self.rollout.engine in ("embedded", "vllm") or self.rollout.max_staleness > 0 or any(self.teachers.teachers[n].urls or
                                                               self.teachers.teachers[n].cross_tokenizer for n in live)):
            raise ValueError(f"teachers {live}: model 'live' is scored by the rollout servers (their current weights): "
                             "needs rollout.engine 'embedded_server' or 'servers', rollout.max_staleness 0 (no batch "
                             "scored while the servers take a weight sync), and no urls / cross_tokenizer of its own")
        crossing = sorted(n for n, t in (self.teachers.teachers.items() if self.teachers else []) if t.cross_tokenizer)
        if crossing and (self.loss.token_set != "teacher" or self.teachers.weighting == "confidence"):
            raise ValueError(f"teachers {crossing} have their own tokenizer (cross_tokenizer): student token sets "
                             "(the student's ids asked of the teacher) and confidence weighting are not built for "
                             "them; use loss.token_set 'teacher' with teachers.weighting 'fixed'")
        if self.rollout.on_policy_fraction < 1 and (self.kind == "grpo" or self.loss.kind == "sampled_token"):
            raise ValueError(f"rollout.on_policy_fraction {self.rollout.on_policy_fraction} mixes the rows' own "
                             "responses into the steps: that needs a divergence loss (loss.kind topk_forward_kl, "
                             "topk_reverse_kl or jsd); the sampled-token policy gradient and GRPO need samples the "
                             "student drew")
        if self.loss.token_set != "teacher" and self.rollout.engine == "vllm":
            raise ValueError(f"loss.token_set {self.loss.token_set!r}: the student's top-k is asked of the rollout "
                             "engine through SGLang's scoring API, which vLLM does not have; use loss.token_set 'teacher'")
        if self.loss.token_set != "teacher" and self.teachers is not None:
            if self.teachers.stream:
                raise ValueError(f"loss.token_set {self.loss.token_set!r}: the student's top-k is asked of the engine "
                                 "once the step is generated; set teachers.stream false")
            other = sorted(n for n, t in self.teachers.teachers.items() if t.backend != "sglang")
            if other:
                raise ValueError(f"loss.token_set {self.loss.token_set!r} needs SGLang-API teachers (token_ids_logprob); "
                                 f"{other} are not")
        if self.kind == "grpo" and self.reward is None:
            raise ValueError("kind 'grpo' needs `reward`")
        if self.kind == "grpo" and self.loss.kind != "sampled_token":
            raise ValueError("kind 'grpo' trains with loss.kind 'sampled_token' (a policy gradient)")
        if self.reward is not None and self.reward.lambda_opd > 0 and self.teachers is None:
            raise ValueError("reward.lambda_opd > 0 needs `teachers`")
        if self.train.routing_replay:
            if self.rollout.engine == "vllm":
                raise ValueError("train.routing_replay: the experts are asked of the engine in SGLang's API "
                                 "(return_routed_experts), which vLLM's server does not have; use an SGLang or embedded engine")
            if self.model.recompute != "none":
                raise ValueError("train.routing_replay with model.recompute 'full': the recomputed forward would route "
                                 "again; set model.recompute 'none'")
            if self.rollout.on_policy_fraction < 1:
                raise ValueError("train.routing_replay: the rows' own responses (rollout.on_policy_fraction < 1) were "
                                 "not sampled, so no engine routed them; use on_policy_fraction 1")
        slurm = self.launch.slurm
        if self.rollout.engine == "servers" and not self.rollout.urls and (slurm is None or slurm.rollout is None):
            raise ValueError("rollout.engine 'servers' needs rollout.urls (or launch.slurm.rollout, whose servers fill them)")
        if slurm is not None:
            if slurm.rollout is not None and self.rollout.engine != "servers":
                raise ValueError("launch.slurm.rollout places SGLang rollout servers: set rollout.engine 'servers'")
            unknown = sorted(set(slurm.teachers) - set(self.teachers.teachers if self.teachers else {}))
            if unknown:
                raise ValueError(f"launch.slurm.teachers: {unknown} are not in teachers.teachers")
            for name in slurm.teachers:
                spec = self.teachers.teachers[name]  # type: ignore[union-attr]
                if spec.model is None and slurm.teachers[name].model is None:
                    raise ValueError(f"launch.slurm.teachers.{name}: no checkpoint to serve (give `model` here or in teachers)")
        return self


StageConfig = Union[SFTStageConfig, OPDStageConfig]
