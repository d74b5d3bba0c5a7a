"""Mesh construction, logical-axis rules, fitting specs to shapes, batch and activation shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jaxdistill import parallel
from jaxdistill.parallel import DEFAULT_RULES, logical_to_spec


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "shape, expected",
    [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)),
     ((2, 4, 1), (2, 4, 1))],
)
def test_make_mesh_shapes(shape, expected):
    mesh = parallel.make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == expected
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert mesh.devices.size == 8


def test_make_mesh_default_and_device_subset():
    assert tuple(parallel.make_mesh().shape.values()) == (8, 1, 1)
    one = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert one.devices.size == 1
    four = parallel.make_mesh((-1, 2, 1), devices=jax.devices()[4:])
    assert tuple(four.shape.values()) == (2, 2, 1)
    assert set(four.devices.flat) == set(jax.devices()[4:])


@pytest.mark.parametrize(
    "shape, match",
    [
        ((8, 1), r"must have 3 entries \('data', 'fsdp', 'tensor'\), got \[8, 1\]"),
        ((-1, -1, 2), "at most one -1"),
        ((3, -1, 1), r"8 devices do not divide into mesh shape \[3, -1, 1\]"),
        ((2, 2, 1), r"mesh shape \(2, 2, 1\) needs 4 devices, found 8"),
        ((4, 4, 1), r"needs 16 devices, found 8"),
    ],
)
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(shape)


@pytest.mark.parametrize(
    "axes, expected",
    [
        (None, P()),
        ((), P()),
        (("layers", "embed", "heads"), P(None, "fsdp", "tensor")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("batch", "seq", "mlp"), P(("data", "fsdp"), None, "tensor")),
        # `embed` wants fsdp, already taken by `batch`: not reused, replicated instead.
        (("batch", "seq", "embed"), P(("data", "fsdp"), None, None)),
        (("embed", "embed"), P("fsdp", None)),
        (("heads", "kv"), P("tensor", None)),
        ((None, "embed"), P(None, "fsdp")),
    ],
)
def test_logical_to_spec_default_rules(axes, expected):
    assert logical_to_spec(axes, DEFAULT_RULES) == expected


def test_logical_to_spec_partially_used_multi_axis():
    rules = {"batch": ("data", "fsdp"), "wide": ("fsdp", "tensor"), "one": ["tensor"]}
    # `wide` keeps only the axis `batch` left free.
    assert logical_to_spec(("batch", "wide"), rules) == P(("data", "fsdp"), "tensor")
    assert logical_to_spec(("wide", "batch"), rules) == P(("fsdp", "tensor"), "data")
    assert logical_to_spec(("wide", "one"), rules) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("one",), rules) == P("tensor")  # a 1-element list is one axis


def _spec(axes, shape, mesh, rules=DEFAULT_RULES):
    sharding = parallel.tree_shardings(
        {"w": tuple(axes)}, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, mesh, rules)["w"]
    assert sharding.mesh is mesh
    return sharding.spec


def test_non_dividing_dims_are_replicated():
    mesh = parallel.make_mesh((1, 2, 4))  # fsdp 2, tensor 4
    assert _spec(("embed", "heads"), (64, 32), mesh) == P("fsdp", "tensor")
    # A 2-kv-head x 2 projection (4 wide) fits tensor=4; 2 wide does not and is replicated.
    assert _spec(("embed", "kv"), (64, 4), mesh) == P("fsdp", "tensor")
    assert _spec(("embed", "kv"), (64, 2), mesh) == P("fsdp", None)
    assert _spec(("embed", "kv"), (63, 6), mesh) == P(None, None)
    # Multi-axis batch on (2, 2, 2): a batch of 2 keeps data only; 8 keeps both.
    mesh222 = parallel.make_mesh((2, 2, 2))
    assert _spec(("batch", None), (2, 5), mesh222) == P("data", None)
    assert _spec(("batch", None), (6, 5), mesh222) == P("data", None)
    assert _spec(("batch", None), (8, 5), mesh222) == P(("data", "fsdp"), None)
    assert _spec(("batch", None), (3, 5), mesh222) == P(None, None)


def test_tree_shardings_place_arrays():
    mesh = parallel.make_mesh((2, 2, 2))
    axes = {"embed": {"embedding": ("vocab", "embed")}, "norm": (None,)}
    shapes = {"embed": {"embedding": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
              "norm": jax.ShapeDtypeStruct((8,), jnp.float32)}
    shardings = parallel.tree_shardings(axes, shapes, mesh, DEFAULT_RULES)
    table = jax.device_put(np.arange(128.0).reshape(16, 8), shardings["embed"]["embedding"])
    assert {s.data.shape for s in table.addressable_shards} == {(8, 4)}
    assert shardings["norm"].spec == P(None)
    np.testing.assert_array_equal(np.asarray(table), np.arange(128.0).reshape(16, 8))


def test_batch_sharding():
    mesh = parallel.make_mesh((2, 2, 2))
    sharding = parallel.batch_sharding(mesh, DEFAULT_RULES, 3)
    assert sharding.spec == P(("data", "fsdp"), None, None)
    x = jax.device_put(np.zeros((8, 4, 2), np.float32), sharding)
    # 4-way over the batch, replicated over tensor: 2 copies of each batch shard.
    shards = x.addressable_shards
    assert {s.data.shape for s in shards} == {(2, 4, 2)}
    assert len({str(s.index) for s in shards}) == 4
    assert parallel.batch_sharding(mesh, {"batch": "data"}, 1).spec == P("data")


def test_constrain_is_a_noop_outside_activation_rules():
    mesh = parallel.make_mesh((2, 2, 2))
    x = jnp.ones((8, 4, 16))
    assert parallel.constrain(x, ("batch", "seq", "embed")) is x

    def make_f():  # a fresh function each time: jit caches traces by function
        return lambda x: parallel.constrain(x * 2, ("batch", "seq", "mlp"))

    with parallel.activation_rules(mesh, DEFAULT_RULES):
        inside = jax.jit(make_f()).lower(x).as_text()
        y = jax.jit(make_f())(x)
    outside = jax.jit(make_f()).lower(x).as_text()
    assert "sharding_constraint" in inside and '{"data", "fsdp"}, {}, {"tensor"}' in inside
    assert "sharding_constraint" not in outside
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0)
    # The context is restored on exit.
    assert parallel.constrain(x, ("batch", None, None)) is x


# ------------------------------------------------------------------ missing rules are errors


def test_logical_axis_without_a_rule_is_an_error():
    with pytest.raises(ValueError, match=r"logical axis 'mpl' has no sharding rule \(did you mean "
                                         r"'mlp'\?\); the rules know \['actions', 'batch'"):
        logical_to_spec(("embed", "mpl"), DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"'experts' has no sharding rule;.*`experts: null`"):
        logical_to_spec(("experts",), {"batch": "data"})
    # An explicit null rule still means replicated; a None axis needs no rule.
    assert logical_to_spec(("experts", None), {"experts": None}) == P(None, None)


# ------------------------------------------------------------------ bytes per device

TINY = {"type": "decoder", "vocab_size": 256, "hidden": 64, "layers": 2, "heads": 4,
        "kv_heads": 2, "head_dim": 16, "mlp": 128, "dtype": "float32", "param_dtype": "float32",
        "remat": "none"}
# Attention and MLP kernels: the weights tensor parallelism splits.
TP_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bytes_by_device(tree) -> dict:
    """Bytes each device holds of a tree of arrays, read off their addressable shards."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def _one_device_bytes(tree) -> int:
    held = _bytes_by_device(tree)
    assert len(held) == 8 and len(set(held.values())) == 1, held  # evenly spread over 8
    return next(iter(held.values()))


