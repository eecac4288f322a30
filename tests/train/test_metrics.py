"""The metrics sink: metrics.jsonl, TensorBoard and Weights & Biases (offline) carry the same series.

The W&B run is read back from its own files: an offline run is a ``run-<id>.wandb`` file in LevelDB's
log format (a 7-byte W&B header, then 32 KiB blocks of checksummed records), each record one
``wandb.proto`` ``Record`` message; history records hold a step's metrics as JSON values.
"""
import json
import struct
from pathlib import Path

import pytest

from helpers import opd, read_metrics, sft_recipe

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra is not installed")

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every record of an offline W&B run file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a record header is zero padding
            pos += room
            continue
        _checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # preallocated space after the last record
            pos += room
            continue
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    history: dict[int, dict[str, float]] = {}
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
        step = int(items.pop("_step", record.history.step.num))
        history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def tensorboard_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            by_step.setdefault(event.step, {})[tag] = event.value
    return by_step


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_tensorboard_series(tiny_world, tmp_path):
    out = tmp_path / "run"
    recipe = sft_recipe(tiny_world, out, steps=4, log_interval=1, eval_interval=2)
    opd("run", str(recipe), "run.wandb.project=opd-test", "run.wandb.mode=offline")

    jsonl: dict[int, dict] = {}  # a step's train and eval records merged (W&B merges what is logged at one step)
    for r in read_metrics(out):
        jsonl.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    (first_run,) = out.glob("wandb/offline-run-*/run-*.wandb")
    board, wb = tensorboard_scalars(out), wandb_history(first_run)
    assert sorted(wb) == sorted(board) == sorted(jsonl) == [0, 1, 2, 3, 4]  # 0: the eval before training
    for step in jsonl:
        assert sorted(wb[step]) == sorted(board[step]), step  # the same metric names, step by step
        assert step == 0 or {"train/loss", "train/grad_norm", "train/lr"} <= set(wb[step])
        for key, value in jsonl[step].items():
            assert wb[step][key] == pytest.approx(value, rel=1e-12), (step, key)  # W&B keeps the value as JSON
            assert board[step][key] == pytest.approx(value, rel=1e-6), (step, key)  # TensorBoard stores float32
    assert [step for step in sorted(wb) if "eval/loss" in wb[step]] == [0, 2, 4]  # the eval records went too

    run_id = (out / "wandb_id").read_text().strip()
    assert (next(out.glob("wandb/offline-run-*")) / f"run-{run_id}.wandb").is_file()
    config = next(r for r in read_wandb_records(first_run) if r.WhichOneof("record_type") == "run").run.config
    recorded = {item.key: json.loads(item.value_json) for item in config.update}
    assert recorded["train"]["steps"] == 4 and recorded["kind"] == "sft"  # the resolved recipe
    assert recorded["run"]["wandb"] == {"project": "opd-test", "mode": "offline", "entity": None, "name": None, "tags": []}


    # resumed with two more steps: the same W&B run id, a second offline run holding only the new steps
    opd("run", str(recipe), "train.steps=6", "run.wandb.project=opd-test", "run.wandb.mode=offline")
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert [p.name for p in runs] == [f"run-{run_id}.wandb"] * 2
    resumed = wandb_history(runs[1])
    assert sorted(resumed) == [5, 6] and resumed[6]["train/loss"] == pytest.approx(
        next(r["train/loss"] for r in read_metrics(out) if r["step"] == 6 and "train/loss" in r), rel=1e-12)

def test_run_wandb_without_the_package_stops_before_anything_starts(monkeypatch, tmp_path, tiny_world):
    import importlib.util

    from megatron_opd.config import load_recipe
    from megatron_opd.pipeline.preflight import preflight_tracking

    cfg = load_recipe(sft_recipe(tiny_world, tmp_path / "run"), ["run.wandb.project=p"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"run.wandb is set but the wandb package is not installed: pip install"):
        preflight_tracking(cfg)
