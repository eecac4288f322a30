"""Sharded megatron-opd checkpoints, written atomically.

Layout of a checkpoint root::

    root/latest                      name of the newest complete step directory
    root/step-00000010/meta.json     format, step, tp, pp, vocab sizes (written last: marks complete)
    root/step-00000010/hf/           HF config + tokenizer files of the model
    root/step-00000010/model_tp{t}_pp{p}.safetensors   this shard's parameters
    root/step-00000010/train_tp{t}_pp{p}.pt            optimizer/scheduler/RNG/data state (training)

A step is written to ``root/.tmp-step-…`` and renamed into place only once every rank has finished,
so a crash while saving leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_opd.model.bridge import ModelBundle, copy_tokenizer_files
from megatron_opd.platform.faults import maybe_kill

FORMAT = "megatron-opd-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the current layout."""


def _ranks() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        dist.get_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shard_tensors(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, value in bundle.model.state_dict().items():
        if isinstance(value, torch.Tensor) and "_extra_state" not in name:
            tensors[name] = value.detach().to("cpu").contiguous().clone()
    return tensors


def save_checkpoint(
    root: str | Path,
    step: int,
    bundle: ModelBundle,
    train_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    tokenizer_src: str | Path | None = None,
) -> Path:
    """Collective: every rank writes its shard; rank 0 publishes the step and prunes old ones."""
    from megatron.core import parallel_state as ps

    root = Path(root)
    rank, tp_rank, pp_rank, dp_rank = _ranks()
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "hf").mkdir(parents=True)
    _barrier()
    if dp_rank == 0:
        save_file(_shard_tensors(bundle), str(tmp / f"model_tp{tp_rank}_pp{pp_rank}.safetensors"))
        if train_state is not None:
            torch.save(train_state, tmp / f"train_tp{tp_rank}_pp{pp_rank}.pt")
    _barrier()
    if rank == 0:
        maybe_kill("save", step, rank)  # crash-safety test: shards written, step not published
        bundle.hf_config.save_pretrained(str(tmp / "hf"))
        copy_tokenizer_files(tokenizer_src, tmp / "hf")
        meta = {
            "format": FORMAT,
            "step": step,
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vocab_size": bundle.vocab_size,
            "padded_vocab_size": bundle.padded_vocab_size,
            "has_train_state": train_state is not None,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _complete_steps(root: Path) -> list[Path]:
    steps = [p for p in root.glob("step-*") if (p / "meta.json").is_file()]
    return sorted(steps, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    for old in _complete_steps(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete step under ``root`` (or ``root`` itself if it is a step), else None."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    steps = _complete_steps(root) if root.is_dir() else []
    return steps[-1] if steps else None


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    step_dir = Path(step_dir)
    meta_path = step_dir / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{step_dir}: not a megatron-opd checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def resolve(path: str | Path) -> Path:
    """A step directory from a checkpoint root or step path, with a clear error if there is none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    step_dir = find_latest(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no step-*/meta.json)")
    read_meta(step_dir)
    return step_dir


def load_checkpoint(step_dir: str | Path, bundle: ModelBundle) -> dict[str, Any] | None:
    """Load this rank's shard into ``bundle``; returns its train state (or None if not saved)."""
    from megatron.core import parallel_state as ps

    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (meta["tp"], meta["pp"]) != (tp, pp):
        raise CheckpointError(
            f"{step_dir}: saved with tp={meta['tp']} pp={meta['pp']} but running tp={tp} pp={pp}; "
            "export it to HF (opd export-hf) and convert to the new layout"
        )
    _, tp_rank, pp_rank, _ = _ranks()
    shard = step_dir / f"model_tp{tp_rank}_pp{pp_rank}.safetensors"
    try:
        tensors = load_file(str(shard))
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"{shard}: missing or corrupt shard ({exc})") from None
    expected = _shard_tensors(bundle)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{shard}: tensors do not match the model (different architecture?)")
    with torch.no_grad():
        state = bundle.model.state_dict()
        for name, value in tensors.items():
            state[name].copy_(value)
    train_path = step_dir / f"train_tp{tp_rank}_pp{pp_rank}.pt"
    if not meta.get("has_train_state"):
        return None
    try:
        return torch.load(train_path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{train_path}: missing or corrupt train state ({exc})") from None
