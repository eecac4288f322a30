"""Teacher recipes: endpoints or checkpoints, and which teachers score which domain tag, with what
weight (``megatron_opd.teachers.router`` turns a ``RoutingSpec`` into per-sample / per-token weights)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from megatron_opd.config.base import Strict


class TeacherSpec(Strict):
    """One teacher: running endpoints (``urls``) or a checkpoint served by embedded teacher servers."""

    urls: list[str] = Field(default_factory=list, description="running SGLang / embedded / OpenAI-compatible servers")
    model: Path | None = Field(None, description="HF checkpoint: launched as `opd serve --role teacher` when urls is "
                                "empty; with urls, the model they must serve (checked against /model_info first); "
                                "`self`: the student's starting weights (model.hf_path), for self-distillation; "
                                "`live`: the rollout engine's current weights (its servers score)")
    backend: Literal["sglang", "openai"] = Field(
        "sglang", description="the API of the teacher's servers: sglang: SGLang's /generate scoring (also `opd "
        "serve`); openai: OpenAI-compatible /v1/completions with vLLM's prompt_logprobs (needs urls and "
        "served_model_name)")
    served_model_name: str | None = Field(None, description="the `model` field for OpenAI-compatible servers")
    engine: Literal["embedded", "vllm"] = Field(
        "embedded", description="what serves a `model` teacher the run starts itself: embedded (`opd serve --role "
        "teacher`) or vllm (vLLM's OpenAI server from vllm_python, scored through backend 'openai')")
    vllm_python: str | None = Field(None, description="engine vllm: the vLLM venv's python (default: $OPD_VLLM_PYTHON)")
    tokenizer: Path | None = Field(None, description="local tokenizer for the parity check (default: model)")
    replicas: int = Field(1, ge=1, description="embedded servers to launch (model only)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="embedded servers (model only): where the model runs")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    batch_size: int = Field(32, ge=1, description="sequences per scoring request")
    max_concurrency: int = Field(4, ge=1, description="requests in flight per teacher")
    timeout_s: float = Field(600.0, gt=0, description="one scoring request (a batch of samples) gives up after this; "
                             "a timed-out request counts as the replica failing")
    max_retries: int = Field(3, ge=0, description="a scoring request that failed retryably (unreachable, timed out, "
                             "rate-limited, server error) is retried on another replica up to this many times, then "
                             "the run stops")
    binary: bool = Field(True, description="accept the embedded server's binary score payload")
    cross_tokenizer: bool = Field(False, description="the teacher has its own tokenizer and chat template: each "
                                  "completion is re-tokenized for it and its log-probs mapped back onto the student's "
                                  "tokens by character offsets, its top-k through the shared vocabulary (every loss.kind; not with student "
                                  "token sets or confidence weighting; no parity check)")
    context_window: int | None = Field(None, ge=2, description="the teacher's context window in tokens (default: "
                                       "`model`'s max_position_embeddings where it is a local checkpoint): a prompt as "
                                       "the teacher sees it plus rollout.max_new_tokens must fit (data.over_teacher_window)")
    context: str | None = Field(None, description="a privileged context for this teacher only (on-policy "
                                "self-distillation): its last user turn becomes this template over the row's fields "
                                "{prompt} (the student's last user turn), {response} (the row's own answer: its last "
                                "assistant turn) and {meta.KEY}; the teacher scores the student's exact completion "
                                "tokens after it, the student never sees it")

    @field_validator("context")
    @classmethod
    def _context_fields(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    @model_validator(mode="after")
    def _endpoint(self) -> "TeacherSpec":
        if not self.urls and self.model is None:
            raise ValueError("give `urls` (running servers) or `model` (a checkpoint to serve)")
        if self.engine == "vllm":
            if self.urls or self.model is None or str(self.model) in ("self", "live"):
                raise ValueError("engine 'vllm' starts vLLM for a `model` checkpoint (running vLLM servers: give `urls` "
                                 "with backend 'openai')")
            self.backend = "openai"
            self.served_model_name = self.served_model_name or "teacher"
        if self.backend == "openai" and not self.urls and self.engine != "vllm":
            raise ValueError("backend 'openai' needs `urls` (or engine 'vllm', which starts vLLM servers for `model`)")
        if self.cross_tokenizer and self.model is None and self.tokenizer is None:
            raise ValueError("cross_tokenizer: give the teacher's own tokenizer (`tokenizer`, or `model`) to re-tokenize with")
        if self.backend == "openai" and not self.served_model_name:
            raise ValueError("backend 'openai' needs `served_model_name` (the OpenAI `model` field)")
        return self

    @property
    def live(self) -> bool:
        """Scored by the rollout engine's own servers (their weights are the student's, synced)."""
        return self.model is not None and str(self.model) == "live"

    def endpoint_key(self) -> tuple[str, ...]:
        """Teachers with equal keys are one scoring unit (same servers, or same checkpoint)."""
        context = ("context", self.context) if self.context is not None else ()  # other prompts: another unit
        context += ("cross_tokenizer",) if self.cross_tokenizer else ()
        if self.urls:
            return (self.backend, self.served_model_name or "", *sorted(u.rstrip("/").lower() for u in self.urls), *context)
        return ("model", str(Path(self.model).resolve()), *context)


TEMPLATE_ROOTS = ("prompt", "response", "meta")


def template_fields(template: str) -> list[str]:
    """The row fields a context template names (``prompt``, ``response``, ``meta.KEY``), in order;
    a malformed template or any other name is an error naming it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"context template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        root, _, key = name.partition(".")
        written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if spec or conversion:
            raise ValueError(f"context template: {written}: conversions (!r) and format specs (:...) are not supported; "
                             "write the field plainly: {prompt}, {response} or {meta.KEY}")
        if root not in TEMPLATE_ROOTS or (root == "meta") != bool(key) or "[" in name:
            raise ValueError(f"context template: unknown field {written}; the fields are {{prompt}}, {{response}} "
                             "and {meta.KEY}")
        names.append(name)
    if not names:
        raise ValueError("context template names no field of the row ({prompt}, {response}, {meta.KEY}): the teacher "
                         "would see the same thing for every row")
    return names


