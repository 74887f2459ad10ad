"""Cloud AI 100 custom ops as ONNX functions (docs/architecture.md, "Cloud AI 100 conventions").

The Qualcomm compiler recognises these nodes by op_type, domain and input order and replaces them
with its own kernels. The function bodies below are the portable reference: attached to a model as
``model.functions``, they let plain onnxruntime run the model, and they honour the index
conventions the hardware relies on:

- a non-CB scatter position that is negative counts from the end (the ScatterND rule), so the
  runtime's padding position -1 writes the last slot;
- a CB scatter position that is negative is first turned into INT32_MAX;
- INT32_MAX (2**31 - 1) is the invalid index: a scatter at it writes nothing, a gather at it reads
  index 0 (the caller masks those rows).

Every body is dtype-polymorphic (float32, float16, integer data; int32 or int64 indices) and shape
polymorphic (sizes come from Shape ops). The bodies are written with onnxscript per requested opset
(17..21); onnxscript is imported only when a body is first built, so importing this module is cheap.
"""

from __future__ import annotations

import functools

import onnx

__all__ = ["CUSTOM_OP_DOMAINS", "INT32_MAX", "SUPPORTED_OPSETS", "custom_op_function"]

QUALCOMM_DOMAIN = "com.qualcomm.cloud"
QTI_AISW_DOMAIN = "com.qti.aisw.onnx"

