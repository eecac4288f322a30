"""What trainer rank 0 does for each step's batch, in two halves the producer can run apart:
``generate`` (draw the step's prompts, sample ``rollout.n`` completions each) and ``finish``
(score every completion token with its routed teachers — or verify it, for GRPO — and tensorize).

Both advantages' inputs are made here: GRPO's task advantage (verifier rewards, group-normalised)
and the teachers' mixed log-probs that the loss turns into the OPD advantage against the student's
own; :func:`build_step_batch` packs them, with the samples, into one
:class:`~megatron_opd.records.StepBatch`. Below it, what rank 0 logs about a step's rollouts."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from megatron_opd.algo.advantages import grpo_advantages, mix_teacher_logprobs, on_policy_prompts
from megatron_opd.algo.token_sets import ids_to_score, teacher_at, token_set
from megatron_opd.config import OPDStageConfig
from megatron_opd.data.chat import global_batch_indices
from megatron_opd.model.moe import expert_load
from megatron_opd.records import (DATASET, Generated, Produced, Prompt, Rollout, Sample, SampleScores, SamplingParams,
                                  StepBatch, TeacherTopK, version_number)
from megatron_opd.teachers.service import TeacherSet
from megatron_opd.train.opd.engine import RolloutEngine


class StepMaker:
    def __init__(self, cfg: OPDStageConfig, prompts: list[Prompt], engine: RolloutEngine, teachers: TeacherSet | None,
                 eos_id: int, decode: Callable[[list[int]], str]) -> None:
        self.cfg, self.prompts, self.engine, self.teachers = cfg, prompts, engine, teachers
        self.eos_id, self.decode = eos_id, decode

    def generate(self, step: int) -> Generated:
        """Sample the step's prompts; with teachers, their scoring starts while generation runs.
        With ``rollout.on_policy_fraction`` < 1 only that share of the prompts is sampled; the
        others' ``n`` samples are the row's own response (listed after the sampled ones)."""
        tcfg, rcfg = self.cfg.train, self.cfg.rollout
        drawn = [self.prompts[i] for i in global_batch_indices(len(self.prompts), tcfg.seed, step, tcfg.prompts_per_step)]
        sampled = on_policy_prompts(len(drawn), rcfg.on_policy_fraction,
                                    torch.Generator().manual_seed(tcfg.seed * 100_003 + step)).tolist()
        chosen = [p for p, on in zip(drawn, sampled) if on] + [p for p, on in zip(drawn, sampled) if not on]
        live = sum(sampled)
        sampling = SamplingParams(temperature=rcfg.temperature, top_p=rcfg.top_p, top_k=rcfg.top_k,
                                  max_new_tokens=rcfg.max_new_tokens, stop_token_ids=(self.eos_id,), n=rcfg.n,
                                  seed=tcfg.seed * 100_003 + step)
        streaming = self.teachers is not None and self.cfg.teachers.stream
        scorer = StreamScorer(self.teachers, self.cfg.loss.top_k, rcfg.n) if streaming else None
        dataset = [Rollout(p.ids, list(p.reference), [0.0] * len(p.reference), DATASET, f"step-{step}", live + j, k)
                   for j, p in enumerate(chosen[live:]) for k in range(rcfg.n)]

        def heard(index: int, r: Rollout) -> None:
            scorer.add(index, r.prompt_index, self._sample(r, chosen))

        if scorer:  # the rows' own responses are ready now: scored while the rest is generated
            for index, r in enumerate(dataset, start=live * rcfg.n):
                heard(index, r)
        began = time.perf_counter()
        try:
            rollouts = self.engine.generate([p.ids for p in chosen[:live]], sampling, heard if scorer else None) if live else []
        except BaseException:
            if scorer:
                scorer.close()
            raise
        return Generated(step, chosen, rollouts + dataset, time.perf_counter() - began, scorer=scorer)

    @staticmethod
    def _sample(r: Rollout, chosen: list[Prompt]) -> Sample:
        prompt = chosen[r.prompt_index]
        return Sample(r.prompt_ids + r.completion_ids, len(r.prompt_ids), prompt.domain, contexts=prompt.contexts or None)

    def finish(self, generated: Generated) -> Produced:
        cfg, rollouts, chosen = self.cfg, generated.rollouts, generated.prompts
        began = time.perf_counter()
        scored = None
        if generated.scorer is not None:
            by_index = generated.scorer.close()
            scored = [by_index[i] for i in range(len(rollouts))]
        elif self.teachers is not None:  # teachers.stream=false: the whole step at once, now
            samples = [self._sample(r, chosen) for r in rollouts]
            student_top = None
            if cfg.loss.token_set != "teacher":  # the teachers also score the student's own top-k ids
                student_top = self.engine.student_top_ids([s.token_ids for s in samples], [s.start for s in samples],
                                                          cfg.loss.top_k)
                for sample, top in zip(samples, student_top):
                    sample.score_ids = ids_to_score(top)
            scored = self.teachers.score(samples, cfg.loss.top_k)
            if student_top is not None:
                for sample, top, sample_scores in zip(samples, student_top, scored):
                    for sc in sample_scores.scores.values():
                        at_student = teacher_at(sample.score_ids, sc.ids_logprobs, top)
                        sc.top_ids, sc.top_logprobs = token_set(cfg.loss.token_set, sc.top_ids, sc.top_logprobs,
                                                                top, at_student)
        t_tail = time.perf_counter() - began  # scoring still running once generation had ended
        t_score = generated.scorer.busy_s if generated.scorer is not None else t_tail
        metrics: dict[str, float] = {}
        task, opd_weight = None, 1.0
        if cfg.reward is not None:
            rewards = verifier_rewards(cfg.reward.format_weight, [chosen[r.prompt_index] for r in rollouts],
                                       [r.completion_ids for r in rollouts], self.decode)
            grouped = torch.tensor(rewards).view(len(chosen), cfg.rollout.n)
            task = grpo_advantages(grouped, cfg.reward.normalize_std).view(-1).tolist()
            opd_weight = cfg.reward.lambda_opd if self.teachers else 0.0
            metrics = {"rollout/reward_mean": sum(rewards) / len(rewards),
                       "rollout/groups_without_signal": float((grouped.std(-1) == 0).float().mean())}
        if scored:  # NaN/Inf teacher scores: masked (the pool did) and counted; too many stop the run
            metrics.update(self.teachers.check_finite(scored, generated.step))
        top_k = cfg.loss.top_k if cfg.loss.kind != "sampled_token" else 0
        top_k *= 2 if cfg.loss.token_set == "union" else 1  # the set's width
        batch = build_step_batch(chosen, rollouts, scored, cfg.loss.normalize, top_k, task, opd_weight,
                                 cfg.loss.domain_weights)
        lengths = sum(len(r.completion_ids) for r in rollouts if r.finish_reason != DATASET)
        metrics.update(rollout_metrics(rollouts, generated.step, cfg.rollout.max_staleness))
        if self.engine.routed is not None:  # the experts the sampler chose (routing replay)
            metrics.update(expert_load([r.routed_experts for r in rollouts if r.routed_experts is not None],
                                       self.engine.routed.experts))
        metrics.update({"time/rollout_s": generated.seconds, "time/scoring_s": t_score, "time/scoring_tail_s": t_tail,
                        "rollout/resampled_batches": float(generated.resampled), "rollout/samples": float(len(rollouts)),
                        "throughput/rollout_tokens_per_s": lengths / max(generated.seconds, 1e-9)})
        if scored:
            metrics.update(teacher_reverse_kl(rollouts, scored, list(self.teachers.pools)))
        metrics.update({f"rollout/{key}": float(value) for key, value in self.engine.counters().items()})
        if self.teachers is not None:  # cumulative over the run (checkpointed): an outage shows in the metrics, not only at the end
            for unit, counters in self.teachers.counters().items():
                metrics.update({f"teachers/{unit}/{key}": float(counters[key])
                                for key in ("samples", "tokens", "computed_tokens", "requests", "retries", "failures",
                                            "nonfinite_tokens", "wait_s")})
        return Produced(generated.step, batch, metrics)


class StreamScorer:
    """Scores a step's samples while the rest are still being generated: a prompt's n samples go
    to their teachers as soon as all n have ended, gathered into requests of at least
    ``min_samples`` (fewer at the end). ``add`` is called from the engine's streaming callback;
    ``close`` waits for the last request and returns every sample's scores."""

    def __init__(self, teachers: TeacherSet, top_k: int, n: int, min_samples: int = 16) -> None:
        self.teachers, self.top_k, self.n, self.min_samples = teachers, top_k, n, min_samples
        self.waiting: dict[int, list[tuple[int, Sample]]] = {}  # prompt -> its samples so far
        self.pending: list[tuple[int, Sample]] = []
        self.results: dict[int, SampleScores] = {}
        self.busy_s = 0.0  # time spent in teacher requests
        self.ended = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="stream-scorer")
        self.thread.start()

    def add(self, index: int, prompt_index: int, sample: Sample) -> None:
        with self.cond:
            group = self.waiting.setdefault(prompt_index, [])
            group.append((index, sample))
            if len(group) == self.n:
                self.pending += self.waiting.pop(prompt_index)
                self.cond.notify_all()

    def close(self) -> dict[int, SampleScores]:
        with self.cond:
            self.ended = True
            for group in self.waiting.values():  # cannot happen with complete rollouts; never drop one
                self.pending += group
            self.waiting.clear()
            self.cond.notify_all()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.results

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: len(self.pending) >= self.min_samples or self.ended)
                    batch, self.pending = self.pending, []
                    if not batch and self.ended:
                        return
                if batch:
                    began = time.perf_counter()
                    scored = self.teachers.score([s for _, s in batch], self.top_k)
                    self.busy_s += time.perf_counter() - began
                    self.results.update(zip((i for i, _ in batch), scored))
        except BaseException as exc:  # raised by close(), in the producer
            self.error = exc


