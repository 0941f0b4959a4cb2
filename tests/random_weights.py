"""Random weights of every shape of a config, for tests and benchmarks that must run without
TensorFlow (not a trained model)."""

import numpy as np

from weights.format import expected_shapes


def random_tensors(config, seed: int = 0) -> dict:
    """Random float32 tensors of every shape of weights.format.expected_shapes(config), at scales
    that keep activations O(1) and attention far from uniform (for benchmarks and tests that must
    run without TensorFlow; not a trained model)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "gamma":
            t = rng.uniform(0.8, 1.2, shape)
        elif leaf in ("beta", "bias") or name.endswith("output_bias"):
            t = rng.normal(0.0, 0.05, shape)
        elif name.endswith("softmax_weight"):
            t = np.eye(shape[0]) + rng.normal(0.0, 0.3, shape)
        elif name.startswith("embeddings/"):
            t = rng.normal(0.0, 0.5, shape)
        else:                                   # kernels: fan-in is every axis but the last
            fan_in = int(np.prod(shape[:-1])) if name.endswith("attention/output/kernel") else shape[0]
            t = rng.normal(0.0, 1.5 / np.sqrt(fan_in), shape)
        tensors[name] = t.astype(np.float32)
    return tensors