CUSTOM_OP_DOMAINS: dict[str, str] = {
    "CtxScatter": QUALCOMM_DOMAIN,
    "CtxScatter3D": QUALCOMM_DOMAIN,
    "CtxScatterCB": QUALCOMM_DOMAIN,
    "CtxScatterCB3D": QUALCOMM_DOMAIN,
    "CtxGather": QUALCOMM_DOMAIN,
    "CtxGather3D": QUALCOMM_DOMAIN,
    "CtxGatherCB": QUALCOMM_DOMAIN,
    "CtxGatherCB3D": QUALCOMM_DOMAIN,
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
    function.CopyFrom(_build_functions(opset)[op_type])
    return function


@functools.lru_cache(maxsize=None)
def _build_functions(opset: int) -> dict[str, onnx.FunctionProto]:
    """Compile every custom-op body against the default domain at `opset`."""
    import onnxscript
    from onnxscript import values

    # `op` is a closure variable of the bodies below; onnxscript resolves it when compiling them,
    # so the opset is chosen here, at build time, not when this module is imported.
    op = getattr(onnxscript, f"opset{opset}")
    qualcomm = values.Opset(QUALCOMM_DOMAIN, 1)
    qti_aisw = values.Opset(QTI_AISW_DOMAIN, 1)
    INT64 = onnx.TensorProto.INT64  # noqa: N806 - reads as the dtype name inside the bodies

    # ---- scatters: write new KV rows into the cache ---------------------------------------------
    # An invalid position must write nothing. Plain ONNX scatters have no "skip", so the bodies
    # scatter into one scratch slot appended after the last context slot (index ctx_len) and
    # slice it off again. The scratch slot's initial content is irrelevant; a copy of slot 0 keeps
    # the body free of dtype-specific constants.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatter(data, position_ids, updates):
        """data[B,H,C,D], position_ids[B,S], updates[B,H,S,D] -> [B,H,C,D]:
        a copy of data with out[b,h,position_ids[b,s],:] = updates[b,h,s,:]."""
        ctx_len = op.Shape(data, start=2, end=3)
        pos = op.Cast(position_ids, to=INT64)
        pos = op.Where(pos < op.Constant(value_int=0), pos + ctx_len, pos)  # -1 is the last slot
        pos = op.Where(pos == op.Constant(value_int=INT32_MAX), ctx_len, pos)  # invalid: scratch slot
        padded = op.Concat(data, op.Slice(data, [0], [1], [2]), axis=2)
        # ScatterElements wants one index per updated element: broadcast over heads and head_dim.
        indices = op.Expand(op.Unsqueeze(pos, [1, 3]), op.Shape(updates))
        written = op.ScatterElements(padded, indices, updates, axis=2)
        out = op.Slice(written, [0], [-1], [2])  # drop the scratch slot
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatter3D(data, position_ids, updates):
        """data[B,C,D], position_ids[B,S], updates[B,S,D] -> [B,C,D]:
        a copy of data with out[b,position_ids[b,s],:] = updates[b,s,:]."""
        ctx_len = op.Shape(data, start=1, end=2)
        pos = op.Cast(position_ids, to=INT64)
        pos = op.Where(pos < op.Constant(value_int=0), pos + ctx_len, pos)  # -1 is the last slot
        pos = op.Where(pos == op.Constant(value_int=INT32_MAX), ctx_len, pos)  # invalid: scratch slot
        padded = op.Concat(data, op.Slice(data, [0], [1], [1]), axis=1)
        indices = op.Expand(op.Unsqueeze(pos, [2]), op.Shape(updates))
        written = op.ScatterElements(padded, indices, updates, axis=1)
        out = op.Slice(written, [0], [-1], [1])  # drop the scratch slot
        return out

    # Continuous batching: read the B cache rows named by batch_index, scatter into them as above,
    # write the rows back with ScatterND (whose indices must be int64). Two rows naming the same
    # slot are unspecified, as for any ONNX scatter with duplicate indices.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatterCB(data, batch_index, position_ids, updates):
        """data[N,H,C,D], batch_index[B,1], position_ids[B,S], updates[B,H,S,D] -> [N,H,C,D]:
        row b of updates goes to cache slot batch_index[b,0]."""
        slots = op.Cast(batch_index, to=INT64)
        rows = op.Gather(data, op.Squeeze(slots, [1]), axis=0)
        ctx_len = op.Shape(data, start=2, end=3)
        invalid = op.Constant(value_int=INT32_MAX)
        pos = op.Cast(position_ids, to=INT64)
        pos = op.Where(pos < op.Constant(value_int=0), invalid, pos)  # CB padding writes nothing
        pos = op.Where(pos == invalid, ctx_len, pos)  # invalid: scratch slot
        padded = op.Concat(rows, op.Slice(rows, [0], [1], [2]), axis=2)
        indices = op.Expand(op.Unsqueeze(pos, [1, 3]), op.Shape(updates))
        written = op.ScatterElements(padded, indices, updates, axis=2)
        out = op.ScatterND(data, slots, op.Slice(written, [0], [-1], [2]))  # without the scratch slot
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatterCB3D(data, batch_index, position_ids, updates):
        """data[N,C,D], batch_index[B,1], position_ids[B,S], updates[B,S,D] -> [N,C,D]:
        row b of updates goes to cache slot batch_index[b,0]."""
        slots = op.Cast(batch_index, to=INT64)
        rows = op.Gather(data, op.Squeeze(slots, [1]), axis=0)
        ctx_len = op.Shape(data, start=1, end=2)
        invalid = op.Constant(value_int=INT32_MAX)
        pos = op.Cast(position_ids, to=INT64)
        pos = op.Where(pos < op.Constant(value_int=0), invalid, pos)  # CB padding writes nothing
        pos = op.Where(pos == invalid, ctx_len, pos)  # invalid: scratch slot
        padded = op.Concat(rows, op.Slice(rows, [0], [1], [1]), axis=1)
        indices = op.Expand(op.Unsqueeze(pos, [2]), op.Shape(updates))
        written = op.ScatterElements(padded, indices, updates, axis=1)
        out = op.ScatterND(data, slots, op.Slice(written, [0], [-1], [1]))  # without the scratch slot
        return out

    # ---- gathers: read the cache back --------------------------------------------------------
    # INT32_MAX reads slot 0; a negative index counts from the end (GatherND's own rule).
    # comp_ctx_len follows QEfficient: it is the compute context length, the number of slots read,
    # so the indices are broadcast to [B, H, comp_ctx_len] (ctx_indices' last dim is comp_ctx_len,
    # or 1 to read one slot comp_ctx_len times).

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGather(data, ctx_indices, comp_ctx_len):
        """data[B,H,C,D], ctx_indices[B|1, 1|H, K], comp_ctx_len (= K) -> [B,H,K,D]:
        out[b,h,k,:] = data[b,h,ctx_indices[b,h,k],:]."""
        index = op.Cast(ctx_indices, to=INT64)
        index = op.Where(index == op.Constant(value_int=INT32_MAX), op.Constant(value_int=0), index)
        read_len = op.Reshape(op.Cast(comp_ctx_len, to=INT64), [1])
        index = op.Expand(index, op.Concat(op.Shape(data, start=0, end=2), read_len, axis=0))
        out = op.GatherND(data, op.Unsqueeze(index, [3]), batch_dims=2)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGather3D(data, ctx_indices):
        """data[B,C,D], ctx_indices[B|1, K] -> [B,K,D]: out[b,k,:] = data[b,ctx_indices[b,k],:]."""
        index = op.Cast(ctx_indices, to=INT64)
        index = op.Where(index == op.Constant(value_int=INT32_MAX), op.Constant(value_int=0), index)
        batch_and_len = op.Concat(op.Shape(data, start=0, end=1), op.Shape(index, start=1), axis=0)
        index = op.Expand(index, batch_and_len)
        out = op.GatherND(data, op.Unsqueeze(index, [2]), batch_dims=1)
        return out

    # Continuous batching: gather the B cache rows named by batch_index first, then read as above.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGatherCB(data, batch_index, ctx_indices, comp_ctx_len):
        """data[N,H,C,D], batch_index[B,1], ctx_indices[B, 1|H, K], comp_ctx_len (= K) -> [B,H,K,D]:
        out[b,h,k,:] = data[batch_index[b,0],h,ctx_indices[b,h,k],:]."""
        rows = op.Gather(data, op.Squeeze(batch_index, [1]), axis=0)
        index = op.Cast(ctx_indices, to=INT64)
        index = op.Where(index == op.Constant(value_int=INT32_MAX), op.Constant(value_int=0), index)
        read_len = op.Reshape(op.Cast(comp_ctx_len, to=INT64), [1])
        index = op.Expand(index, op.Concat(op.Shape(rows, start=0, end=2), read_len, axis=0))
        out = op.GatherND(rows, op.Unsqueeze(index, [3]), batch_dims=2)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGatherCB3D(data, batch_index, ctx_indices):
        """data[N,C,D], batch_index[B,1], ctx_indices[B,K] -> [B,K,D]:
        out[b,k,:] = data[batch_index[b,0],ctx_indices[b,k],:]."""
        rows = op.Gather(data, op.Squeeze(batch_index, [1]), axis=0)
        index = op.Cast(ctx_indices, to=INT64)
        index = op.Where(index == op.Constant(value_int=INT32_MAX), op.Constant(value_int=0), index)
        batch_and_len = op.Concat(op.Shape(rows, start=0, end=1), op.Shape(index, start=1), axis=0)
        index = op.Expand(index, batch_and_len)
        out = op.GatherND(rows, op.Unsqueeze(index, [2]), batch_dims=1)
        return out

    # ---- RMS norm --------------------------------------------------------------------------
    # ReduceSum (axes an input since opset 13) divided by D instead of ReduceMean, whose axes moved
    # from attribute to input at opset 18: one body is valid for every supported opset.

    @onnxscript.script(qti_aisw, default_opset=op)
    def CustomRMSNorm(hidden, weight, epsilon: float):
        """hidden[...,D], weight[D] -> [...,D]:
        weight * hidden / sqrt(mean(hidden**2, -1) + epsilon), computed in hidden's dtype."""
        dim = op.CastLike(op.Shape(hidden, start=-1), hidden)
        mean_square = op.ReduceSum(hidden * hidden, [-1], keepdims=1) / dim
        out = weight * hidden / op.Sqrt(mean_square + op.CastLike(epsilon, hidden))
        return out

    bodies = [
        CtxScatter, CtxScatter3D, CtxScatterCB, CtxScatterCB3D,
        CtxGather, CtxGather3D, CtxGatherCB, CtxGatherCB3D,
        CustomRMSNorm,
    ]  # fmt: skip
    functions = {body.name: body.to_function_proto() for body in bodies}
    assert functions.keys() == CUSTOM_OP_DOMAINS.keys()
    for function in functions.values():
        onnx.checker.check_function(function)
    return functions
