"""The activation functions of every model, by the names their configs use (diffusers' and transformers')."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


@mx.compile
def gelu_tanh(x):
    """GELU, tanh approximation (transformers' gelu_new / gelu_pytorch_tanh, diffusers' gelu approximate="tanh").

    Traced per shape, in the input dtype: on an H200 the shape-specialised kernel was faster than a shapeless one
    (benchmarks/results/h200_round3_mlx_final.log), and fp32 arithmetic inside was no faster.
    """
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu-approximate": gelu_tanh,  # diffusers' FeedForward name
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": nn.gelu_fast_approx,
    "silu": nn.silu,
    "swish": nn.silu,
    "linear-silu": nn.silu,  # diffusers' LinearActivation(activation="silu")
    "relu": nn.relu,
    "mish": nn.mish,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]
