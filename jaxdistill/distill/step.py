"""The fused distillation step: teachers' forwards, the student's update, one XLA program.

`make_step` returns a pure function `(state, teacher_params, batch) -> (state, metrics)`;
`compile_step` jits it once with explicit shardings and donates the student's state. Teachers
are a separate, frozen argument: their forwards run outside the differentiated function (so
no backward residuals are kept for them) and their params never meet the optimizer.

A teacher absent from `teacher_params` is offline: its outputs must be in
`batch["offline"][name]` and take the same loss path. The unfused variant runs the online
teachers in their own jit and feeds their outputs to the same step as if offline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pydantic import BaseModel, ConfigDict, Field

from jaxdistill import parallel
from jaxdistill.distill.objectives import Term, compute_objective
from jaxdistill.models.model import Functional, Params

State = dict[str, Any]  # {"params", "opt_state", "step", "skipped"}


class OptimizerConfig(BaseModel):
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    total_steps: int = Field(default=1000, ge=1)
    final_lr_fraction: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    b1: float = Field(default=0.9, ge=0, lt=1)
    b2: float = Field(default=0.95, ge=0, lt=1)
    clip_norm: float | None = Field(default=1.0, gt=0)


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule


@dataclasses.dataclass(frozen=True, eq=False)
class Distiller:
    """What a step needs: the student, the online teachers, the terms and the optimizer."""

    student: Functional
    teachers: Mapping[str, Functional]  # online teachers only
    terms: tuple[Term, ...]
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    micro_batches: int = 1
    # Teachers on another tokenizer than the student's read `batch["tokens"][key]`.
    token_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def init_state(self, params: Params) -> State:
        return {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def run_teachers(self, teacher_params: Mapping[str, Params], batch) -> dict[str, Any]:
        return {
            name: jax.lax.stop_gradient(jax.named_call(model.apply, name=name)(
                teacher_params[name], model_batch(batch, self.token_keys.get(name))))
            for name, model in self.teachers.items()
            if name in teacher_params
        }

    def _grads(self, params, teacher_params, batch, step):
        def loss_fn(p, teacher_outputs, micro):
            student_outputs = jax.named_call(self.student.apply, name="student")(p, micro)
            return compute_objective(self.terms, student_outputs, teacher_outputs, micro, step)

        def grads_and_metrics(micro):
            teacher_outputs = self.run_teachers(teacher_params, micro)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, teacher_outputs, micro
            )
            return grads, metrics

        if self.micro_batches == 1:
            return grads_and_metrics(batch)

        def split(x):
            if x.shape[0] % self.micro_batches:
                raise ValueError(
                    f"batch size {x.shape[0]} is not divisible by micro_batches {self.micro_batches}"
                )
            return x.reshape((self.micro_batches, -1) + x.shape[1:])

        def accumulate(total, micro):
            return jax.tree.map(jnp.add, total, grads_and_metrics(micro)), None

        micro_batches = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grads_and_metrics, first)
        )
        total, _ = jax.lax.scan(accumulate, zeros, micro_batches)
        return jax.tree.map(lambda x: x / self.micro_batches, total)

    def step(self, state: State, teacher_params: Mapping[str, Params], batch) -> tuple[State, dict]:
        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        grads, metrics = self._grads(params, teacher_params, batch, step)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves params and optimizer state untouched.
        finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, opt_state),
            "step": step + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = jnp.asarray(self.schedule(step), jnp.float32)
        metrics["skipped_updates"] = new_state["skipped"]
        return new_state, metrics


def model_batch(batch: Mapping[str, Any], tokens_key: str | None) -> Mapping[str, Any]:
    """The batch a model reads: the student's token inputs, or those of the tokenizer keyed
    `tokens_key` in `batch["tokens"]` (every other field is shared)."""
    if tokens_key is None:
        return batch
    tokens = batch.get("tokens", {})
    if tokens_key not in tokens:
        raise KeyError(f"batch has no inputs of tokenizer {tokens_key!r} (batch['tokens'] holds "
                       f"{sorted(tokens)})")
    return {**batch, **tokens[tokens_key]}


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(batch, mesh: Mesh, rules: parallel.Rules):
    return jax.tree.map(lambda x: parallel.batch_sharding(mesh, rules, x.ndim), batch)


def declared_state_shardings(distiller: Distiller, mesh: Mesh, rules: parallel.Rules):
    """The state's shardings from the student's logical axes, without allocating anything.

    Moments are zeros_like(params): nothing ties them to the params' shardings (XLA would
    replicate them), so each param-shaped subtree of the optimizer state gets them explicitly.
    """
    param_shardings = distiller.student.shardings(mesh, rules)
    abstract = jax.eval_shape(distiller.init_state, distiller.student.shapes)
    opt_shardings = optax.tree_map_params(
        distiller.optimizer, lambda _, sharding: sharding, abstract["opt_state"], param_shardings,
        transform_non_params=lambda _: _replicated(mesh),
    )
    return {"params": param_shardings, "opt_state": opt_shardings,
            "step": _replicated(mesh), "skipped": _replicated(mesh)}


def abstract_state(distiller: Distiller, mesh: Mesh, rules: parallel.Rules):
    """The state as `jax.ShapeDtypeStruct`s carrying their declared shardings (a restore
    target, or the input of `compile_step` without any array)."""
    shapes = jax.eval_shape(distiller.init_state, distiller.student.shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, declared_state_shardings(distiller, mesh, rules))


def init_sharded_state(distiller: Distiller, seed: int, mesh: Mesh, rules: parallel.Rules,
                       params: Params | None = None) -> State:
    """Student params (fresh, or given) and optimizer state, each born in its sharding."""
    shardings = declared_state_shardings(distiller, mesh, rules)
    if params is None:
        params = distiller.student.init(seed, mesh, rules)
    else:
        params = jax.device_put(params, shardings["params"])
    return jax.jit(distiller.init_state, in_shardings=(shardings["params"],),
                   out_shardings=shardings)(params)


def compile_step(
    distiller: Distiller,
    mesh: Mesh,
    rules: parallel.Rules,
    state: State,
    teacher_params: Mapping[str, Params],
    batch,
    *,
    fused: bool = True,
) -> Callable:
    """The step jitted with the shardings the models declare; the student's state is donated.

    `state` is only read for its structure (a live state or `abstract_state`): shardings come
    from the student's logical axes, so a fresh and a resumed run compile the same program.
    Unfused (a baseline for benchmarks and tests): the online teachers run in their own jit
    and their outputs enter the student step as `batch["offline"]`.
    """
    del state
    state_sh = declared_state_shardings(distiller, mesh, rules)
    teacher_sh = {
        name: distiller.teachers[name].shardings(mesh, rules) for name in teacher_params
    }

    def traced(fn):
        def run(*args):
            with parallel.activation_rules(mesh, rules):
                return fn(*args)
        return run

    if fused:
        metrics_sh = _replicated(mesh)
        return jax.jit(
            traced(distiller.step),
            in_shardings=(state_sh, teacher_sh, batch_shardings(batch, mesh, rules)),
            out_shardings=(state_sh, metrics_sh),
            donate_argnums=(0,),
        )

    teachers_fn = jax.jit(
        traced(distiller.run_teachers),
        in_shardings=(teacher_sh, batch_shardings(batch, mesh, rules)),
    )
    offline_example = jax.eval_shape(distiller.run_teachers, teacher_params, batch)
    student_batch = {**batch, "offline": {**batch.get("offline", {}), **offline_example}}
    student_fn = jax.jit(
        traced(distiller.step),
        in_shardings=(state_sh, {}, batch_shardings(student_batch, mesh, rules)),
        out_shardings=(state_sh, _replicated(mesh)),
        donate_argnums=(0,),
    )

    def unfused(state, teacher_params, batch):
        offline = teachers_fn(teacher_params, batch)
        return student_fn(state, {}, {**batch, "offline": {**batch.get("offline", {}), **offline}})

    return unfused
