"""Checks of a recipe, its model and its run directory that need no process: done by the CLI before
torchrun or any server starts, so a bad input stops the run with one clear line."""

from __future__ import annotations

from pathlib import Path


def preflight_model(hf_path: Path, tp: int, pp: int, ep: int = 1, routing_replay: bool = False) -> None:
    """Checks that need only config.json and the weight files' headers, done before any process starts."""
    from megatron_opd.model.hf_config import check_parallel_fit, num_experts, read_config_json

    config = read_config_json(hf_path)
    check_parallel_fit(config, tp, pp, where=str(hf_path), ep=ep)
    if routing_replay and not num_experts(config):
        raise ValueError(f"train.routing_replay: {hf_path} is a dense model (no experts to replay); set it false")
    readable_weights(Path(hf_path))


def readable_weights(hf_dir: Path) -> None:
    """Every ``*.safetensors`` of an HF directory opens (header and size agree): a truncated or
    corrupt file is an error naming it, not a traceback from a worker."""
    from safetensors import safe_open

    for path in sorted(hf_dir.glob("*.safetensors")):  # none: a checkpoint's config-only hf/ (its weights are in dist/)
        try:
            with safe_open(str(path), "np"):  # reads the header only ("np": no torch import here)
                pass
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); truncated or corrupt?") from None


# what may change between a run and its resumption: where it runs and for how long, how often it
# saves / logs / evaluates, and the layout (checkpoints reshard on load)
RESUMABLE_CHANGES = ("run.", "parallel.", "launch.", "eval.", "train.steps", "train.save_interval", "train.keep_last",
                     "train.log_interval", "train.eval_interval", "train.resume", "rollout.urls", "teachers.teachers.*.urls")


def preflight_resume(cfg) -> None:
    """Stop before anything starts when the run directory holds a checkpoint of a different config."""
    import fnmatch

    import yaml

    out = Path(cfg.run.output_dir)
    if not cfg.train.resume or cfg.train.resume_changed_config or not (out / "checkpoints" / "latest").is_file():
        return
    try:
        before = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # no record of the earlier config (a run from before config.yaml was kept)

    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    old, new = flat(before), flat(cfg.model_dump(mode="json"))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
               and not any(key.startswith(p) if p.endswith(".") else fnmatch.fnmatch(key, p) for p in RESUMABLE_CHANGES)]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        raise ValueError(f"{out} holds a checkpoint of a run with a different config ({shown}"
                         f"{f'; and {len(changed) - 8} more' if len(changed) > 8 else ''}): resuming it would train "
                         "the old run under the new settings. Use a new run.output_dir, or train.resume_changed_config=true "
                         "to resume it anyway")


def preflight_tracking(cfg) -> None:
    """``run.wandb`` needs the wandb package (an extra): say so before any process starts."""
    import importlib.util

    if cfg.run.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ValueError("run.wandb is set but the wandb package is not installed: pip install 'megatron-opd[wandb]' "
                         "(or pip install wandb), or unset run.wandb")


def preflight_cascade(cfg) -> None:
    from megatron_opd.data.world import available_domains

    if not (Path(cfg.start) / "config.json").is_file():
        raise ValueError(f"start: {cfg.start} is not an HF checkpoint (no config.json)")
    have = available_domains(cfg.eval.world_dir)
    unknown = [d for d in cfg.eval.domains if d not in have]
    if unknown or not have:
        raise ValueError(f"eval.domains: {unknown or cfg.eval.domains} not in {cfg.eval.world_dir} (has {have})")
    rows = {d: sum(1 for line in (Path(cfg.eval.world_dir) / "data" / d / "test.jsonl").open() if line.strip()) for d in have}
    short = [d for d in (cfg.eval.domains or have) if rows[d] < cfg.eval.samples]
    if short:
        raise ValueError(f"eval.samples: {cfg.eval.samples} rows asked, but {short} have only {[rows[d] for d in short]}")
    for i, stage in enumerate(cfg.stages):
        where = f"stages.{i} ({stage.name})"
        domains = (stage.select.domains if stage.select else [stage.compare.domain] if stage.compare
                   else list(stage.specialists.specialists) if stage.specialists else [])
        unknown = [d for d in domains if d not in have]
        if unknown:
            raise ValueError(f"{where}: domains {unknown} not in {cfg.eval.world_dir} (has {have})")
        spec = stage.select or stage.compare
        if spec and any(rows[d] < spec.offset + spec.samples for d in domains):
            raise ValueError(f"{where}: choice rows {spec.offset}..{spec.offset + spec.samples - 1} run past the "
                             f"held-out split ({min(rows[d] for d in domains)} rows)")
        if stage.compare and stage.compare.teacher and not (Path(stage.compare.teacher) / "config.json").is_file():
            raise ValueError(f"{where}: compare.teacher {stage.compare.teacher} is not an HF checkpoint (no config.json)")