def verifier_rewards(format_weight: float, prompts: list[Prompt], completions: list[list[int]],
                     decode: Callable[[list[int]], str]) -> list[float]:
    """GRPO's verifiable reward per completion: correct (1/0) + format_weight * format score."""
    from megatron_opd.data.domains import get_domain

    rewards = []
    for prompt, completion in zip(prompts, completions):
        if prompt.domain is None or prompt.meta is None:
            raise ValueError("reward 'verifier' needs every prompt row to carry `domain` and `meta`")
        verdict = get_domain(prompt.domain).verify(prompt.meta, decode(completion))
        rewards.append(float(verdict.correct) + format_weight * verdict.format_score)
    return rewards


# -- the step as tensors ----------------------------------------------------------------------------
def build_step_batch(prompts: list[Prompt], rollouts: list[Rollout], scored: list[SampleScores] | None,
                     normalize: str, top_k: int, task_advantages: list[float] | None = None,
                     opd_weight: float = 1.0, domain_weights: dict[str, float] | None = None) -> StepBatch:
    """Tensorize one step: ``prompts[r.prompt_index]`` is each rollout's prompt; ``scored`` the
    teachers' scores per rollout (None: no teacher — the sampler's own log-probs stand in, so the
    teacher advantage is 0); ``top_k`` > 0 keeps the routed teachers' top-k for the top-k losses."""
    lengths = [len(r.completion_ids) for r in rollouts]
    tags = [prompts[r.prompt_index].domain for r in rollouts]
    names = sorted({t for t in tags if t is not None})
    if normalize == "token":
        weights = [1.0] * len(rollouts)
    else:  # equal shares per domain, or per sample (each its own group)
        weights = (equal_share_weights(tags, lengths, domain_weights) if normalize == "domain"
                   else equal_share_weights(list(range(len(rollouts))), lengths))
    sampler = torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float32)
    teacher = torch.cat([_mixed_teacher_logprobs(sc).float() for sc in scored]) if scored else sampler.clone()
    token_mask = torch.cat([sc.valid_tokens().float() for sc in scored]) if scored else torch.ones_like(sampler)
    return StepBatch(
        tokens=torch.tensor([t for r in rollouts for t in (*r.prompt_ids, *r.completion_ids)], dtype=torch.int32),
        sample_lens=torch.tensor([len(r.prompt_ids) + n for r, n in zip(rollouts, lengths)], dtype=torch.int32),
        prompt_lens=torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.int32),
        sampler_logprobs=sampler, teacher_logprobs=teacher.reshape(-1),
        task_advantages=torch.tensor(task_advantages if task_advantages else [0.0] * len(rollouts), dtype=torch.float32),
        loss_weights=torch.tensor(weights, dtype=torch.float32),
        weight_versions=torch.tensor([version_number(r.weight_version) for r in rollouts], dtype=torch.int64),
        prompt_rows=torch.tensor([prompts[r.prompt_index].row for r in rollouts], dtype=torch.int64),
        domains=torch.tensor([names.index(t) if t is not None else -1 for t in tags], dtype=torch.int32),
        token_mask=token_mask.reshape(-1),
        on_policy=torch.tensor([r.finish_reason != DATASET for r in rollouts], dtype=torch.uint8),
        domain_names=names, topk=_topk_slots(scored, lengths, top_k) if scored and top_k else None, opd_weight=opd_weight,
        routed_experts=_routed_experts(rollouts))