def _total_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _tp_subtree(params):
    layer = params["backbone"]["layers"]["layer"]
    return {name: layer[name] for name in TP_WEIGHTS}


@pytest.fixture(scope="module")
def placed():
    """Student state and two teachers' params created in their shardings on three meshes."""
    from jaxdistill.distill.objectives import Term
    from jaxdistill.distill.step import (Distiller, OptimizerConfig, init_sharded_state,
                                         make_optimizer)
    from jaxdistill.models.model import ModelConfig, functional

    heads = {"actions": {"type": "actions", "names": ["click", "apply"]}}
    student = functional(ModelConfig(backbone=TINY, heads=heads))
    teachers = {"wide": functional(ModelConfig(backbone={**TINY, "mlp": 256}, heads=heads)),
                "deep": functional(ModelConfig(backbone={**TINY, "layers": 3}, heads=heads))}
    optimizer, schedule = make_optimizer(OptimizerConfig())
    distiller = Distiller(student=student, teachers=teachers, optimizer=optimizer,
                          schedule=schedule, terms=(Term(name="eng", loss="soft_bce",
                                                         student="actions", teacher="wide"),))
    # Host zeros placed by device_put: only the optimizer's init is compiled (once per mesh).
    host = lambda model: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.shapes)  # noqa
    out = {}
    for name, shape in {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8)}.items():
        mesh = parallel.make_mesh(shape)
        state = init_sharded_state(distiller, 0, mesh, DEFAULT_RULES, params=host(student))
        adam = state["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
        out[name] = {"student": state["params"], "mu": adam.mu, "nu": adam.nu} | {
            t: jax.device_put(host(model), model.shardings(mesh, DEFAULT_RULES))
            for t, model in teachers.items()}
    return out


def test_data_parallel_replicates_params_and_optimizer_state(placed):
    for tree in placed["data"].values():
        assert _one_device_bytes(tree) == _total_bytes(tree)


def test_fsdp_divides_params_and_optimizer_state(placed):
    # Every weight has an `embed` dim (64, divisible by 8) except the per-head q/k norms and
    # the action biases: a few hundred replicated bytes on top of 1/8 of the rest.
    for name, tree in placed["fsdp"].items():
        total, per_device = _total_bytes(tree), _one_device_bytes(tree)
        assert total / 8 <= per_device <= total / 8 * 1.02, name
        q_proj = tree["backbone"]["layers"]["layer"]["q_proj"]["kernel"]
        assert {s.data.shape for s in q_proj.addressable_shards} == {(q_proj.shape[0], 8, 64)}


def test_tensor_parallel_divides_attention_and_mlp_weights(placed):
    for name, tree in placed["tensor"].items():
        tp = _tp_subtree(tree)
        assert _one_device_bytes(tp) * 8 == _total_bytes(tp), name
        # Norms have no tensor-parallel axis: replicated.
        norms = tree["backbone"]["layers"]["layer"]["input_norm"]
        assert _one_device_bytes(norms) == _total_bytes(norms)
        # Everything else: the embedding splits over vocab, heads and norms stay whole.
        assert _one_device_bytes(tree) < _total_bytes(tree) / 4, name
