"""The chat recipe: support world -> accuracy / tone teachers, tone classifier -> students -> evaluation -> report.

Longer than ~400 lines because it is one recipe end to end (stages, generation-based evaluation,
report).

`jaxdistill pipeline configs/chat/pipeline.yaml` (a pipeline YAML with `kind: chat`). As in
the job-search pipeline (`jaxdistill.pipeline`, whose keys and markers this reuses), each
stage's output lives in `<workdir>/<stage>/<key>/`, reused while its key is unchanged: the key
hashes the stage's resolved config (each input replaced by that input's key), the policy's
hash and the data's key. Editing the tone teacher's config re-runs the tone teacher, the
students that read it and evaluation; nothing else.

Evaluation generates every language model's reply to each held-out question greedily (KV
cache) and measures answer accuracy (the fact's value in the reply), tone score (the tone
classifier's mean p(polite)), token KL to each teacher on the held-out reference replies and
generation tokens/s.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from jaxdistill import config as config_lib
from jaxdistill.pipeline import (StageOutput, _done, _json_number, _mark_done, _Strict, digest,
                                 read_pipeline, train_stage)

DATA_FORMAT_VERSION = 2  # bump when the world's records change shape
EVALUATION_VERSION = 2  # bump when evaluation changes what it measures
CHAT_SCORES_PNG = "chat_scores.png"


class ChatStageSpec(_Strict):
    config: str
    teachers: dict[str, str] = Field(default_factory=dict, description="teacher name -> stage")
    dataset: Literal["chat", "tone_labels"] = "chat"


class ChatPresetSpec(_Strict):
    world: dict[str, Any] = Field(default_factory=dict, description="ChatWorldConfig fields")
    teacher_dtype: str = "float32"
    set: list[str] = Field(default_factory=list)
    teacher_set: list[str] = Field(default_factory=list)
    student_set: list[str] = Field(default_factory=list)


class ChatEvaluateSpec(_Strict):
    tone_classifier: str = Field(default="tone_classifier", description="the tone judge's stage")
    max_new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=16, ge=1, description="questions per generation batch")


class ChatPipelineConfig(_Strict):
    kind: Literal["chat"]
    name: str
    workdir: str = "runs/chat"
    policy: str
    tokenizer_vocab_size: int = Field(default=700, ge=64)
    main_student: str
    stages: dict[str, ChatStageSpec]
    presets: dict[str, ChatPresetSpec]
    evaluate: ChatEvaluateSpec = Field(default_factory=ChatEvaluateSpec)


def load_chat_pipeline(path: str | Path) -> tuple[ChatPipelineConfig, Path]:
    path = Path(path)
    cfg = read_pipeline(path, ChatPipelineConfig)
    for name, stage in cfg.stages.items():
        unknown = [s for s in stage.teachers.values() if s not in cfg.stages]
        if unknown:
            raise config_lib.ConfigError(f"{path}: stages.{name} depends on unknown stages {unknown}")
        late = [s for s in stage.teachers.values() if list(cfg.stages).index(s) >=
                list(cfg.stages).index(name)]
        if late:
            raise config_lib.ConfigError(f"{path}: stages.{name} reads teachers {late}, which "
                                         "must be listed before it (stages run in order)")
    for key in ("main_student", "evaluate.tone_classifier"):
        stage = cfg.main_student if key == "main_student" else cfg.evaluate.tone_classifier
        if stage not in cfg.stages:
            raise config_lib.ConfigError(f"{path}: {key} {stage!r} is not a stage; stages: "
                                         f"{sorted(cfg.stages)}")
    return cfg, path.parent


def _say(message: str) -> None:
    print(f"[chat] {message}", flush=True)


# -------------------------------------------------------------------------------- data


def prepare_data(cfg: ChatPipelineConfig, preset: ChatPresetSpec, workdir: Path,
                 policy_hash: str) -> StageOutput:
    """The world's chat and tone-label datasets, its fact sheet and a tokenizer for them."""
    from jaxdistill.data import chat_world
    from jaxdistill.data.sources import write_dataset
    from jaxdistill.data.tokenizer import build_tokenizer

    try:
        world_cfg = chat_world.ChatWorldConfig(**preset.world)
    except TypeError as err:
        raise config_lib.ConfigError(f"presets.*.world: {err}; fields: "
                                     f"{[f.name for f in dataclasses.fields(chat_world.ChatWorldConfig)]}") from None
    key = digest({"world": dataclasses.asdict(world_cfg), "policy": policy_hash,
                  "vocab": cfg.tokenizer_vocab_size, "version": DATA_FORMAT_VERSION})
    out = workdir / "data" / key
    if _done(out):
        return StageOutput("data", key, out, cached=True, seconds=0.0)
    start = time.time()
    _say(f"data: generating the support world (seed {world_cfg.seed})")
    splits = chat_world.generate(world_cfg)
    facts = chat_world.facts(world_cfg)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_dataset({"accuracy": splits["accuracy"], "tone": splits["tone"],
                   "transfer": splits["accuracy"] + splits["tone"], "eval": splits["eval"]},
                  "chat", out / "chat")
    labels = splits["tone_labels"]
    cut = len(labels) * 4 // 5
    write_dataset({"train": labels[:cut], "validation": labels[cut:]}, "text",
                  out / "tone_labels")
    build_tokenizer(chat_world.texts(splits, facts), cfg.tokenizer_vocab_size, out / "tokenizer")
    (out / "facts.json").write_text(json.dumps([dataclasses.asdict(f) for f in facts], indent=1))
    seconds = time.time() - start
    _mark_done(out, {"key": key, "seconds": seconds})
    return StageOutput("data", key, out, cached=False, seconds=seconds)


