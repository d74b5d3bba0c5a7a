"""Experiment configs: YAML files validated by a typed schema, composed from a base, overridden.

Longer than ~400 lines because the schema and its error messages (key paths, nearest keys) are
one concern.

One schema per concern (model, teachers, objective, data, optimizer, trainer, mesh,
checkpoint, logging), composed into `Experiment`. A file may name `base:` (a path relative to
itself); the file's keys are merged over the base's, recursively for mappings. `--set a.b=c`
overrides are applied last, with values parsed as YAML scalars.

Errors name the file, the dotted key path, what was expected and what was found; an unknown
key comes with the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxdistill.distill.objectives import Term
from jaxdistill.distill.step import OptimizerConfig
from jaxdistill.models.model import ModelConfig
from jaxdistill.parallel import DEFAULT_RULES


class ConfigError(ValueError):
    """A config that cannot be loaded; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model comes from, parsed once at config load: "scratch", "run:DIR" (a finished
    run of ours), "hf:DIR" (a transformers directory) or "offline:DIR" (a teacher's outputs
    cached into a dataset by `cache-teacher`). Written back as the same string."""

    kind: Literal["scratch", "run", "hf", "offline"]
    path: Path | None = None

    @classmethod
    def parse(cls, value: Any) -> Source:
        if isinstance(value, Source):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a source string such as 'run:DIR' or 'hf:DIR', found "
                             f"{value!r}")
        if value == "scratch":
            return cls("scratch")
        kind, sep, path = value.partition(":")
        if not sep or kind not in ("run", "hf", "offline") or not path:
            raise ValueError(f"expected a source 'run:DIR', 'hf:DIR' or 'offline:DIR' ('scratch' "
                             f"for model.init), found {value!r}")
        return cls(kind, Path(path))

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    def expect(self, kinds: Sequence[str], key: str) -> Source:
        if self.kind not in kinds:
            shown = [k if k == "scratch" else f"{k}:DIR" for k in kinds]
            raise ValueError(f"{key} must be one of {shown}, found {str(self)!r}")
        return self


SourceField = Annotated[Source, pydantic.BeforeValidator(Source.parse),
                        pydantic.PlainSerializer(str, return_type=str)]

# Backbone keys a config may set over an `init:` checkpoint's own: numerics, not shapes.
NUMERIC_KEYS = frozenset({"dtype", "param_dtype", "remat", "attention_impl"})


class ModelSection(ModelConfig):
    """The model being trained. `init`: "scratch", "hf:DIR" (HF import) or "run:DIR" (a finished
    run of ours); with a checkpoint, `backbone` may be left out or give numerics only (dtype,
    param_dtype, remat, attention_impl): the checkpoint's own config fills the rest, and a
    shape key that disagrees with it is refused. `warm_start`: "run:DIR" or "hf:DIR" copies
    every weight whose shape allows (fewer layers take the source's evenly spaced layers;
    narrower dims take the leading slice). `allow_pickle`: load pickle weight files of hf:
    sources (unpickling runs code; safetensors only by default)."""

    init: SourceField = Source("scratch")
    warm_start: SourceField | None = None
    allow_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_backbone(cls, data: Any):
        if not isinstance(data, Mapping) or "init" not in data:
            return data
        try:
            init = Source.parse(data["init"])
        except ValueError:
            return data  # reported by the field validator
        if init.kind not in ("hf", "run"):
            return data
        given = dict(data.get("backbone") or {})
        if init.kind == "hf":
            from jaxdistill.models import hf

            numerics = {k: v for k, v in given.items() if k in NUMERIC_KEYS | {"pooling"}}
            checkpoint = hf.config_from_hf(init.path, **numerics).model_dump()
        else:
            from jaxdistill.checkpoint import run_model_config

            checkpoint = run_model_config(init.path).backbone.model_dump()
        differs = [f"{k}: config {v!r}, checkpoint {checkpoint[k]!r}" for k, v in given.items()
                   if k in checkpoint and k not in NUMERIC_KEYS and checkpoint[k] != v]
        if differs:
            raise ValueError(f"model.backbone does not describe the checkpoint model.init names "
                             f"({init}); leave these keys out or set the checkpoint's values: "
                             + "; ".join(differs))
        return {**data, "backbone": {**checkpoint, **given}}

    @model_validator(mode="after")
    def _check_sources(self):
        self.init.expect(("scratch", "hf", "run"), "init")
        if self.warm_start is not None:
            self.warm_start.expect(("run", "hf"), "warm_start")
        return self


class TeacherSection(_Section):
    """A frozen teacher: `source` is "run:DIR", "hf:DIR" (needs `heads`) or "offline:DIR"
    (outputs precomputed by `jaxdistill cache-teacher`). `tokenizer`: the tokenizer the
    teacher was trained with, when its source does not record one (a run records its own;
    an HF directory holds its tokenizer files); a value that contradicts the source's is
    refused. `init_missing_heads`: freshly initialise `heads` the hf: directory does not hold
    (a teacher distilled from random heads teaches nothing, so this is refused by default)."""

    source: SourceField
    heads: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    tokenizer: str | None = None
    allow_pickle: bool = False
    init_missing_heads: bool = False
    quantize: Literal["int8", "fp8"] | None = Field(
        default=None, description="run the forward's projections in int8/fp8 (jaxdistill.quantize)"
    )

    @model_validator(mode="after")
    def _check_sources(self):
        self.source.expect(("run", "hf", "offline"), "source")
        return self


class DataSection(_Section):
    """Where examples come from and how they become batches (see jaxdistill.data.pipeline)."""

    path: str = Field(description="dataset directory written by `data prepare` or a builder")
    train_split: str = "train"
    eval_split: str | None = "validation"
    kind: Literal["pointwise", "listwise", "impressions", "chat", "text"]
    tokenizer: str = Field(description="local HF tokenizer directory or 'builtin:...'")
    max_len: int = Field(default=128, ge=2)
    batch_size: int = Field(default=32, ge=1)
    list_size: int | None = Field(default=None, ge=1)
    candidates: Literal["first", "sample"] = Field(
        default="first",
        description="listwise training reads of longer lists: the first list_size candidates "
                    "(logged order) or list_size drawn at random, a new draw each epoch")
    action_names: tuple[str, ...] = ()
    member_features_dim: int | None = Field(default=None, ge=0)
    pack: bool = False
    shuffle: bool = True
    worker_count: int = Field(default=0, ge=0)
    prefetch: int = Field(default=2, ge=0)
    skip_malformed: bool = False


class TrainerSection(_Section):
    steps: int = Field(default=1000, ge=1)
    micro_batches: int = Field(default=1, ge=1)
    log_every: int = Field(default=50, ge=1)
    eval_every: int = Field(default=500, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    # Evaluate once before the first step (step 0), so eval curves start where training did
    # (a warm start's or a linear probe's loss); a resumed run does not repeat it.
    eval_on_start: bool = False
    progress: bool = True
    # This many consecutive skipped (non-finite) updates end the run: it is learning nothing.
    max_skipped_updates: int = Field(default=20, ge=1)


class MeshSection(_Section):
    """The (data, fsdp, tensor) mesh and the logical-axis rules. `rules` is merged over the
    default table (`jaxdistill.parallel.DEFAULT_RULES`): name only what changes, `null` to
    replicate. A rule naming a mesh axis that does not exist is refused."""

    shape: tuple[int, int, int] = (-1, 1, 1)
    rules: dict[str, str | tuple[str, ...] | None] = Field(
        default_factory=lambda: dict(DEFAULT_RULES)
    )

    @model_validator(mode="after")
    def _merge_rules(self):
        from jaxdistill.parallel import MESH_AXES

        for name, target in self.rules.items():
            targets = () if target is None else (target,) if isinstance(target, str) else target
            bad = [t for t in targets if t not in MESH_AXES]
            if bad:
                raise ValueError(f"rules.{name}: mesh axis {bad[0]!r} does not exist; the mesh "
                                 f"axes are {list(MESH_AXES)} (or null to replicate)")
        object.__setattr__(self, "rules", {**DEFAULT_RULES, **self.rules})
        return self


class KeepBest(_Section):
    metric: str
    mode: Literal["min", "max"] = "min"


class CheckpointSection(_Section):
    every: int = Field(default=500, ge=1)
    max_to_keep: int = Field(default=3, ge=1)
    keep_best: KeepBest | None = None
    async_save: bool = True


class LoggingSection(_Section):
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None


class OnPolicySection(_Section):
    """On-policy distillation (generalised KD, Agarwal et al. 2024; see `jaxdistill.on_policy`):
    with probability `fraction` a step trains on the student's own responses to its batch's
    prompts instead of the batch's responses, and the teachers score those tokens. Sampling:
    up to `max_new_tokens` tokens at `temperature` (0 = greedy), `top_k` (0 = off), `top_p`
    (1 = off); a response is cut where the row reaches data.max_len. `answer_span`: where a
    sampled reply states the answer is unknown; "none" gives it no answer tokens (terms on
    `next_answer_mask` skip on-policy steps, `next_style_mask` is the whole reply),
    "response" counts the whole reply as the answer span."""

    fraction: float = Field(ge=0, le=1, description="probability that a step is on-policy")
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    answer_span: Literal["none", "response"] = "none"


class Experiment(_Section):
    """One run: train a model on labels (no teachers) or distil a student from teachers."""

    name: str
    seed: int = 0
    policy: str | None = Field(default=None, description="product policy document; its hash is recorded")
    model: ModelSection
    teachers: dict[str, TeacherSection] = Field(default_factory=dict)
    objective: tuple[Term, ...] = Field(min_length=1)
    data: DataSection
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    # Left out of the resolved config when unset, so configs (and pipeline stage keys, resume
    # checks) written before the section existed read the same.
    on_policy: OnPolicySection | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _check_references(self):
        for i, term in enumerate(self.objective):
            if term.teacher is not None and term.teacher not in self.teachers:
                raise ValueError(
                    f"objective[{i}] ({term.name!r}) names teacher {term.teacher!r}, "
                    f"but teachers are {sorted(self.teachers)}"
                )
            if term.student not in self.model.heads and term.student != "pooled":
                raise ValueError(
                    f"objective[{i}] ({term.name!r}) reads student head {term.student!r}, "
                    f"but model.heads are {sorted(self.model.heads)}"
                )
        names = [t.name for t in self.objective]
        if len(set(names)) != len(names):
            raise ValueError(f"objective term names must be unique, got {names}")
        object.__setattr__(self, "objective", tuple(
            _resolve_given(i, t, self.data.action_names) for i, t in enumerate(self.objective)))
        if self.on_policy is not None:
            self._check_on_policy()
        return self

    def _check_on_policy(self) -> None:
        """What sampling the student's responses needs: chat data in unpacked rows, an `lm`
        head (so a decoder student), room in data.max_len, and every teacher a term reads live
        (a cached teacher has no outputs for tokens sampled during the run)."""
        problems = []
        if self.data.kind != "chat":
            problems.append(f"needs chat data (prompts and responses), found data.kind "
                            f"{self.data.kind!r}")
        if self.data.pack:
            problems.append("needs one conversation per row; set data.pack: false")
        lm_heads = [n for n, h in self.model.heads.items() if getattr(h, "type", None) == "lm"]
        if not lm_heads:
            problems.append(f"the student samples its responses with an 'lm' head; model.heads "
                            f"has {sorted(self.model.heads)} (add e.g. lm: {{type: lm}})")
        if self.on_policy.max_new_tokens >= self.data.max_len:
            problems.append(f"max_new_tokens ({self.on_policy.max_new_tokens}) must be "
                            f"below data.max_len ({self.data.max_len}): a sampled row is the "
                            "prompt and the response within data.max_len tokens")
        cached = sorted({t.teacher for t in self.objective if t.teacher is not None
                         and self.teachers[t.teacher].source.kind == "offline"})
        if cached:
            problems.append(f"teachers {cached} are cached (source offline:) and cannot score "
                            "the student's samples; give them a run: or hf: source")
        if problems:
            raise ValueError("on_policy: " + "; ".join(problems))


def _resolve_given(i: int, term: Term, action_names: Sequence[str]) -> Term:
    """A term with its `given` action names turned into (column, precondition) indices."""
    if not term.given:
        return term
    unknown = sorted({*term.given, *term.given.values()} - set(action_names))
    if unknown:
        raise ValueError(f"objective[{i}] ({term.name!r}) given: {unknown} are not in "
                         f"data.action_names {list(action_names)}")
    columns = tuple((action_names.index(a), action_names.index(p)) for a, p in term.given.items())
    return term.model_copy(update={"given_columns": columns})


# ----------------------------------------------------------------------------- loading


def read_yaml(path: Path, *, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its `base:` chain merged in (paths relative to each file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in seen + (path.resolve(),))
        raise ConfigError(f"{path}: circular base: {chain}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                          f"offset {err.start}); save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    if isinstance(data.get("policy"), str) and not Path(data["policy"]).is_absolute():
        data["policy"] = str(path.parent / data["policy"])  # relative to the file naming it
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a base config file (a string), "
                          f"found {base!r}")
    base_data = read_yaml(path.parent / base, seen=seen + (path.resolve(),))
    return merge(base_data, data)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge of mappings; anything else in `override` replaces the base's value.

    `null` over a mapping removes it (e.g. a teacher the base names and this file drops).
    """
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(out.get(key), Mapping):
            del out[key]
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b.c=value` assignments, values parsed as YAML (`3`, `true`, `[1, 2]`, `null`).

    Missing mappings on the way are created; a number indexes into an existing list
    (`objective.0.weight=0.5`).
    """
    data = _copy_tree(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. trainer.steps=100")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from None
        node: Any = data
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "the config"
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {where} is a list of {len(node)}; "
                                      f"{part!r} is not an index into it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {where} holds {type(node).__name__} "
                                  f"{node!r}, not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_tree(v) for v in value]
    return value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides)
    return validate(data, source=str(path))


def validate(data: Mapping[str, Any], *, source: str) -> Experiment:
    try:
        return Experiment.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_errors(err, data, source)) from None


def format_errors(err: pydantic.ValidationError, data: Mapping[str, Any], source: str,
                  schema: type[BaseModel] | None = None) -> str:
    """One line per error, keys dotted from the root of `schema` (default: Experiment)."""
    errors = err.errors()
    # A list whose item failed also reports itself as too short; the item's error is the news.
    errors = [e for e in errors if not (e["type"] == "too_short" and any(
        len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors))]
    resolved = [(e, *_resolve_loc(e["loc"], schema or Experiment)) for e in errors]
    # A mapping given to a `float | Model` field fails the float member too; the model
    # member's errors (deeper under the same key) are the ones that say what to fix.
    resolved = [(e, shown, parent) for e, shown, parent in resolved
                if not (shown and isinstance(e.get("input"), Mapping) and any(
                    len(other) > len(shown) and other[:len(shown)] == shown
                    for _, other, _ in resolved))]
    lines = [f"{source}: invalid config ({len(resolved)} error(s))"]
    for e, shown, parent in resolved:
        key = _dotted(shown)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_nearest_key(parent, shown[-1])}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif e["type"] in ("value_error", "assertion_error"):
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"  {key}: {msg}" if shown else f"  {msg}")
        elif e["type"] == "union_tag_invalid":
            tag_key = _dotted(shown + [str(e["ctx"]["discriminator"]).strip("'")])
            lines.append(f"  {tag_key}: expected one of {e['ctx']['expected_tags']}, "
                         f"found {e['ctx']['tag']!r}")
        elif e["type"] == "union_tag_not_found":
            tag_key = _dotted(shown + [str(e["ctx"]["discriminator"]).strip("'")])
            lines.append(f"  {tag_key}: required key is missing")
        else:
            msg = msg.replace("Input should be ", "expected ", 1)
            lines.append(f"  {key}: {msg}, found {_found(e.get('input'))}")
    return "\n".join(lines)


def _found(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "<top>"


def _resolve_loc(loc: Sequence[Any], root: type[BaseModel]
                 ) -> tuple[list[Any], type[BaseModel] | None]:
    """A pydantic error location as the user's key path, and the schema holding its last key.

    pydantic inserts union member tags ("token_score", "function-after[...]") into locations;
    walking the schema alongside tells them apart from keys.
    """
    shown: list[Any] = []
    parent: type[BaseModel] | None = None
    annotation: Any = root
    for part in loc:
        annotation = _strip_annotated(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            parent = annotation
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            annotation = field.annotation if field is not None else None
            shown.append(part)
            continue
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (dict, Mapping):
            annotation = args[1] if len(args) == 2 else None
            shown.append(part)
        elif origin in (tuple, list, Sequence) and isinstance(part, int):
            annotation = args[0] if args else None
            shown.append(part)
        elif origin in (typing.Union, types.UnionType):
            member = _union_member(args, part)
            if member is None:
                shown.append(part)
            annotation = member
        else:
            shown.append(part)
            annotation = None
    return shown, parent


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_member(members: Sequence[Any], tag: Any) -> Any:
    """The union member a pydantic location tag names (a discriminator value or a type name)."""
    if not isinstance(tag, str):
        return None
    for member in members:
        member = _strip_annotated(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get("type")
            if member.__name__ == tag or (field is not None and field.default == tag):
                return member
        elif getattr(member, "__name__", None) == tag:
            return member
    if "[" in tag:  # e.g. "function-after[_check(), Term]"
        return next((m for m in members if getattr(m, "__name__", "") in tag), members[0])
    return None


def _nearest_key(model: type[BaseModel] | None, key: Any) -> str:
    if model is None:
        return ""
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def resolved_yaml(cfg: Experiment) -> str:
    """The fully resolved config, as written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
