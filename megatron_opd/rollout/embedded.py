"""The embedded rollout engine: a ``transformers`` model holding HF-named weights, generating on CPU.

Implements the :class:`~megatron_opd.rollout.types.Engine` protocol in-process; ``opd serve --role
rollout`` puts the same object behind SGLang's HTTP API.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_opd.rollout.decoder import Decoder
from megatron_opd.rollout.generation import MAX_BATCH, generate, score_batch
from megatron_opd.records import Rollout, SamplingParams


SCORE_ROWS = 16  # sequences per scoring batch: sorted by length, so padding stays small


class EmbeddedEngine:
    def __init__(self, model_dir: str | Path, batch_size: int = MAX_BATCH, weight_version: str = "0") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(str(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.decoder = Decoder(self.model)
        self.batch_size = batch_size
        self.weight_version = weight_version
        self._paused = False
        self._lock = threading.Condition()  # one generation or weight update at a time

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
        """``sampling.n`` completions per prompt, grouped by prompt, each tagged with its version.
        ``on_rollout(j, rollout)`` hears of output j as soon as it has ended (streaming)."""
        expanded = [(i, k, p) for i, p in enumerate(prompts) for k in range(sampling.n)]
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        with self._lock:
            self._lock.wait_for(lambda: not self._paused)  # checked under the lock: no half-synced weights
            version = self.weight_version

            def rollout(j: int, c) -> Rollout:
                i, k, p = expanded[j]
                return Rollout(list(p), c.token_ids, c.logprobs, c.finish_reason, version, i, k)

            completions = generate(
                self.model, [p for _, _, p in expanded], sampling.max_new_tokens, self.eos_token_id,
                self.pad_token_id, temperature=sampling.temperature, seed=seed,
                batch_size=self.batch_size, top_k=sampling.top_k, top_p=sampling.top_p,
                stop_token_ids=sampling.stop_token_ids, decoder=self.decoder,
                on_complete=(lambda j, c: on_rollout(j, rollout(j, c))) if on_rollout else None,
            )
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
            for chunk in _chunks(ordered, min(self.batch_size, SCORE_ROWS)):
                prefixes = [list(prefix) for prefix, _ in chunk]
                members = [(g, i) for g, (_, rows) in enumerate(chunk) for i in rows]
                conts = [sequences[i][starts[i]:] for _, i in members]
                table = score_batch(self.decoder, prefixes, [g for g, _ in members], conts, self.pad_token_id)
                ids = [token_ids[i] for _, i in members] if token_ids is not None else None
                for (g, i), record in zip(members, _records(table, conts, top_k, ids)):
                    record["cached_tokens"] = len(prefixes[g])  # SGLang's accounting: reused prefix tokens
                    out[i] = record
                for prefix, rows in chunk:  # the first member of each group paid for its prefix
                    out[rows[0]]["cached_tokens"] = 0
                    out[rows[0]]["computed_tokens"] += len(prefix)
        return out

    # -- weights ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict(keep_vars=True))

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterator[tuple[str, torch.Tensor]], version: str) -> int:
        """Copy HF-named tensors into the model. Every name and shape is checked before anything is
        copied, so a bad update leaves the model as it was. Returns the count."""
        params = self._tensors()
        items = list(named_tensors)
        for name, tensor in items:
            if name not in params:
                raise KeyError(f"weight {name!r} does not exist in the rollout model")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
        with self._lock:
            for name, tensor in items:
                params[name].data.copy_(tensor.to(params[name].dtype))
            self.weight_version = version
        return len(items)

    def update_weights_from_disk(self, model_dir: str | Path, version: str) -> int:
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
        return self.update_weights((kv for f in files for kv in load_file(str(f)).items()), version)

    def init_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          backend: str = "gloo") -> None:
        from megatron_opd.rollout.update_group import WeightUpdateGroup

        self._group = WeightUpdateGroup(master_address, master_port, rank_offset, world_size, backend)

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

        params = self._tensors()
        fits = all(n in params and list(params[n].shape) == list(sh) and params[n].dtype == parse_dtype(dt)
                   for n, dt, sh in zip(names, dtypes, shapes))
        if load_format == FLATTENED_BUCKET:
            sizes = bucket_nbytes(dtypes, shapes)
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            group.broadcast(flat, root=0)  # always drain the broadcast, so a bad name cannot hang the trainer
            pieces, offset = [], 0
            for dtype, shape, size in zip(dtypes, shapes, sizes):
                pieces.append(flat[offset:offset + size].view(parse_dtype(dtype)).view(shape))
                offset += size
            if fits:
                with self._lock, torch.no_grad():
                    for name, piece in zip(names, pieces):
                        params[name].data.copy_(piece)
                    if version:
                        self.weight_version = version
                return len(names)
            return self.update_weights(zip(names, pieces), version or self.weight_version)
        if fits:  # receive straight into the parameters: no staging copy
            with self._lock, torch.no_grad():
                for name in names:
                    group.broadcast(params[name].data, root=0)
                if version:
                    self.weight_version = version
            return len(names)
        incoming = [torch.empty(shape, dtype=parse_dtype(dtype)) for dtype, shape in zip(dtypes, shapes)]
        for tensor in incoming:  # always drain the broadcasts, so a bad name cannot hang the trainer
            group.broadcast(tensor, root=0)
        return self.update_weights(zip(names, incoming), version or self.weight_version)

    def destroy_update_group(self) -> None:
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            group.close()

    def get_weight(self, name: str) -> torch.Tensor:
        params = self._tensors()
        if name not in params:
            raise KeyError(f"weight {name!r} does not exist in the rollout model")
        return params[name].detach().clone()

    # -- control ------------------------------------------------------------------------------
    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def health(self) -> bool:
        return True


def _chunks(groups: list, max_rows: int) -> list[list]:
    """Prefix groups in chunks of at most ``max_rows`` sequences (a larger group is its own chunk)."""
    chunks, current, rows = [], [], 0
    for group in groups:
        if current and rows + len(group[1]) > max_rows:
            chunks.append(current)
            current, rows = [], 0
        current.append(group)
        rows += len(group[1])
    return chunks + ([current] if current else [])


def _records(table: torch.Tensor, continuations: list[list[int]], top_k: int,
             token_ids: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """Per continuation: its tokens' log-probs from ``table`` [B, longest, V] (+ top-k), gathered for
    the whole batch at once; each record holds views into the batch's tensors."""
    lengths = torch.tensor([len(c) for c in continuations])
    ids = torch.zeros(table.shape[:2], dtype=torch.long)
    for b, cont in enumerate(continuations):
        ids[b, : len(cont)] = torch.tensor(cont, dtype=torch.long)
    token_lp = table.gather(-1, ids[..., None])[..., 0]
    values = indices = None
    if top_k:
        values, indices = torch.topk(table, top_k, dim=-1)
    records = []
    for b, n in enumerate(lengths.tolist()):
        record: dict[str, Any] = {"logprobs": token_lp[b, :n], "cached_tokens": 0, "computed_tokens": n}
        if top_k:
            record["top_logprobs"], record["top_ids"] = values[b, :n], indices[b, :n]
        if token_ids is not None:
            wanted = torch.tensor(token_ids[b], dtype=torch.long)
            record["ids_logprobs"] = table[b, :n].index_select(-1, wanted)
        records.append(record)
    return records