# ------------------------------------------------------------------------------ stages


def stage_experiment(cfg: ChatPipelineConfig, name: str, base_dir: Path, preset: ChatPresetSpec,
                     data: StageOutput, policy_path: Path, upstream: Mapping[str, StageOutput],
                     *, for_key: bool) -> config_lib.Experiment:
    """A stage's Experiment with the pipeline's inputs filled in (by key with `for_key`)."""
    from jaxdistill.data.tokenizer import load_tokenizer

    stage = cfg.stages[name]
    tokenizer = load_tokenizer(data.path / "tokenizer")
    overrides = list(preset.set)
    overrides += preset.student_set if stage.teachers else preset.teacher_set
    overrides += [
        f"data.path={data.key + '/' + stage.dataset if for_key else data.path / stage.dataset}",
        f"data.tokenizer={data.key if for_key else data.path / 'tokenizer'}",
        f"model.backbone.vocab_size={len(tokenizer)}",
        f"policy={policy_path}",
        "trainer.progress=false",
    ]
    raw = config_lib.apply_overrides(config_lib.read_yaml(base_dir / stage.config), overrides)
    for teacher, source_stage in stage.teachers.items():
        out = upstream[source_stage]
        raw.setdefault("teachers", {}).setdefault(teacher, {})
        raw["teachers"][teacher]["source"] = f"run:{out.key if for_key else out.path}"
        raw["teachers"][teacher]["dtype"] = preset.teacher_dtype
    unset = sorted(set(raw.get("teachers") or {}) - set(stage.teachers))
    if unset:
        raise config_lib.ConfigError(f"{base_dir / stage.config}: teachers {unset} are not "
                                     f"given by the pipeline's stages.{name}.teachers")
    return config_lib.validate(raw, source=str(base_dir / stage.config))


def run_stage(cfg: ChatPipelineConfig, name: str, base_dir: Path, workdir: Path,
              preset: ChatPresetSpec, data: StageOutput, policy_path: Path, policy_hash: str,
              upstream: Mapping[str, StageOutput]) -> StageOutput:
    keyed = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream,
                             for_key=True)
    experiment = stage_experiment(cfg, name, base_dir, preset, data, policy_path, upstream,
                                  for_key=False)
    return train_stage(name, keyed, experiment, workdir, policy_hash, data)


# -------------------------------------------------------------------------- evaluation