def _routed_experts(rollouts: list[Rollout]) -> torch.Tensor | None:
    """Every sample's routed experts, packed like its tokens [N, layers, k]; each sample's last token (never run
    by the sampler) gets experts 0..k-1. None when the engine returned none (routing replay off)."""
    given = [r.routed_experts for r in rollouts]
    if all(g is None for g in given):
        return None
    for r, g in zip(rollouts, given):
        expected = len(r.prompt_ids) + len(r.completion_ids) - 1
        if g is None or g.dim() != 3 or g.shape[0] != expected:
            raise ValueError(f"routing replay: sample {r.sample_index} of prompt {r.prompt_index} came back with routed "
                             f"experts of shape {None if g is None else tuple(g.shape)}, expected [{expected}, layers, "
                             "top_k] (prompt + completion - 1 tokens)")
    layers, k = given[0].shape[1:]
    last = torch.arange(k, dtype=given[0].dtype).expand(1, layers, k)
    return torch.cat([part for g in given for part in (g.to(given[0].dtype), last)])


def check_domain_weights(domain_weights: dict[str, float], prompts: list[Prompt]) -> None:
    """``loss.domain_weights`` names only domains the prompts carry: a misspelt one would weigh nothing."""
    tags = {p.domain for p in prompts if p.domain is not None}
    unknown = sorted(set(domain_weights) - tags)
    if unknown:
        raise ValueError(f"loss.domain_weights: {unknown} tag no prompt of data.train (its domains: {sorted(tags)})")


