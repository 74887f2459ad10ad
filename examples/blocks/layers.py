"""Linear layers, norms and MLPs.

Linear weights arrive as checkpoints store them, [out_features, in_features]; the causal-LM driver
transposes a layer's linear weights once in the main graph, where constant folding pre-transposes
weights held in memory and leaves memory-mapped ones in place, so layer functions see [in, out]
kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace.primitives import gelu, rms_norm, silu

ACTIVATIONS = {
    "silu": silu,
    "gelu_pytorch_tanh": lambda x: gelu(x, approximate="tanh"),
    "gelu_new": lambda x: gelu(x, approximate="tanh"),
    "gelu": gelu,
}


def linear(x: Any, kernel: Any, bias: Any = None) -> Any:
    """x @ kernel (+ bias), kernel [in_features, out_features]."""
    y = x @ kernel
    return y if bias is None else y + bias


def activation(name: str) -> Any:
    return ACTIVATIONS[name]


def gated_mlp(x: Any, p: dict[str, Any], act: str = "silu") -> Any:
    """down(act(gate(x)) * up(x)) (SwiGLU with silu, GeGLU with gelu_pytorch_tanh), with biases
    when the params have them."""
    gate = ACTIVATIONS[act](linear(x, p["gate_proj"], p.get("gate_bias")))
    return linear(gate * linear(x, p["up_proj"], p.get("up_bias")), p["down_proj"], p.get("down_bias"))


def mlp(x: Any, p: dict[str, Any], act: str) -> Any:
    """down(act(up(x))), the non-gated MLP of the GPT-2 lineage, with biases when the params have them."""
    return linear(ACTIVATIONS[act](linear(x, p["up_proj"], p.get("up_bias"))), p["down_proj"], p.get("down_bias"))


def scaled(x: Any, multiplier: float) -> Any:
    return x if multiplier == 1.0 else x * multiplier


def norm(x: Any, weight: Any, eps: float) -> Any:
    """RMSNorm (one CustomRMSNorm). Gemma's x * (1 + w) form is this with 1 added to w at load."""
    return rms_norm(x, weight, eps)


def unit_norm(x: Any, eps: float) -> Any:
    """RMSNorm without a weight, x / sqrt(mean(x^2) + eps) (Llama 4's "L2" q/k norm)."""
    return rms_norm(x, np.ones(x.shape[-1], x.dtype), eps)