def _value_pattern(value: str, tokenizer) -> re.Pattern:
    """The fact's value as it reads in a decoded reply, not inside a longer number or word."""
    decoded = tokenizer.decode(tokenizer(value, add_special_tokens=False)["input_ids"])
    return re.compile(r"(?<![\w$.%/-])" + re.escape(decoded) + r"(?![\w%/-]|\s?\.\s?\d)")


def _prompts(records: Sequence[Mapping[str, Any]], tokenizer) -> list[np.ndarray]:
    """Each record's conversation up to (and including) the assistant's role header."""
    out = []
    for record in records:
        text = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False)
        out.append(np.asarray(tokenizer(text + "assistant:", add_special_tokens=False)
                              ["input_ids"], np.int32))
    return out


def generate_replies(model, params, prompts: Sequence[np.ndarray], tokenizer, *,
                     max_new_tokens: int, batch_size: int) -> tuple[list[str], float]:
    """Greedy replies (KV cache) and the generation rate in emitted tokens/s (compile excluded:
    every batch has the same shape, the last one padded with repeats)."""
    import jax

    from jaxdistill.generate import generate

    width = max(len(p) for p in prompts)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        ids_BxT = np.full((batch_size, width), tokenizer.pad_token_id, np.int32)
        mask_BxT = np.zeros((batch_size, width), np.int32)
        for i, p in enumerate(chunk):
            ids_BxT[i, :len(p)], mask_BxT[i, :len(p)] = p, 1
        batches.append((ids_BxT, mask_BxT, real))

    def run(ids_BxT, mask_BxT):
        tokens_BxN, emitted_BxN = generate(model, params, ids_BxT, mask_BxT,
                                           max_new_tokens=max_new_tokens,
                                           eos_id=tokenizer.eos_token_id,
                                           pad_id=tokenizer.pad_token_id)
        return jax.block_until_ready((tokens_BxN, emitted_BxN))

    run(*batches[0][:2])  # compile
    replies, emitted, seconds = [], 0, 0.0
    for ids_BxT, mask_BxT, real in batches:
        start = time.perf_counter()
        tokens_BxN, emitted_BxN = map(np.asarray, run(ids_BxT, mask_BxT))
        seconds += time.perf_counter() - start
        emitted += int(emitted_BxN.sum())
        for row in range(real):
            kept = tokens_BxN[row][(emitted_BxN[row] > 0)
                                   & (tokens_BxN[row] != tokenizer.eos_token_id)]
            replies.append(tokenizer.decode(kept, skip_special_tokens=True))
    return replies, emitted / max(seconds, 1e-9)