def equal_share_weights(groups: list[Any], lengths: list[int], shares: dict[Any, float] | None = None) -> list[float]:
    """Per-sample weights giving each group an equal share of a token-mean loss: a group with T_g of
    the step's T completion tokens gets w_g = T / (G * T_g), so sum_g w_g T_g = T. Groups are the
    samples' domains (``loss.normalize=domain``) or the samples themselves (``sequence``: w_i =
    T / (N * T_i), a per-sample mean). ``shares`` (``loss.domain_weights``): group g's share is
    s_g / sum of the present groups' s (1 where unnamed) instead of 1 / G; the weights still sum to T."""
    totals: dict[Any, int] = {}
    for group, n in zip(groups, lengths):
        totals[group] = totals.get(group, 0) + n
    total, present = sum(totals.values()), [g for g, n in totals.items() if n > 0]
    share = {g: (shares or {}).get(g, 1.0) for g in present}
    norm = sum(share.values())
    return [total * share[g] / (norm * totals[g]) if totals[g] else 1.0 for g in groups]


def _mixed_teacher_logprobs(scored: SampleScores) -> torch.Tensor:
    """``sum_k w_k,t log p_Tk(y_t)`` [T] over a sample's routed teachers: with the weights summing to 1,
    the combined advantage is this minus the student's log-prob."""
    units = list(scored.scores)
    return mix_teacher_logprobs([scored.scores[u].logprobs for u in units], [scored.weights[u] for u in units])


