"""The step's last phase, on every rank: the loss's metric sums totalled (every rank gets the same
totals) into per-token means, the guards, the audit of trained samples, the progress line, and
metrics.jsonl + TensorBoard (rank 0). What rank 0 measured about the step's rollouts arrives with
the batch (``Produced.metrics``, :mod:`megatron_opd.train.opd.step_maker`)."""

from __future__ import annotations

from typing import Any

from megatron_opd.config import OPDStageConfig
from megatron_opd.records import Produced, Update
from megatron_opd.train.common import sum_from_last_stage
from megatron_opd.train.progress import StepProgress
from megatron_opd.train.session import StudentSession


class GuardStop(RuntimeError):
    """A guard with ``guard.stop_on_guard`` stopped the run (a user-facing stop: one line, no traceback)."""


PHASES = ("rollout", "scoring", "train", "sync")
LOSS_SUMS = ("loss_sum", "tokens", "sampled_tokens", "adv_sum", "adv_abs_sum", "adv_sq_sum", "kl_sum", "mismatch_abs_sum", "entropy_sum",
             "positions_sum", "real_positions_sum", "real_positions_sq_sum")


def loss_sum_keys(kind: str) -> tuple[str, ...]:
    """The sums ``opd_loss`` produces for a configuration (known on every rank)."""
    return LOSS_SUMS + (("clipped_tokens",) if kind == "sampled_token" else ("topk_overlap_sum", "token_set_size_sum"))


def train_metrics(totals: dict[str, float], grad_norm: float, lr: float) -> dict[str, Any]:
    n = max(totals["tokens"], 1.0)
    sampled = max(totals.get("sampled_tokens", totals["tokens"]), 1.0)
    mean_adv = totals["adv_sum"] / n
    out = {"train/loss": totals["loss_sum"] / n, "train/grad_norm": grad_norm, "train/lr": lr,
           "train/tokens": totals["tokens"], "opd/advantage_mean": mean_adv,
           "opd/advantage_abs_mean": totals["adv_abs_sum"] / n,
           "opd/advantage_std": max(totals["adv_sq_sum"] / n - mean_adv ** 2, 0.0) ** 0.5,
           # over the tokens the student sampled: a row's own response (GKD mixing) estimates no reverse KL
           "opd/reverse_kl": totals["kl_sum"] / sampled, "opd/train_inference_mismatch": totals["mismatch_abs_sum"] / sampled,
           "train/padding_fraction": 1.0 - totals["real_positions_sum"] / max(totals["positions_sum"], 1.0),
           "train/positions": totals["real_positions_sum"], "train/positions_sq": totals["real_positions_sq_sum"]}
    for key, name in (("clipped_tokens", "opd/clip_fraction"), ("entropy_sum", "opd/student_entropy"),
                      ("topk_overlap_sum", "opd/topk_overlap"), ("token_set_size_sum", "opd/token_set_size")):
        if key in totals:
            out[name] = totals[key] / n
    return out


class StepLog:
    """Per step: the metric totals (a collective: every rank gets them), the guards, the audit of
    trained samples, the progress line, metrics.jsonl + TensorBoard (rank 0)."""

    def __init__(self, cfg: OPDStageConfig, session: StudentSession) -> None:
        self.cfg, self.session = cfg, session
        self.keys = loss_sum_keys(cfg.loss.kind)
        self.progress = StepProgress("opd", cfg.train.steps, session.start_step, session.is_rank0)
        self.times: dict[str, float] = {}
        self.quiet = self.truncated = 0

    def step(self, done: int, produced: Produced | None, update: Update, seconds: dict[str, float]) -> dict[str, Any]:
        totals = sum_from_last_stage(update.results, self.keys)
        metrics = dict(produced.metrics) if produced is not None else {}
        metrics.update(train_metrics(totals, update.grad_norm, update.lr))
        metrics.update(update.router)
        metrics.update({f"time/{name}_s": value for name, value in seconds.items()})
        metrics.update({"time/train_s": update.seconds,
                        "throughput/train_tokens_per_s": totals["tokens"] / max(update.seconds, 1e-9)})
        if produced is not None:  # the audit: every sample of the step, trained once
            batch = produced.batch
            self.session.metrics.log_samples(done, {"prompt_rows": batch.prompt_rows.tolist(),
                                                    "weight_versions": batch.weight_versions.tolist()})
        for phase in PHASES:
            self.times[phase] = self.times.get(phase, 0.0) + metrics.get(f"time/{phase}_s", 0.0)
        self._guards(metrics, done)
        return metrics

    def write(self, done: int, metrics: dict[str, Any]) -> None:
        if done % self.cfg.train.log_interval == 0 or done == self.cfg.train.steps:
            self.session.metrics.log(done, metrics)
            self.progress.update(done, f"kl {metrics['opd/reverse_kl']:.4f} |A| {metrics['opd/advantage_abs_mean']:.4f} "
                                       f"loss {metrics['train/loss']:.4f} " + " ".join(
                                           f"{p} {metrics.get(f'time/{p}_s', 0.0):.1f}s" for p in PHASES))

    def close(self) -> None:
        self.progress.close()

    def _guards(self, metrics: dict[str, Any], step: int) -> None:
        guard, rank0 = self.cfg.guard, self.session.is_rank0
        self.quiet = self.quiet + 1 if metrics["opd/advantage_abs_mean"] < guard.min_abs_advantage else 0
        self.truncated = self.truncated + 1 if metrics.get("rollout/truncation_rate", 0.0) > guard.max_truncation_rate else 0
        if self.quiet >= guard.patience and rank0:
            print(f"[opd] warning: mean |advantage| < {guard.min_abs_advantage} for {self.quiet} steps at step {step}: "
                  "no learning signal (is the teacher the student? do all samples of a prompt get the same reward?)",
                  flush=True)
        if self.truncated >= guard.patience:
            message = (f"[opd] guard: more than {guard.max_truncation_rate:.0%} of samples hit rollout.max_new_tokens "
                       f"for {self.truncated} steps (length inflation / repetition)")
            if guard.stop_on_guard:
                raise GuardStop(message.removeprefix("[opd] ") + ": stopped (guard.stop_on_guard); the last "
                                "checkpoint is kept")
            if rank0:
                print(message, flush=True)
