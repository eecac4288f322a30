"""The embedded rollout engine: a ``transformers`` model holding HF-named weights, generating on CPU.

The trainer drives it in its own process (``rollout.engine: embedded``) as it drives several servers
through :class:`~megatron_opd.rollout.rollout_pool.RolloutPool`; ``opd serve --role rollout`` puts
the same object behind SGLang's HTTP API.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_opd.rollout.decoder import Decoder
from megatron_opd.rollout.generation import KV_CACHE_BYTES, MAX_BATCH, continuation_hidden, generate, score_tokens
from megatron_opd.records import Rollout, SamplingParams


SCORE_ROWS = 16  # sequences per scoring batch: sorted by length, so padding stays small ...
PACK_MIN_NEW_TOKENS = 16  # generations at least this long decode through packed weights
SCORE_TOKENS = 8192  # ... and at most this many positions (rows x longest): activations stay bounded


class EngineBusy(RuntimeError):
    """The engine stayed paused (a weight update) longer than the caller would wait."""


class WeightUpdateError(ValueError):
    """A weight update that would leave the model wrong; nothing of it was applied."""


class EmbeddedEngine:
    def __init__(self, model_dir: str | Path, batch_size: int = MAX_BATCH, weight_version: str = "0",
                 weights_roots: list[Path] | None = None, allow_nonfinite_weights: bool = False,
                 kv_cache_mib: int = KV_CACHE_BYTES >> 20, device: str = "cpu") -> None:
        """``weights_roots``: the directories ``update_weights_from_disk`` may read from (default: the
        working directory and the model's own directory). ``kv_cache_mib``: the KV cache one decode loop
        may hold (a longer batch runs as several loops). ``device``: where the model and its KV cache live
        ("cpu", or "cuda" for the GPU check; sampling and scoring read the logits on the CPU)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(str(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if device != "cpu" and not torch.cuda.is_available():
            raise ValueError(f"engine device {device!r}: torch sees no CUDA GPU")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self.decoder = Decoder(self.model)
        self.batch_size = batch_size
        self.kv_cache_bytes = kv_cache_mib << 20
        self.weight_version = weight_version
        self._paused = False
        self._staged: dict[str, torch.Tensor] = {}  # a distributed sync's weights, received while paused
        self._staged_version: str | None = None
        self._lock = threading.Condition()  # one generation or weight update at a time
        self._closing = threading.Event()
        self.weights_roots = [Path(p).resolve() for p in (weights_roots or [Path.cwd(), self.model_dir])]
        self.allow_nonfinite_weights = allow_nonfinite_weights

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None, cancel: threading.Event | None = None,
                 pause_wait_s: float | None = None, routed_experts: bool = False) -> list[Rollout]:
        """``sampling.n`` completions per prompt, grouped by prompt, each tagged with its version (and, with
        ``routed_experts``, an MoE model's experts at every token it ran: routing replay).
        ``on_rollout(j, rollout)`` hears of output j as soon as it has ended (streaming). ``cancel``
        set (or :meth:`shutdown`) stops it at the next token; a pause longer than ``pause_wait_s``
        raises :class:`EngineBusy`."""
        expanded = [(i, k, p) for i, p in enumerate(prompts) for k in range(sampling.n)]
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())

        def cancelled() -> bool:
            return self._closing.is_set() or (cancel is not None and cancel.is_set())

        with self._lock:
            # checked under the lock: no half-synced weights
            if not self._lock.wait_for(lambda: not self._paused or cancelled(), timeout=pause_wait_s):
                raise EngineBusy(f"the server has been paused (weight update) for over {pause_wait_s:.0f} s; retry later")
            version = self.weight_version
            # decode reads every weight once per token: through their packed copy (Decoder.pack), made for
            # this request and dropped after it, so the copy exists only while the engine generates
            # (packing costs about what two decode steps do: not worth it for a few tokens)
            packed = sampling.max_new_tokens >= PACK_MIN_NEW_TOKENS
            if packed:
                self.decoder.pack()

            def rollout(j: int, c) -> Rollout:
                i, k, p = expanded[j]
                return Rollout(list(p), c.token_ids, c.logprobs, c.finish_reason, version, i, k, c.routed_experts)

            try:
                completions = generate(
                    self.model, [p for _, _, p in expanded], sampling.max_new_tokens, self.eos_token_id,
                    self.pad_token_id, temperature=sampling.temperature, seed=seed,
                    batch_size=self.batch_size, top_k=sampling.top_k, top_p=sampling.top_p,
                    stop_token_ids=sampling.stop_token_ids, decoder=self.decoder,
                    on_complete=(lambda j, c: on_rollout(j, rollout(j, c))) if on_rollout else None,
                    cancelled=cancelled, kv_cache_bytes=self.kv_cache_bytes, routed_experts=routed_experts,
                )
            finally:
                if packed:
                    self.decoder.unpack()
        return [rollout(j, c) for j, c in enumerate(completions)]

    @torch.no_grad()
    def score(self, sequences: list[list[int]], start: list[int], top_k: int = 0,
              token_ids: list[list[int]] | None = None) -> list[dict[str, Any]]:
        """Log-prob of every token at positions ``>= start[i]`` (and ``>= 1``), plus optional top-k
        and, with ``token_ids`` (one id list per sequence: SGLang's ``token_ids_logprob``), the
        log-probs of those ids at every position (``ids_logprobs`` [T, len(ids)]).

        Sequences that share their prefix ``seq[:start]`` (the n samples of one prompt) share one
        prefill of it, and all of a chunk's prefixes and continuations run as one batch each. Each
        record has ``logprobs`` [T] (float32), ``top_logprobs`` / ``top_ids`` [T, top_k],
        ``cached_tokens`` (prefix tokens reused) and ``computed_tokens`` (tokens prefilled for it,
        SGLang's ``prompt_tokens - cached_tokens``).
        """
        starts = [max(int(s), 1) for s in start]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (seq, s) in enumerate(zip(sequences, starts)):
            groups.setdefault(tuple(seq[:s]), []).append(i)
        out: list[dict[str, Any]] = [{}] * len(sequences)
        with self._lock:
            # longest first, in chunks of similar lengths: padding stays small (it is most of the cost)
            ordered = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(sequences[i]) for i in g[1])))
            for chunk in _chunks(ordered, min(self.batch_size, SCORE_ROWS), SCORE_TOKENS, sequences):
                prefixes = [list(prefix) for prefix, _ in chunk]
                members = [(g, i) for g, (_, rows) in enumerate(chunk) for i in rows]
                conts = [sequences[i][starts[i]:] for _, i in members]
                hidden = continuation_hidden(self.decoder, prefixes, [g for g, _ in members], conts, self.pad_token_id)
                ids = [token_ids[i] for _, i in members] if token_ids is not None else None
                for (g, i), record in zip(members, _records(score_tokens(self.decoder, hidden, conts, top_k, ids), conts)):
                    record["cached_tokens"] = len(prefixes[g])  # SGLang's accounting: reused prefix tokens
                    out[i] = record
                for prefix, rows in chunk:  # the first member of each group paid for its prefix
                    out[rows[0]]["cached_tokens"] = 0
                    out[rows[0]]["computed_tokens"] += len(prefix)
        return out

    # -- weights ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors by their checkpoint names (an MoE model's experts as views, see expert_views)."""
        views, fused = expert_views(self.model)
        tensors = {name: t for name, t in self.model.state_dict(keep_vars=True).items() if name not in fused}
        return {**tensors, **views}

    def _required(self) -> set[str]:
        """The names a full update must cover: every parameter, counting tied ones once (an HF save
        leaves out ``lm_head.weight`` when it is the embedding)."""
        seen, names = set(), set()
        views, fused = expert_views(self.model)
        for name, param in self.model.named_parameters():  # tied parameters are listed once
            if id(param) not in seen and name not in fused:
                seen.add(id(param))
                names.add(name)
        return names | set(views)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterator[tuple[str, torch.Tensor]], version: str, full: bool = False,
                       owned: bool = False, values_checked: bool = False) -> int:
        """Load HF-named tensors into the model, all or nothing: every name, shape and dtype (only
        lossless float widening, e.g. bf16 -> fp32) and every value (finite, unless the engine
        allows otherwise; ``values_checked``: already done by the caller) is checked before anything
        changes; ``full`` also requires every parameter to be present. ``owned``: the tensors are the
        engine's own (received or read from disk), so a parameter takes them as they are instead of a
        copy. Raises :class:`WeightUpdateError` with the model unchanged."""
        items = list(named_tensors)
        self._check(items, full, values=not values_checked)
        params = self._tensors()
        with self._lock:
            self.decoder.unpack()
            for name, tensor in items:
                param = params[name]
                incoming = tensor.to(device=param.device, dtype=param.dtype)
                if (owned or incoming is not tensor) and incoming.is_contiguous() and isinstance(param, torch.nn.Parameter):
                    param.data = incoming  # no copy: nothing else holds it
                else:
                    param.data.copy_(incoming)
            self.weight_version = version
        return len(items)

    def _check(self, items: list[tuple[str, torch.Tensor]], full: bool = False, values: bool = True) -> None:
        params = self._tensors()
        for name, tensor in items:
            if name not in params:
                raise WeightUpdateError(f"weight {name!r} does not exist in the rollout model")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise WeightUpdateError(f"weight {name!r}: shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
            target = params[name].dtype
            if tensor.dtype != target and not (tensor.dtype.is_floating_point and target.is_floating_point
                                               and torch.promote_types(tensor.dtype, target) == target):
                raise WeightUpdateError(f"weight {name!r}: dtype {tensor.dtype} cannot be loaded into the model's {target} "
                                        "without a lossy cast")
            if values and not self.allow_nonfinite_weights and not _finite(tensor):
                raise WeightUpdateError(f"weight {name!r}: holds NaN or Inf values")
        if full:
            names = {name for name, _ in items}
            missing = sorted(self._required() - names)
            if missing:
                raise WeightUpdateError(f"the update has {len(names)} of the model's {len(self._required())} weights: "
                                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def update_weights_from_disk(self, model_dir: str | Path, version: str) -> int:
        """Every weight from ``*.safetensors`` in ``model_dir``, which must lie inside one of
        ``weights_roots`` (symlinks resolved); a directory that holds only part of the model is refused."""
        from safetensors.torch import load_file

        where = Path(model_dir).resolve()
        if not any(where == root or where.is_relative_to(root) for root in self.weights_roots):
            raise WeightUpdateError(f"{model_dir}: outside the directories this server loads weights from "
                                    f"({', '.join(map(str, self.weights_roots))}; `opd serve --weights-root` adds one)")
        if not where.is_dir():
            raise WeightUpdateError(f"{model_dir}: not a directory")
        files = sorted(where.glob("*.safetensors"))
        outside = [f for f in files if not f.resolve().is_relative_to(where) or not f.resolve().is_file()]
        if outside:
            raise WeightUpdateError(f"{outside[0]}: not a regular file inside {where}")
        if not files:
            raise WeightUpdateError(f"{model_dir}: no *.safetensors files")
        return self.update_weights((kv for f in files for kv in load_file(str(f)).items()), version, full=True, owned=True)

    def init_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          backend: str = "gloo", timeout_s: float = 300.0) -> None:
        from megatron_opd.rollout.update_group import WeightUpdateGroup

        self._group = WeightUpdateGroup(master_address, master_port, rank_offset, world_size, backend, timeout_s)

    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                version: str | None, load_format: str | None = None) -> int:
        """Receive the named tensors by broadcast from the trainer (group rank 0): one broadcast per
        tensor, or with ``load_format="flattened_bucket"`` one uint8 buffer holding them all, in order."""
        from megatron_opd.rollout.update_group import FLATTENED_BUCKET, bucket_nbytes, parse_dtype

        group = getattr(self, "_group", None)
        if group is None:
            raise RuntimeError("no weight update group: call /init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        if load_format not in (None, FLATTENED_BUCKET):
            raise ValueError(f"load_format must be null or {FLATTENED_BUCKET!r}, got {load_format!r}")

        try:  # always drain the broadcasts (a bad name must not hang the trainer), into fresh tensors
            if load_format == FLATTENED_BUCKET:
                flat = torch.empty(sum(bucket_nbytes(dtypes, shapes)), dtype=torch.uint8)
                group.broadcast(flat, root=0)
                incoming, offset = [], 0
                for dtype, shape, size in zip(dtypes, shapes, bucket_nbytes(dtypes, shapes)):
                    incoming.append(flat[offset:offset + size].view(parse_dtype(dtype)).view(shape))
                    offset += size
            else:
                incoming = [torch.empty(shape, dtype=parse_dtype(dtype)) for dtype, shape in zip(dtypes, shapes)]
                for tensor in incoming:
                    group.broadcast(tensor, root=0)
        except BaseException:  # the sync broke half-way (the trainer or the link died): nothing of it is kept
            self._staged.clear()
            raise
        items = list(zip(names, incoming))
        if not self._paused:  # a lone update: applied at once, all or nothing
            return self.update_weights(iter(items), version or self.weight_version, owned=True)
        try:
            self._check(items)
        except WeightUpdateError:
            self._staged.clear()
            raise
        with self._lock:  # staged: the model changes only when the whole sync has arrived (see resume)
            self._staged.update(items)
            self._staged_version = version or self._staged_version
        return len(items)

    def destroy_update_group(self) -> None:
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            group.close()

    def get_weight(self, name: str) -> torch.Tensor:
        params = self._tensors()
        if name not in params:
            raise KeyError(f"weight {name!r} does not exist in the rollout model")
        return params[name].detach().cpu().clone()

    # -- control ------------------------------------------------------------------------------
    def pause(self) -> None:
        with self._lock:
            self._paused = True
            self._staged.clear()  # whatever an earlier, unfinished sync left
            self.decoder.unpack()  # its memory is free for the weights about to arrive

    def resume(self) -> None:
        """Commit a distributed sync received while paused — only a complete one: a sync that stopped
        half-way (trainer gone, a bucket refused) leaves the old weights and version serving."""
        with self._lock:
            try:
                if self._staged:
                    staged, version = list(self._staged.items()), self._staged_version or self.weight_version
                    self._staged.clear()
                    try:
                        self.update_weights(iter(staged), version, full=True, owned=True, values_checked=True)
                    except WeightUpdateError as exc:
                        print(f"weight sync not applied, still serving {self.weight_version}: {exc}",
                              file=sys.stderr, flush=True)
            finally:
                self._paused = False
                self._lock.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def health(self) -> bool:
        return not self._closing.is_set()

    def shutdown(self) -> None:
        """Stop every generation at its next token and refuse new ones (the server is exiting)."""
        self._closing.set()
        with self._lock:
            self._lock.notify_all()


def expert_views(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """transformers 5 holds a Qwen3-MoE layer's experts in two 3-D parameters (``mlp.experts.gate_up_proj``
    [E, 2F, H], ``mlp.experts.down_proj`` [E, H, F]); checkpoints, the trainer's export and transformers 4
    name each expert's matrices (``mlp.experts.{e}.gate_proj.weight`` ...). Views of those names into the
    3-D parameters: a weight update copied into one changes the model; and the 3-D parameters' own names
    (both empty for other models)."""
    views: dict[str, torch.Tensor] = {}
    fused: set[str] = set()
    for name, param in model.named_parameters():
        prefix, _, part = name.rpartition(".")
        if not prefix.endswith("mlp.experts") or part not in ("gate_up_proj", "down_proj") or param.dim() != 3:
            continue
        fused.add(name)
        tensor = param.detach()
        for expert in range(tensor.shape[0]):
            if part == "down_proj":
                views[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert]
            else:
                half = tensor.shape[1] // 2
                views[f"{prefix}.{expert}.gate_proj.weight"] = tensor[expert, :half]
                views[f"{prefix}.{expert}.up_proj.weight"] = tensor[expert, half:]
    return views, fused


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a float tensor: its min and max in one pass (NaN propagates through both),
    ~9x faster than ``isfinite(t).all()``, which builds a mask as large as the tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _chunks(groups: list, max_rows: int, max_tokens: int, sequences: list[list[int]]) -> list[list]:
    """Prefix groups in chunks of at most ``max_rows`` sequences and ``max_tokens`` positions (rows x
    the chunk's longest sequence); a group over either limit is its own chunk."""
    chunks, current, rows, longest = [], [], 0, 0
    for group in groups:
        size = max(len(sequences[i]) for i in group[1])
        if current and (rows + len(group[1]) > max_rows or (rows + len(group[1])) * max(longest, size) > max_tokens):
            chunks.append(current)
            current, rows, longest = [], 0, 0
        current.append(group)
        rows, longest = rows + len(group[1]), max(longest, size)
    return chunks + ([current] if current else [])


def _records(scores, continuations: list[list[int]]) -> list[dict[str, Any]]:
    """Per continuation: views into the batch's :class:`~megatron_opd.rollout.generation.TokenScores`."""
    records, offset = [], 0
    for b, cont in enumerate(continuations):
        n = len(cont)
        record: dict[str, Any] = {"logprobs": scores.logprobs[offset:offset + n], "cached_tokens": 0, "computed_tokens": n}
        if scores.top_ids is not None:
            record["top_logprobs"], record["top_ids"] = scores.top_logprobs[offset:offset + n], scores.top_ids[offset:offset + n]
        if scores.ids_logprobs is not None:
            record["ids_logprobs"] = scores.ids_logprobs[b]
        records.append(record)
        offset += n
    return records