def tone_scores(model, params, replies: Sequence[str], tokenizer, max_len: int,
                head: str) -> np.ndarray:
    """The tone classifier's p(polite) of each reply."""
    import jax

    encoded = tokenizer(list(replies), truncation=True, max_length=max_len,
                        padding="max_length", return_tensors="np")
    batch = {k: np.asarray(encoded[k], np.int32)
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits_BxC = model.apply(params, batch)[head]
    return np.asarray(jax.nn.softmax(logits_BxC.astype(np.float32), axis=-1)[:, 1])


def reference_kl(models: Mapping[str, tuple[Any, Any]], teachers: Sequence[str],
                 batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """{model: {teacher: token-mean forward KL(teacher || model)}} on held-out reference
    replies (every response token, `next_loss_mask`)."""
    import jax.numpy as jnp

    from jaxdistill.distill.losses import chunked_token_kl

    sums = {m: {t: 0.0 for t in teachers} for m in models}
    tokens = 0.0
    for batch in batches:
        inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
        mask_BxT = jnp.asarray(batch["next_loss_mask"], jnp.float32)
        count = float(mask_BxT.sum())
        outputs = {m: model.apply(params, inputs)["lm"] for m, (model, params) in models.items()}
        for m in models:
            for t in teachers:
                kl = chunked_token_kl(*outputs[m], *outputs[t], mask_BxT)
                sums[m][t] += float(kl) * count
        tokens += count
    return {m: {t: v / max(tokens, 1.0) for t, v in by_t.items()} for m, by_t in sums.items()}


def evaluate_models(cfg: ChatPipelineConfig, data: StageOutput, stages: Mapping[str, StageOutput],
                    out: Path) -> dict[str, Any]:
    from jaxdistill import loader, report
    from jaxdistill.config import Source
    from jaxdistill.data.pipeline import make_dataset
    from jaxdistill.data.sources import open_source
    from jaxdistill.data.tokenizer import load_tokenizer
    from jaxdistill.models.model import count_params, functional

    ev = cfg.evaluate
    tokenizer = load_tokenizer(data.path / "tokenizer")
    eval_source = open_source(data.path / "chat", "eval")
    records = [eval_source[i] for i in range(len(eval_source))]
    loaded = {}
    for name, stage in stages.items():
        model_cfg, params = loader.load_model(Source("run", stage.path))
        loaded[name] = (functional(model_cfg), params)
    judge_model, judge_params = loaded.pop(ev.tone_classifier)
    judge_experiment = stages[ev.tone_classifier].experiment
    judge_head = next(iter(judge_model.cfg.heads))
    teachers = [n for n in loaded if not cfg.stages[n].teachers]
    prompts = _prompts(records, tokenizer)
    patterns = [_value_pattern(r["value"], tokenizer) for r in records]
    batches = list(make_dataset(eval_source, tokenizer=tokenizer, kind="chat",
                                max_len=stages[teachers[0]].experiment.data.max_len,
                                batch_size=ev.batch_size, seed=0, shuffle=False, num_epochs=1,
                                drop_remainder=False))
    kl = reference_kl(loaded, teachers, batches)
    rows, samples = [], {}
    for name, (model, params) in loaded.items():
        _say(f"evaluate: generating with {name}")
        replies, rate = generate_replies(model, params, prompts, tokenizer,
                                         max_new_tokens=ev.max_new_tokens,
                                         batch_size=ev.batch_size)
        correct = np.asarray([bool(p.search(reply)) for p, reply in zip(patterns, replies)])
        polite = tone_scores(judge_model, judge_params, replies, tokenizer,
                             judge_experiment.data.max_len, judge_head)
        accuracy, tone = float(correct.mean()), float(polite.mean())
        rows.append({"model": name, "params": count_params(params), "accuracy": accuracy,
                     "tone_score": tone, "combined": (accuracy + tone) / 2,
                     **{f"kl_to_{t}": kl[name][t] for t in teachers},
                     "tokens_per_second": rate})
        samples[name] = [{"question": r["messages"][0]["content"], "value": r["value"],
                          "reply": reply, "correct": bool(c), "p_polite": float(p)}
                         for r, reply, c, p in zip(records, replies, correct, polite)]
    by_name = {row["model"]: row for row in rows}
    main = by_name[cfg.main_student]
    singles = [n for n in by_name if len(cfg.stages[n].teachers) == 1]
    targets = [{"name": f"combined score: {cfg.main_student} vs {single}",
                "value": main["combined"], "target": f"> {by_name[single]['combined']:.4g}",
                "met": main["combined"] > by_name[single]["combined"],
                "note": "" if main["combined"] > by_name[single]["combined"] else
                f"behind by {by_name[single]['combined'] - main['combined']:.4g}"}
               for single in singles]
    headline = {f"{cfg.main_student} {k}": main[k] for k in ("accuracy", "tone_score", "combined")}
    headline.update({f"{n} combined": by_name[n]["combined"] for n in by_name
                     if n != cfg.main_student})
    curves = {}
    for name, stage in stages.items():
        if (stage.path / "metrics.jsonl").is_file():
            metrics = report.read_metrics_jsonl(stage.path / "metrics.jsonl")
            curves[name] = {k: v for k, v in metrics.items() if "loss/" in k}
    out.mkdir(parents=True, exist_ok=True)
    report_path = report.write_report(
        out, headline=headline, models_table=rows, curves=curves, calibration={},
        kappa_by_dimension={}, targets=targets,
        title="Support chat: accuracy + tone teachers, one student")
    # The shared report plots job-search metrics; the chat scores get their own figure.
    report._plot_models(rows, ["accuracy", "tone_score", "combined"], out / CHAT_SCORES_PNG)
    with report_path.open("a") as md:
        md.write(f"\n## Accuracy and tone\n\n![Accuracy, tone score, combined]({CHAT_SCORES_PNG})"
                 f"\n\nAccuracy: the fact's value in the greedy reply to a held-out question; "
                 f"tone score: the tone classifier's mean p(polite); combined: their mean. "
                 f"KL: token-mean forward KL(teacher || model) on held-out reference replies. "
                 f"Replies are in samples.json.\n")
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    summary = {"headline": headline, "models": rows, "targets": targets,
               "report": str(report_path)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=_json_number))
    return summary


# --------------------------------------------------------------------------------- run


def run(path: str | Path, preset_name: str = "laptop", workdir: str | Path | None = None, *,
        evaluate: bool = True) -> dict[str, Any]:
    """Runs (or reuses) every stage; `evaluate=False` stops after training, reporting keys."""
    cfg, base_dir = load_chat_pipeline(path)
    if preset_name not in cfg.presets:
        raise config_lib.ConfigError(
            f"{path}: unknown preset {preset_name!r}; presets: {sorted(cfg.presets)}")
    preset = cfg.presets[preset_name]
    workdir = Path(workdir or cfg.workdir) / preset_name
    policy_path = Path(cfg.policy).resolve()  # read_yaml made it relative to the file
    if not policy_path.is_file():
        raise config_lib.ConfigError(f"{path}: policy document {policy_path} not found")
    policy_hash = config_lib.file_hash(policy_path)
    started = time.time()

    data = prepare_data(cfg, preset, workdir, policy_hash)
    _say(f"data: {'cached' if data.cached else f'{data.seconds:.0f}s'} ({data.path})")
    stages: dict[str, StageOutput] = {}
    for name in cfg.stages:
        stages[name] = run_stage(cfg, name, base_dir, workdir, preset, data, policy_path,
                                 policy_hash, stages)
        _say(f"{name}: {'cached' if stages[name].cached else f'{stages[name].seconds:.0f}s'} "
             f"({stages[name].path})")

    eval_key = digest({"stages": {n: s.key for n, s in stages.items()},
                       "version": EVALUATION_VERSION, "evaluate": cfg.evaluate.model_dump(),
                       "data": data.key})
    eval_dir = workdir / "evaluation" / eval_key
    outputs = {n: {"key": s.key, "cached": s.cached, "path": str(s.path)}
               for n, s in [("data", data), *stages.items()]}
    outputs["evaluation"] = {"key": eval_key, "cached": _done(eval_dir), "path": str(eval_dir)}
    if not evaluate:
        return {"stages": outputs, "seconds": time.time() - started}
    if _done(eval_dir):
        summary = json.loads((eval_dir / "evaluation.json").read_text())
        _say("evaluation: cached")
    else:
        summary = evaluate_models(cfg, data, stages, eval_dir)
        _mark_done(eval_dir, {"key": eval_key})
    summary["stages"] = outputs
    summary["seconds"] = time.time() - started
    _print_summary(summary)
    return summary


def _print_summary(summary: Mapping[str, Any]) -> None:
    rows = summary["models"]
    columns = [c for c in rows[0] if c != "model"]
    print("\n" + " | ".join(["model", *columns]))
    for row in rows:
        print(" | ".join([row["model"], *(f"{row[c]:.4g}" if isinstance(row[c], float)
                                          else str(row[c]) for c in columns)]))
    for t in summary["targets"]:
        print(f"  {'met' if t['met'] else 'MISSED':<7} {t['name']}: {t['value']:.4g} "
              f"(goal {t['target']}) {t['note']}")
    print(f"\nReport: {summary['report']}")
    print(f"Pipeline time: {summary['seconds']:.0f}s")


def main(config: str, preset: str = "laptop", workdir: str | None = None) -> int:
    run(config, preset, workdir)
    return 0
