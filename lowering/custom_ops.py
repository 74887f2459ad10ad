"""Cloud AI 100 custom ops as ONNX functions (design.md section 5): the node contract and the
function library.

The Qualcomm compiler recognises these nodes by op_type, domain and input order and replaces them
with its own kernels. Their ONNX function bodies (custom_op_bodies.py, written with onnxscript) are
the portable reference: attached to a model as ``model.functions``, they let plain onnxruntime run it.

The bodies are compiled when first needed, so importing this module is cheap.
"""

from __future__ import annotations

import functools

import onnx

__all__ = ["CUSTOM_OP_DOMAINS", "INT32_MAX", "SUPPORTED_OPSETS", "custom_op_function"]

QUALCOMM_DOMAIN = "com.qualcomm.cloud"
QTI_AISW_DOMAIN = "com.qti.aisw.onnx"

# op_type -> domain, for every op the compiler knows (input orders: design.md section 5)
CUSTOM_OP_DOMAINS: dict[str, str] = {
    "CtxScatter": QUALCOMM_DOMAIN,
    "CtxScatter3D": QUALCOMM_DOMAIN,
    "CtxScatter3DInt": QUALCOMM_DOMAIN,
    "CtxScatterCB": QUALCOMM_DOMAIN,
    "CtxScatterCB3D": QUALCOMM_DOMAIN,
    "CtxGather": QUALCOMM_DOMAIN,
    "CtxGather3D": QUALCOMM_DOMAIN,
    "CtxGatherBlockedKV": QUALCOMM_DOMAIN,
    "CtxGatherCB": QUALCOMM_DOMAIN,
    "CtxGatherCB3D": QUALCOMM_DOMAIN,
    "CtxGatherBlockedKVCB": QUALCOMM_DOMAIN,
    "CustomRMSNorm": QTI_AISW_DOMAIN,
}

INT32_MAX = 2**31 - 1
SUPPORTED_OPSETS = range(17, 22)

def custom_op_function(op_type: str, opset: int = 17) -> onnx.FunctionProto:
    """The FunctionProto for op_type, its body using ONNX default-domain ops valid at `opset` (17..21),
    with function.opset_import listing the default domain at `opset` (and nothing unneeded).

    Each call returns a fresh copy, so the caller may edit it (e.g. rename) without touching the cache.
    """
    if op_type not in CUSTOM_OP_DOMAINS:
        raise ValueError(
            f"unknown Cloud AI 100 custom op {op_type!r}; known ops: {', '.join(CUSTOM_OP_DOMAINS)}"
        )
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"custom op {op_type}: ONNX opset {opset} is not supported; "
            f"use one of {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    function = onnx.FunctionProto()
    function.CopyFrom(_functions(opset)[op_type])
    return function


@functools.lru_cache(maxsize=None)
def _functions(opset: int) -> dict[str, onnx.FunctionProto]:
    from .custom_op_bodies import build_functions

    functions = build_functions(opset)
    assert functions.keys() == CUSTOM_OP_DOMAINS.keys()
    return functions
