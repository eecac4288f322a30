"""Checkpoints through megatron-core's ``dist_checkpointing`` (torch_dist), written atomically.

Layout of a checkpoint root::

    root/latest                       name of the newest complete step directory
    root/step-00000010/meta.json      format, step, layout, vocab sizes (written last: marks complete)
    root/step-00000010/hf/            HF config + tokenizer files of the model
    root/step-00000010/dist/          weights (+ optimizer state) as megatron sharded tensors
    root/step-00000010/train/rank00003.pt   schedule, data position, RNG of each rank (training)

``dist/`` holds every tensor once, by its global shape and offsets, so a checkpoint written at one
TP x PP x DP layout loads at any other (megatron reshards on load: ``resume at another layout``); the
optimizer's Adam moments and fp32 main params are sharded the same way. RNG states belong to a rank
of a layout and are restored only when the layout is unchanged (the trainer's models have no dropout
and generation draws from explicitly seeded generators, so a layout change loses nothing it uses).

A step is written to ``root/.tmp-step-…`` and renamed into place only once every rank has finished,
so a crash while saving leaves the previous checkpoint as the latest loadable one. A write that fails
on any rank (a full disk) stops every rank with :class:`CheckpointError` naming the path and the free
space, and the partial directory is removed. Like every
torch_dist checkpoint, ``dist/.metadata`` is a pickle: load checkpoints you (or your cluster) wrote.
"""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.model.bridge import ModelBundle, copy_tokenizer_files, save_hf_config
from megatron_opd.platform.cpu_compat import cpu_compat
from megatron_opd.platform.faults import maybe_fail_write, maybe_kill