def render_template(template: str, fields: dict) -> str:
    """The template over one row's fields (``fields["meta"]`` a dict); a missing field -> KeyError
    naming it."""
    values = {}
    for name in template_fields(template):
        root, _, key = name.partition(".")
        value = fields.get(root)
        if key:
            if not isinstance(value, dict) or key not in value:
                raise KeyError(name)
            value = value[key]
        elif value is None:
            raise KeyError(name)
        values[name] = value
    out, formatter = [], string.Formatter()
    for literal, name, _, _ in formatter.parse(template):
        out.append(literal)
        if name is not None:
            out.append(str(values[name]))
    return "".join(out)


class RouteTarget(Strict):
    teacher: str = Field(description="a teacher's name (a key of teachers)")
    weight: float = Field(1.0, gt=0, description="its weight in the route (a sample's weights are normalised to sum "
                          "to 1)")


Route = Annotated[list[RouteTarget], Field(min_length=1)]


class RoutingSpec(Strict):
    teachers: dict[str, TeacherSpec] = Field(description="teacher name -> its servers or checkpoint; routes, "
                                             "default and launch.slurm.teachers refer to these names")
    routes: dict[str, Route] = Field(default_factory=dict, description="domain tag -> a teacher's name (`math: math`), or a list "
                                                  "of `{teacher, weight}` (`mixed: [{teacher: a, weight: 3}, {teacher: b}]`)")
    default: Route | None = Field(None, description="teachers for samples whose tag has no route "
                                         "(a name or a list, as in routes)")
    weighting: Literal["fixed", "confidence"] = Field(
        "fixed", description="fixed: a sample's teachers weigh as its route says (normalised to sum to 1); "
        "confidence: per token, proportional to weight x exp(-H / confidence_temperature), H the teacher's entropy "
        "there from its top-k (needs loss.top_k >= 1)")
    confidence_temperature: float = Field(1.0, gt=0, description="confidence weighting's temperature: lower gives "
                                          "each position more fully to the surest teacher; higher tends to the "
                                          "fixed weights")
    allow_tokenizer_mismatch: bool = Field(False, description="run even when a teacher's vocabulary, special tokens "
                                           "or chat template differ from the student's (only if the ids really "
                                           "mean the same)")
    max_nonfinite_fraction: float = Field(0.01, ge=0, le=1, description="a step whose teacher scored more than this "
                                          "fraction of its tokens as NaN/Inf stops the run (below it, those tokens are "
                                          "masked out of the loss and counted)")
    stream: bool = Field(False, description="score a prompt's samples as soon as all of them are generated, while the "
                         "rest of the step is still generating (false: score the whole step after it is generated)")

    @field_validator("routes", "default", mode="before")
    @classmethod
    def _shorthand(cls, value):
        """``math: arithmetic`` is short for ``math: [{teacher: arithmetic, weight: 1}]``."""
        def expand(route):
            if isinstance(route, str):
                return [{"teacher": route}]
            return route
        if isinstance(value, dict):
            return {tag: expand(route) for tag, route in value.items()}
        return expand(value)

    @model_validator(mode="after")
    def _known_teachers(self) -> "RoutingSpec":
        if not self.teachers:
            raise ValueError("teachers: at least one teacher is needed")
        named = [("default", r) for r in self.default or []] + [(f"routes.{tag}", r) for tag, rs in self.routes.items() for r in rs]
        for where, target in named:
            if target.teacher not in self.teachers:
                raise ValueError(f"{where}: unknown teacher {target.teacher!r}; defined: {sorted(self.teachers)}")
        if not self.routes and not self.default:
            raise ValueError("give `routes` (domain tag -> teachers) and/or a `default`")
        return self
