"""Test weights drawn on the host (no init program to compile): norms 1, biases 0, rest normal."""
import jax
import numpy as np


def random_params(model, seed, stddev=0.2):
    """Params for `model` (a `Functional`) with every weight drawn from N(0, stddev)."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        name = getattr(path[-1], "key", None)
        if name == "scale":
            return np.ones(shape.shape, np.float32)
        if name == "bias":
            return np.zeros(shape.shape, np.float32)
        return (stddev * rng.normal(size=shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, model.shapes)