FORMAT = "megatron-opd-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the current model."""


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded(bundle: ModelBundle, optimizer: Any | None, is_loading: bool) -> dict[str, Any]:
    chunks = bundle.chunks
    models = {("model" if len(chunks) == 1 else f"model{i}"): c.sharded_state_dict() for i, c in enumerate(chunks)}
    sharded: dict[str, Any] = dict(models)
    if optimizer is not None:
        merged: dict[str, Any] = {}
        for sd in models.values():
            merged.update(sd)
        sharded["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading)
    return sharded


def _synchronous_writes() -> None:
    # The torch_dist writer hands its results back through a queue that, for *asynchronous* saves,
    # lives in a spawned manager process (re-importing the entry module: ~10 s per rank on first use).
    # Saves here are synchronous — the results are put by this very process — so a thread queue does.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    root: str | Path,
    step: int,
    bundle: ModelBundle,
    optimizer: Any | None = None,
    train_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    tokenizer_src: str | Path | None = None,
) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the step and prunes old ones.
    ``optimizer`` (a megatron optimizer) and ``train_state`` (this rank's schedule / data / RNG, a
    ``weights_only``-loadable dict) are saved for training checkpoints."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    rank = _rank()
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    failure = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in ("hf", "dist", "train"):
                (tmp / sub).mkdir(parents=True)
    except OSError as exc:
        failure = exc
    if not _all_ok(failure):
        _failed_save(root, tmp, step, failure)
    _synchronous_writes()
    try:
        with cpu_compat():
            dist_checkpointing.save(_sharded(bundle, optimizer, is_loading=False), str(tmp / "dist"))
        if train_state is not None:
            write_train_state(train_state, tmp / "train" / f"rank{rank:05d}.pt")
        if rank == 0:
            save_hf_config(bundle.hf_config, tmp / "hf")
            copy_tokenizer_files(tokenizer_src, tmp / "hf")
        maybe_fail_write("save", step, _rank())
    except (Exception, CheckpointException) as exc:  # OSError, or DCP's CheckpointException (a BaseException)
        failure = exc
    if not _all_ok(failure):  # every rank learns that one failed: none publishes, none waits forever
        _failed_save(root, tmp, step, failure)
    if rank == 0:
        maybe_kill("save", step, rank)  # crash-safety test: shards written, step not published
        meta = {
            "format": FORMAT,
            "step": step,
            **_layout(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "vocab_size": bundle.vocab_size,
            "padded_vocab_size": bundle.padded_vocab_size,
            "has_optimizer": optimizer is not None,
            "has_train_state": train_state is not None,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def write_train_state(state: dict, path: Path) -> None:
    """torch.save into memory, then one write of ours: a full disk raises OSError ENOSPC ("No space left on
    device"), where torch.save to the path raises "[enforce fail at inline_container.cc] unexpected pos", which
    names no cause. The train state is small (counters, RNG states, data positions)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def _all_ok(failure: BaseException | None) -> bool:
    """Collective: True when no rank failed (a MAX all-reduce of the failure flags; a barrier as well)."""
    if not dist.is_initialized():
        return failure is None
    from megatron_opd.platform.dist import comm_device

    flag = torch.tensor([0.0 if failure is None else 1.0], device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _failed_save(root: Path, tmp: Path, step: int, failure: BaseException | None) -> None:
    """A checkpoint write failed on some rank (a full disk, an I/O error): remove the partial step (rank 0)
    and stop with a message naming the path and the free space; the last complete step stays ``latest``."""
    free_at_failure = _free_bytes(root)  # every rank has written or failed (the collective check came first)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    after = _free_bytes(root)
    free = "free space unknown" if after is None else f"{after / 2**20:.1f} MiB free there"
    latest = find_latest(root)
    cause = _shared_cause(failure)
    if "No space left on device" not in cause and free_at_failure is not None and free_at_failure < _FULL_BYTES:
        # torch.save into a stream (DCP's shard writer) reports a cut-short write as "unexpected pos", not ENOSPC
        cause += (f"; the file system was full: No space left on device ({free_at_failure / 2**10:.0f} KiB free "
                  "when the write failed)")
    kept = f"{latest.name} stays the latest checkpoint" if latest is not None else "no earlier checkpoint"
    raise CheckpointError(f"writing checkpoint step {step} under {root} failed: {cause} ({free}); the partial "
                          f"step was removed and {kept}")


_FULL_BYTES = 256 * 2**10  # less free than this after a failed write: the write ran out of space


def _free_bytes(root: Path) -> int | None:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return None


def _shared_cause(failure: BaseException | None) -> str:
    """Collective: why the save failed, as the first rank that knows says it — on every rank, so whichever rank's
    message the user sees names the cause (the launcher stops the others when the first rank exits)."""
    knows = failure is not None and getattr(failure, "failures", None) != {}  # DCP tells only its coordinator why
    mine = _last_line(failure) if knows else ""
    if not dist.is_initialized():
        return mine or "failed"
    from megatron_opd.platform.dist import comm_device

    world, rank = dist.get_world_size(), dist.get_rank()
    who = torch.tensor([rank if mine else world], dtype=torch.int64, device=comm_device())
    dist.all_reduce(who, op=dist.ReduceOp.MIN)
    source = int(who.item())
    if source == world:
        return "failed (no rank reported why)"
    text = torch.zeros(_CAUSE_BYTES, dtype=torch.uint8, device=comm_device())
    if rank == source:
        encoded = mine.encode()[:_CAUSE_BYTES]
        text[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    dist.broadcast(text, src=source)
    said = bytes(text.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
    return said if rank == source else f"{said} (on rank {source})"


_CAUSE_BYTES = 1024


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


def _last_line(exc: BaseException) -> str:
    """DCP's exceptions carry every rank's traceback: keep the final line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def load_checkpoint(step_dir: str | Path, bundle: ModelBundle, optimizer: Any | None = None) -> dict[str, Any] | None:
    """Load the weights (and, given ``optimizer``, its state) into this rank's shards at the current
    layout, whatever layout saved them. Returns this rank's train state (None if not saved); its
    ``rng`` entry only when the layout is the saved one."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    if meta["padded_vocab_size"] != bundle.padded_vocab_size:
        raise CheckpointError(
            f"{step_dir}: saved with a padded vocabulary of {meta['padded_vocab_size']}, the model has "
            f"{bundle.padded_vocab_size} (set model.vocab_divisible_by to match)"
        )
    with_optimizer = optimizer is not None and meta.get("has_optimizer", False)
    try:
        with cpu_compat():
            loaded = dist_checkpointing.load(_sharded(bundle, optimizer if with_optimizer else None, is_loading=True),
                                             str(step_dir / "dist"))
        for i, chunk in enumerate(bundle.chunks):
            chunk.load_state_dict(loaded["model" if len(bundle.chunks) == 1 else f"model{i}"])
        if with_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
    except (Exception, CheckpointException) as exc:  # many types for missing, truncated, mismatched data
        raise CheckpointError(f"{step_dir / 'dist'}: missing, corrupt or not this model's checkpoint ({_last_line(exc)})") from None
    if not meta.get("has_train_state"):
        return None
    same_layout = all(meta.get(k) == v for k, v in _layout().items())
    train_path = step_dir / "train" / f"rank{(_rank() if same_layout else 0):05d}.pt"
    try:
        saved = torch.load(train_path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{train_path}: missing or corrupt train state ({exc})") from None
    if not same_layout:
        saved.pop("rng", None)
    return saved
