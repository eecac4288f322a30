"""The records that cross layer and file boundaries, in the order data flows through them:

``Prompt`` (data) -> ``Rollout`` (rollout engine) -> ``Sample`` (what a teacher scores) ->
``TokenScores`` / ``SampleScores`` (teachers) -> ``StepBatch`` (the trainer's step, as tensors);
on trainer rank 0 a step is ``Generated`` (sampled) then ``Produced`` (scored, tensorized); every
rank collates its share into ``MicroBatch`` es (SFT: ``SFTMicroBatch``; both a ``TokenBatch``, what
the student's forward reads) and its update reports an ``Update``.

Only torch here: every layer may import this module and it imports no other part of the package.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar

import torch


@dataclass(frozen=True)
class SamplingParams:
    """A subset of SGLang's ``sampling_params`` (same names, same meaning)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled (SGLang's convention)
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0 or self.n < 1:
            raise ValueError("max_new_tokens must be >= 0 and n >= 1")

    def to_sglang(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if k not in ("seed", "stop_token_ids")}
        body["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            body["sampling_seed"] = self.seed
        return body

    @classmethod
    def from_sglang(cls, params: dict[str, Any]) -> "SamplingParams":
        known = {"temperature", "top_p", "top_k", "max_new_tokens", "n"}
        kwargs = {k: params[k] for k in known if params.get(k) is not None}
        return cls(**kwargs, stop_token_ids=tuple(params.get("stop_token_ids") or ()), seed=params.get("sampling_seed"))


@dataclass
class Prompt:
    ids: list[int]  # what the student sees: the conversation up to its last user turn, with the generation prompt
    domain: str | None
    meta: dict[str, Any] | None = None  # what the domain's verifier needs (GRPO rewards)
    row: int = 0  # its index in the run's prompt list (counted: every prompt trained once per draw)
    reference: list[int] | None = None  # the row's own response (its last assistant turn, through EOS)
    contexts: dict[str, list[int]] = field(default_factory=dict)  # teacher -> the prompt ids that teacher scores
    # the completion under (a privileged context of the row, never shown to the student: OPSD)


DATASET = "dataset"  # the finish reason of a dataset trajectory mixed into a step (GKD's lambda < 1)


@dataclass
class Rollout:
    """One sampled completion: what the trainer needs to score and learn from it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler log p(token) under the unmodified (T=1) distribution
    finish_reason: str  # "stop" | "length" | "abort" | DATASET (the row's own response, not sampled)
    weight_version: str  # the weights that sampled it ("step-N": N optimizer steps)
    prompt_index: int = 0
    sample_index: int = 0
    # MoE with routing replay: the experts the sampler's every layer chose at each token it ran,
    # [prompt + completion - 1, layers, top_k] uint8/int32 (the last sampled token never ran)
    routed_experts: torch.Tensor | None = None


def expert_dtype(num_experts: int) -> torch.dtype:
    """The compact integer type of expert ids (routing replay carries one per token x layer x top-k); int32 above
    256 experts (NCCL broadcasts no int16)."""
    return torch.uint8 if num_experts <= 256 else torch.int32


def version_number(version: str) -> int:
    """``"step-12"`` -> 12: the trainer names every weight version it syncs this way."""
    prefix, _, number = str(version).partition("-")
    if prefix != "step" or not number.isdigit():
        raise ValueError(f"weight version {version!r} is not one the trainer synced (expected 'step-N')")
    return int(number)


@dataclass
class Sample:
    """A finished rollout as the teachers see it: ids = prompt + completion."""

    token_ids: list[int]
    start: int  # first completion position (= prompt length)
    tag: str | None = None
    score_ids: list[int] | None = None  # ids whose log-probs the teachers also report at every position
    contexts: dict[str, list[int]] | None = None  # teacher -> its own prompt ids in place of token_ids[:start]

    def for_teacher(self, unit: str) -> tuple[list[int], int]:
        """The ids a teacher scores and its first completion position: the same completion tokens,
        after that teacher's own context where it has one."""
        context = (self.contexts or {}).get(unit)
        if context is None:
            return self.token_ids, self.start
        return context + self.token_ids[self.start:], len(context)


@dataclass
class TokenScores:
    """A teacher's view of one sample's completion tokens (positions ``start`` .. end).

    ``logprobs[t]`` is log p_T(y_t | y_<t); with top-k, ``top_ids``/``top_logprobs`` [T, k] are the
    teacher's k most likely tokens at that position (descending). ``computed_tokens`` counts the
    positions the teacher actually ran (prefix reuse makes it smaller than prompt + completion).
    """

    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    computed_tokens: int = 0
    cached_tokens: int = 0
    ids_logprobs: torch.Tensor | None = None  # [T, m]: at the sample's ``score_ids``, every position
    valid: torch.Tensor | None = None  # [T] bool: False where the teacher's log-prob was NaN/Inf (None: all valid)

    def __len__(self) -> int:
        return int(self.logprobs.numel())


@dataclass
class SampleScores:
    """A sample's scores from each routed teacher and their per-token weights (the teachers'
    log-probs are mixed with these by ``algo.advantages.mix_teacher_logprobs``)."""

    scores: dict[str, TokenScores]  # unit -> its scores of this sample's completion
    weights: dict[str, torch.Tensor]  # unit -> per-token weight [T]; they sum to 1 per token

    def valid_tokens(self) -> torch.Tensor:
        """[T] bool: positions every teacher with weight there scored finitely (the others are not trained)."""
        any_scores = next(iter(self.scores.values()))
        ok = torch.ones(len(any_scores), dtype=torch.bool)
        for u, sc in self.scores.items():
            if sc.valid is not None:
                ok &= sc.valid | (self.weights[u] == 0)
        return ok


@dataclass
class TeacherTopK:
    """The routed teachers' top-k at every completion token of a batch, in slots: slot s of a token
    holds the s-th teacher routed to its sample (a sample routed to fewer teachers has weight 0 in
    the rest), so a batch routed one teacher per sample (MOPD by tag) has one slot."""

    ids: torch.Tensor  # [T, slots, k] int32
    logprobs: torch.Tensor  # [T, slots, k] float32
    weights: torch.Tensor  # [T, slots] float32: the routing weight of that teacher at that token


@dataclass
class StepBatch:
    """One training step's samples as packed tensors (B samples, N tokens, T completion tokens).

    Built on trainer rank 0 from the rollouts and their scores, sliced per data-parallel rank and
    sent as tensors (never pickled); every per-token field covers completion tokens only, in sample
    order, so sample b's completion values are ``[C_b, C_b + len_b)`` with C the running sum.
    """

    tokens: torch.Tensor  # [N] int32: each sample's prompt + completion, concatenated
    sample_lens: torch.Tensor  # [B] int32
    prompt_lens: torch.Tensor  # [B] int32
    sampler_logprobs: torch.Tensor  # [T] float32
    teacher_logprobs: torch.Tensor  # [T] float32: sum_k w_k,t log p_Tk(y_t) (the sampler's own without teachers)
    task_advantages: torch.Tensor  # [B] float32 (GRPO; zeros otherwise)
    loss_weights: torch.Tensor  # [B] float32 (1 unless loss.normalize gives groups equal shares)
    weight_versions: torch.Tensor  # [B] int64: the weight version that sampled each
    prompt_rows: torch.Tensor  # [B] int64: each sample's prompt row
    domains: torch.Tensor  # [B] int32: index into ``domain_names`` (-1: untagged)
    token_mask: torch.Tensor  # [T] float32: 1, or 0 where a routed teacher's score was non-finite (not trained)
    on_policy: torch.Tensor  # [B] uint8: 1 = sampled by the student (0: the row's own response, GKD's mixing)
    domain_names: list[str] = field(default_factory=list)
    topk: TeacherTopK | None = None
    opd_weight: float = 1.0  # lambda on the teacher advantage (0: no teacher term)
    # routing replay: the sampler's experts at every token [N, layers, top_k] uint8/int32 (each sample's last
    # token, which the sampler never ran, holds experts 0..k-1: nothing after it reads its output)
    routed_experts: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.sample_lens.numel())

    @property
    def completion_lens(self) -> torch.Tensor:
        return self.sample_lens - self.prompt_lens

    def select(self, lo: int, hi: int) -> "StepBatch":
        """Samples ``lo .. hi-1`` (a data-parallel rank's share)."""
        seq = _spans(self.sample_lens)
        comp = _spans(self.completion_lens)
        t0, t1 = int(seq[lo]), int(seq[hi])
        c0, c1 = int(comp[lo]), int(comp[hi])
        topk = None
        if self.topk is not None:
            topk = TeacherTopK(self.topk.ids[c0:c1], self.topk.logprobs[c0:c1], self.topk.weights[c0:c1])
        return StepBatch(self.tokens[t0:t1], self.sample_lens[lo:hi], self.prompt_lens[lo:hi],
                         self.sampler_logprobs[c0:c1], self.teacher_logprobs[c0:c1], self.task_advantages[lo:hi],
                         self.loss_weights[lo:hi], self.weight_versions[lo:hi], self.prompt_rows[lo:hi],
                         self.domains[lo:hi], self.token_mask[c0:c1], self.on_policy[lo:hi], list(self.domain_names), topk,
                         self.opd_weight, None if self.routed_experts is None else self.routed_experts[t0:t1])

    # -- wire form: named tensors + a JSON header (nothing pickled) ----------------------------
    def to_wire(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        tensors = [getattr(self, n) for n in names]
        if self.topk is not None:
            names += ["topk.ids", "topk.logprobs", "topk.weights"]
            tensors += [self.topk.ids, self.topk.logprobs, self.topk.weights]
        header = {"names": names, "shapes": [list(t.shape) for t in tensors], "dtypes": [str(t.dtype) for t in tensors],
                  "domain_names": self.domain_names, "opd_weight": self.opd_weight}
        return header, [t.contiguous() for t in tensors]

    @classmethod
    def from_wire(cls, header: dict[str, Any], tensors: list[torch.Tensor]) -> "StepBatch":
        named = dict(zip(header["names"], tensors))
        topk = None
        if "topk.ids" in named:
            topk = TeacherTopK(named.pop("topk.ids"), named.pop("topk.logprobs"), named.pop("topk.weights"))
        return cls(**named, domain_names=list(header["domain_names"]), topk=topk, opd_weight=float(header["opd_weight"]))


# -- a step on trainer rank 0: sampled, then scored and tensorized --------------------------------
class StepScoring(Protocol):
    """Teachers scoring a step's samples while the rest are generated (``StreamScorer``)."""

    busy_s: float  # seconds spent in teacher requests

    def close(self) -> dict[int, SampleScores]:
        """Wait for the last request; every sample's scores, by its index in the step."""
        ...


@dataclass
class Generated:
    """A step's prompts and their rollouts, as sampled (the first half of a step's batch)."""

    step: int
    prompts: list[Prompt]
    rollouts: list[Rollout]
    seconds: float
    resampled: int = 0  # batches sampled again because the engine served weights older than the bound
    scorer: StepScoring | None = None  # the teachers' scoring that started while this batch was generated


@dataclass
class Produced:
    """A step's batch, ready to train, and what rank 0 measured making it (rollout, scoring, teachers)."""

    step: int
    batch: StepBatch
    metrics: dict[str, float] = field(default_factory=dict)


# -- a rank's micro-batches: what the student's forward and the losses read ------------------------
_Batch = TypeVar("_Batch", bound="TokenBatch")


@dataclass
class TokenBatch:
    """Rows of token ids for one forward pass of the student (``model.forward.run_pipeline``'s
    micro-batch); the records below add what their loss reads."""

    input_ids: torch.Tensor  # [b, s] int64, right-padded

    def to(self: _Batch, device: torch.device | str) -> _Batch:
        """The same record with every tensor on ``device`` (no copies on CPU)."""
        return replace(self, **{f.name: value.to(device, non_blocking=True) for f in fields(self)
                                if isinstance(value := getattr(self, f.name), torch.Tensor)})


@dataclass
class SFTMicroBatch(TokenBatch):
    """SFT's micro-batch (``data.chat.collate``)."""

    loss_mask: torch.Tensor  # [b, s] int64: 1 at assistant tokens


@dataclass
class MicroBatch(TokenBatch):
    """OPD's micro-batch: rows of a rank's share, padded to their longest (``train.batches.micro_batches``).
    Per-token values [b, s] sit at the token's own position (the loss shifts), 0 at prompt and padding."""

    loss_mask: torch.Tensor  # [b, s] float32: 1 at completion tokens (0 where a routed teacher's score was non-finite)
    sampler_lp: torch.Tensor  # [b, s] float32: the sampler's log p(token)
    teacher_lp: torch.Tensor  # [b, s] float32: sum_k w_k log p_Tk(token) (the sampler's own without teachers)
    task_adv: torch.Tensor  # [b] float32: the sample's task advantage (GRPO; zeros otherwise)
    loss_w: torch.Tensor  # [b] float32: the sample's loss weight (loss.normalize)
    opd_weight: torch.Tensor  # [b] float32: lambda on the teacher advantage (0: no teacher term)
    seq_len: torch.Tensor  # [b] int64: each row's real length (the rest is padding)
    on_policy: torch.Tensor  # [b] uint8: 1 = sampled by the student (0: the row's own response, GKD's mixing)
    top_ids: torch.Tensor | None = None  # [b, s, slots, k] int64: the routed teachers' top-k ids (top-k losses)
    top_lp: torch.Tensor | None = None  # [b, s, slots, k] float32: their log-probs
    top_w: torch.Tensor | None = None  # [b, s, slots] float32: each slot's routing weight
    old_lp: torch.Tensor | None = None  # [b, s] float32: log-probs before the step's first update (loss.epochs > 1)
    routed: torch.Tensor | None = None  # [b, s, layers, top_k] uint8/int32: the sampler's experts (routing replay)


@dataclass
class Update:
    """What a step's update reports (``loss.epochs`` optimizer steps)."""

    results: list[dict[str, Any]]  # the last pass's per-micro-batch metric sums (last pipeline stage)
    grad_norm: float
    lr: float
    seconds: float
    router: dict[str, float] = field(default_factory=dict)  # MoE: the routers' auxiliary losses (last pass)


def _spans(lengths: torch.Tensor) -> torch.Tensor:
    """[B+1] offsets of each sample's slice in a packed tensor."""
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])


def encode_header(header: dict[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)


def decode_header(raw: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(raw.numpy().tobytes()).decode())