def _topk_slots(scored: list[SampleScores], lengths: list[int], top_k: int) -> TeacherTopK:
    slots = max(len(sc.scores) for sc in scored)
    ids, lps, weights = [], [], []
    for sc, n in zip(scored, lengths):
        units = list(sc.scores)
        ids.append(torch.zeros(n, slots, top_k, dtype=torch.int32))
        lps.append(torch.zeros(n, slots, top_k))
        weights.append(torch.zeros(n, slots))
        for s, unit in enumerate(units):
            ids[-1][:, s] = sc.scores[unit].top_ids
            lps[-1][:, s] = sc.scores[unit].top_logprobs
            weights[-1][:, s] = sc.weights[unit]
    return TeacherTopK(torch.cat(ids), torch.cat(lps), torch.cat(weights))


# -- what rank 0 logs about a step's rollouts -------------------------------------------------------
def rollout_metrics(rollouts: list[Rollout], step: int, max_staleness: int) -> dict[str, float]:
    """The student's own samples (the rows' own responses mixed in by GKD's lambda are counted apart)."""
    mixed = sum(r.finish_reason == DATASET for r in rollouts)
    counts = {"rollout/on_policy_samples": float(len(rollouts) - mixed), "rollout/dataset_samples": float(mixed)}
    rollouts = [r for r in rollouts if r.finish_reason != DATASET]
    if not rollouts:
        return counts
    lengths = [len(r.completion_ids) for r in rollouts]
    out = {**counts, "rollout/response_length": sum(lengths) / len(lengths),
           "rollout/truncation_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
           "rollout/repetition_rate": sum(repeats_an_ngram(r.completion_ids) for r in rollouts) / len(rollouts)}
    behind = [step - version_number(r.weight_version) for r in rollouts]
    out["rollout/staleness_mean"] = sum(behind) / len(behind)
    for age in range(max_staleness + 1):  # the staleness histogram: share of samples k steps old
        out[f"rollout/staleness_{age}"] = sum(b == age for b in behind) / len(behind)
    return out


def repeats_an_ngram(ids: list[int], n: int = 4) -> bool:
    """A completion that repeats one n-gram 3+ times (a StableOPD-style degeneration signal)."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= 3:
            return True
    return False


def teacher_reverse_kl(rollouts: list[Rollout], scored: list[SampleScores], units: list[str]) -> dict[str, float]:
    """Per teacher: mean of log p_S - log p_T over the tokens it scored, the sampler's log-probs as
    the student's (the trainer's own reverse KL is ``opd/reverse_kl``)."""
    out = {}
    for unit in units:
        pairs = [(r, sc.scores[unit]) for r, sc in zip(rollouts, scored)
                 if unit in sc.scores and r.finish_reason != DATASET]  # a row's own response has no sampler log-probs
        tokens = sum(len(s) for _, s in pairs)
        if tokens:
            gap = sum((torch.tensor(r.logprobs) - s.logprobs).sum().item() for r, s in pairs)
            out[f"teacher/{unit}/reverse_kl"] = gap / tokens
    return out