def preflight_opd(cfg) -> None:
    """Everything an OPD run needs that can be checked before any process starts."""
    if cfg.rollout.engine == "servers" and not cfg.rollout.urls:
        raise ValueError("rollout.urls: empty — give the rollout servers' URLs, or start the job with "
                         "`opd launch RECIPE --executor slurm`, which places the servers and fills them in")
    for name, teacher in (cfg.teachers.teachers if cfg.teachers else {}).items():
        if not teacher.urls and teacher.model is not None and not teacher.live and not (Path(teacher.model) / "config.json").is_file():
            raise ValueError(f"teachers.teachers.{name}.model: {teacher.model} is not an HF checkpoint (no config.json)")
    from megatron_opd.wire.process import vllm_python  # the vLLM venvs the run would start servers from exist

    if cfg.rollout.engine == "vllm" and not cfg.rollout.urls:
        vllm_python(cfg.rollout.vllm_python)
    for name, teacher in (cfg.teachers.teachers.items() if cfg.teachers else []):
        if teacher.engine == "vllm":
            vllm_python(teacher.vllm_python, f"teachers.teachers.{name}.vllm_python")
    on_gpu = [f"teachers.teachers.{n}.device" for n, t in (cfg.teachers.teachers.items() if cfg.teachers else [])
              if t.device == "cuda" and t.model is not None and not t.urls]
    on_gpu += ["rollout.device"] if cfg.rollout.device == "cuda" and cfg.rollout.engine != "servers" else []
    if on_gpu and not any(Path("/dev").glob("nvidia[0-9]*")):
        raise ValueError(f"{', '.join(on_gpu)}: cuda, but this machine has no NVIDIA GPU (no /dev/nvidia*)")
    crossing = {n: t for n, t in (cfg.teachers.teachers.items() if cfg.teachers else []) if t.cross_tokenizer}
    if crossing and cfg.loss.kind != "sampled_token":
        check_shared_vocabulary(cfg.model.hf_path, crossing, cfg.loss.kind)
    if cfg.eval.world_dir is not None:
        from megatron_opd.data.world import available_domains

        have = available_domains(cfg.eval.world_dir)
        unknown = [d for d in cfg.eval.domains if d not in have]
        if unknown or not have:
            raise ValueError(f"eval.domains: {unknown or cfg.eval.domains} not in {cfg.eval.world_dir} (has {have})")


def check_shared_vocabulary(student_dir: Path, crossing: dict, loss_kind: str) -> None:
    """A top-k loss with a cross-tokenizer teacher reads its top-k through the tokens the two
    vocabularies share: stop before anything starts if they share none."""
    from transformers import AutoTokenizer

    from megatron_opd.teachers.cross_tokenizer import build_vocab_map

    student = AutoTokenizer.from_pretrained(str(student_dir))
    for name, teacher in crossing.items():
        vocab = build_vocab_map(student, AutoTokenizer.from_pretrained(str(teacher.tokenizer or teacher.model)))
        if vocab.shared == 0:
            raise ValueError(f"teachers.teachers.{name}: cross_tokenizer with loss.kind {loss_kind!r}: no token of "
                             f"the teacher's vocabulary is a student token ({vocab.summary()}), so its top-k says "
                             "nothing about the student's; use loss.kind 'sampled_token'")
        print(f"[preflight] teacher {name!r} top-k over the shared vocabulary: {vocab.summary()}", flush=True)


# a run directory is a directory of its own: never one of these (as root, `run.output_dir=/` once wrote
# checkpoints, logs and plots into /), nor anything inside the system trees
SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
               "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/tmp"}
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def checkpoint_bytes(hf_path: Path, dtype: str) -> int:
    """About one training checkpoint of this model: its weights in ``dtype``, Adam's two fp32 moments and,
    for bf16, the optimizer's fp32 main parameters (counted from the safetensors headers)."""
    import json
    import struct

    params = 0
    for path in Path(hf_path).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                numel = 1
                for dim in entry["shape"]:
                    numel *= dim
                params += numel
    per_param = (2 + 4 if dtype == "bfloat16" else 4) + 8
    return params * per_param


def preflight_output_dir(out: Path, need_bytes: int = 0, what: str = "run.output_dir") -> None:
    """Before any process starts: ``out`` is a directory of its own (not ``/`` or a system directory,
    not a file), writable, with room for one checkpoint (``need_bytes``). Creates it."""
    import shutil
    import tempfile

    resolved = Path(out).expanduser().resolve()
    text = str(resolved)
    if text in SYSTEM_DIRS or any(text == tree or text.startswith(tree + "/") for tree in SYSTEM_TREES):
        raise ValueError(f"{what} {out}: a system directory ({text}); name a directory of the run's own")
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"{what} {out}: exists and is not a directory")
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=resolved) as probe:
            probe.write(b"x")
    except OSError as exc:
        raise ValueError(f"{what} {out}: not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(resolved).free
    if free < need_bytes:
        raise ValueError(f"{what} {out}: {free / 2**20:.1f} MiB free on its file system, and one checkpoint of this "
                         f"model needs about {need_bytes / 2**20:.1f} MiB (weights and optimizer state); free some space "
                         f"or choose another {what}")
