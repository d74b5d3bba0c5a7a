"""Device mesh, logical-axis sharding rules and multi-host start-up.

Weights and activations name their axes logically (`batch`, `seq`, `embed`, `heads`, `kv`,
`mlp`, `vocab`, `layers`); a small rules table maps each name to mesh axes (`data`, `fsdp`,
`tensor`). Changing the parallelism of an experiment means changing the table, not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). Order does not matter.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "actions": None,
}

Rules = Mapping[str, str | Sequence[str] | None]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxdistill_active_mesh", default=None
)


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape may contain at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh shape {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, found {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis already used by an earlier dim is not reused.

    Every logical name must have a rule: a typo (`"mpl"`) would otherwise silently replicate
    a weight. A rule of `None` (YAML `null`) is how a name says "replicated".
    """
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in rules:
            close = difflib.get_close_matches(name, list(rules), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"logical axis {name!r} has no sharding rule{hint}; the rules know "
                f"{sorted(rules)}. Add `{name}: null` to mesh.rules to replicate it."
            )
        target = rules[name] if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        free = tuple(t for t in targets if t not in used)
        used.update(free)
        spec.append(free[0] if len(free) == 1 else (free or None))
    return PartitionSpec(*spec)


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dim (a 2-head kv projection on 4-way tensor)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept = []
        size = 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*fitted)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given their logical axes.

    A weight stored as several arrays (a quantized kernel: int8 values and per-channel scales)
    gives its axes to each of them, fitted to each one's shape.
    """

    def one(axes, leaf):
        spec = logical_to_spec(axes, rules)
        return jax.tree.map(lambda x: NamedSharding(mesh, _fits(spec, x.shape, mesh)), leaf)

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Leading dim over the rules' `batch` axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_multiple(mesh: Mesh, rules: Rules) -> int:
    """Rows per process a batch must be a multiple of: the batch axes' size over processes."""
    spec = logical_to_spec(("batch",), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    return max(size // jax.process_count(), 1)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """A host batch as global arrays sharded over the batch axes (each process gives its rows)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            batch_sharding(mesh, rules, np.ndim(x)), np.asarray(x)), dict(batch))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing under this context, `constrain` pins activations to the rules."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `activation_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = _fits(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Multi-host start-up: jax.distributed, auto-detected on TPU VMs / SLURM when args are None."""
    if num_processes == 1:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
