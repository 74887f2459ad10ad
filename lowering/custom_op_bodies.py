"""The ONNX function bodies of the Cloud AI 100 custom ops, written with onnxscript.

The Qualcomm compiler replaces these nodes with its own kernels; the bodies are the portable
reference that lets plain onnxruntime run a model (docs/architecture.md, "Cloud AI 100 conventions").
Each honours the index conventions the hardware relies on:

- a non-CB scatter position that is negative counts from the end, so the runtime's padding
  position -1 writes the last slot; a CB scatter position that is negative writes nothing;
- INT32_MAX (2**31 - 1) is the invalid index: a scatter at it writes nothing, a gather at it reads
  index 0 (the caller masks those rows);
- two writes to one cache row are unspecified (as for any ONNX scatter with duplicate indices).

Cost: a scatter copies the cache once (one ScatterND on the cache itself) and a gather reads only the
rows it returns. Every body is dtype-polymorphic (float32, float16, integer data; int32 or int64
indices) and shape-polymorphic (sizes come from Shape ops), and a scatter's output shape is inferred
without data propagation (it is the cache's own).

This module imports onnxscript and compiles every body when `build_functions` runs, which takes a
noticeable part of a second. `custom_ops` calls it once per opset and onnxscript version and keeps the
result on disk (keyed by a hash of this file), so an export normally never imports it.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx import helper
from onnxscript import values

QUALCOMM_DOMAIN = "com.qualcomm.cloud"
QTI_AISW_DOMAIN = "com.qti.aisw.onnx"
INT32_MAX = 2**31 - 1


def build_functions(opset: int) -> dict[str, onnx.FunctionProto]:
    """Every custom op's FunctionProto, its body using default-domain ops valid at `opset`."""
    # `op` is a closure variable of the bodies below; onnxscript resolves it when compiling them,
    # so the opset is chosen here, at build time.
    op = getattr(onnxscript, f"opset{opset}")
    qualcomm = values.Opset(QUALCOMM_DOMAIN, 1)
    qti_aisw = values.Opset(QTI_AISW_DOMAIN, 1)
    INT64 = onnx.TensorProto.INT64  # noqa: N806 - reads as the dtype name inside the bodies
    ONE = helper.make_tensor("one", INT64, [1], [1])  # noqa: N806

    # ---- scatters: write new KV rows into the cache ---------------------------------------------
    # One ScatterND on the cache writes every kept update row at its (cache slot, head, position)
    # tuple. Rows that must write nothing are dropped before the scatter (ONNX scatters have no "skip",
    # and dropping them costs no copy of the cache): NonZero over the valid (batch row, token) pairs
    # gives the kept pairs [K, 2]. Every index computed from the pairs depends on position_ids (and
    # batch_index) only, which all of a step's scatters share: onnxruntime computes those nodes once per
    # step, not once per layer (its common-subexpression elimination merges them after inlining). The
    # head count is read from the shape of `head_row`, the cache's [1, H, 1, D] corner, not from the
    # cache's own shape: onnxruntime 1.32 folds a Shape node only when its input's whole shape is static,
    # and a cache's batch and context dims are symbolic, while the corner's are not (with a static H and
    # D, as in every export). The head numbers then become a constant at session start (the corner's
    # Gathers are dropped with the Shape they fed) and each write adds them to the shared pairs:
    #   tuples[k, h] = (batch row or slot of pair k, h, position of pair k)      -> [K, H, 3]
    # The update rows are gathered by pair from updates seen as [B, S, H, D] (the producer's own
    # layout, so that transpose cancels): GatherND rather than Compress, which has no bfloat16 (an
    # ai200 cache's dtype). Head numbers are counted by CumSum over ones and reshaped, never
    # unsqueezed: onnx's data propagation mis-infers Unsqueeze of a ConstantOfShape result (onnx
    # 1.17-1.23). ScatterND reads a negative coordinate from the end, which is the non-CB padding rule.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatter(data, position_ids, updates):
        """data[B,H,C,D], position_ids[B,S], updates[B,H,S,D] -> [B,H,C,D]:
        a copy of data with out[b,h,position_ids[b,s],:] = updates[b,h,s,:]."""
        position = op.Cast(position_ids, to=INT64)
        pairs = op.Transpose(op.NonZero(position < op.Constant(value_int=INT32_MAX)), perm=[1, 0])  # [K,2]
        pair_tuples = (op.Gather(pairs, [0], axis=1) * op.Constant(value_ints=[1, 0, 0])
                       + op.Unsqueeze(op.GatherND(position, pairs), [1]) * op.Constant(value_ints=[0, 0, 1]))
        head_row = op.Gather(op.Gather(data, [0], axis=2), [0], axis=0)  # [1,H,1,D]
        heads = op.CumSum(op.ConstantOfShape(op.Shape(head_row, start=1, end=2), value=ONE),
                          op.Constant(value_int=0), exclusive=1)
        tuples = op.Unsqueeze(pair_tuples, [1]) + op.Reshape(heads, [-1, 1]) * op.Constant(value_ints=[0, 1, 0])
        rows = op.GatherND(op.Transpose(updates, perm=[0, 2, 1, 3]), pairs)  # [K,H,D]
        out = op.ScatterND(data, tuples, rows)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatter3D(data, position_ids, updates):
        """data[B,C,D], position_ids[B,S], updates[B,S,D] -> [B,C,D]:
        a copy of data with out[b,position_ids[b,s],:] = updates[b,s,:]."""
        position = op.Cast(position_ids, to=INT64)
        pairs = op.Transpose(op.NonZero(position < op.Constant(value_int=INT32_MAX)), perm=[1, 0])  # [K,2]
        tuples = (op.Gather(pairs, [0], axis=1) * op.Constant(value_ints=[1, 0])
                  + op.Unsqueeze(op.GatherND(position, pairs), [1]) * op.Constant(value_ints=[0, 1]))
        out = op.ScatterND(data, tuples, op.GatherND(updates, pairs))
        return out

    # Continuous batching: row b of updates goes to cache slot batch_index[b, 0]; a negative position
    # writes nothing, like INT32_MAX.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatterCB(data, batch_index, position_ids, updates):
        """data[N,H,C,D], batch_index[B,1], position_ids[B,S], updates[B,H,S,D] -> [N,H,C,D]:
        row b of updates goes to cache slot batch_index[b,0]."""
        zero = op.Constant(value_int=0)
        position = op.Cast(position_ids, to=INT64)
        valid = op.And(position >= zero, position < op.Constant(value_int=INT32_MAX))
        pairs = op.Transpose(op.NonZero(valid), perm=[1, 0])  # [K,2]
        slot = op.Gather(op.Cast(batch_index, to=INT64), op.Gather(pairs, [0], axis=1), axis=0)  # [K,1]
        pair_tuples = (op.Reshape(slot, [-1, 1]) * op.Constant(value_ints=[1, 0, 0])
                       + op.Unsqueeze(op.GatherND(position, pairs), [1]) * op.Constant(value_ints=[0, 0, 1]))
        head_row = op.Gather(op.Gather(data, [0], axis=2), [0], axis=0)  # [1,H,1,D]
        heads = op.CumSum(op.ConstantOfShape(op.Shape(head_row, start=1, end=2), value=ONE), zero, exclusive=1)
        tuples = op.Unsqueeze(pair_tuples, [1]) + op.Reshape(heads, [-1, 1]) * op.Constant(value_ints=[0, 1, 0])
        rows = op.GatherND(op.Transpose(updates, perm=[0, 2, 1, 3]), pairs)  # [K,H,D]
        out = op.ScatterND(data, tuples, rows)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxScatterCB3D(data, batch_index, position_ids, updates):
        """data[N,C,D], batch_index[B,1], position_ids[B,S], updates[B,S,D] -> [N,C,D]:
        row b of updates goes to cache slot batch_index[b,0]."""
        position = op.Cast(position_ids, to=INT64)
        valid = op.And(position >= op.Constant(value_int=0), position < op.Constant(value_int=INT32_MAX))
        pairs = op.Transpose(op.NonZero(valid), perm=[1, 0])  # [K,2]
        slot = op.Gather(op.Cast(batch_index, to=INT64), op.Gather(pairs, [0], axis=1), axis=0)  # [K,1]
        tuples = (op.Reshape(slot, [-1, 1]) * op.Constant(value_ints=[1, 0])
                  + op.Unsqueeze(op.GatherND(position, pairs), [1]) * op.Constant(value_ints=[0, 1]))
        out = op.ScatterND(data, tuples, op.GatherND(updates, pairs))
        return out

    # ---- gathers: read the cache back --------------------------------------------------------
    # The index arithmetic comes before the one node that needs the cache's shape (Expand), so
    # onnxruntime computes it once per step for all layers. `fmod(index, INT32_MAX)` maps INT32_MAX to 0 and keeps every other index (negative ones too).
    # A negative index counts from the end.
    # comp_ctx_len follows QEfficient: CtxGather broadcasts its indices to [B, H, comp_ctx_len] (one
    # index may be read comp_ctx_len times); the CB gathers read the K indices they are given.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGather(data, ctx_indices, comp_ctx_len):
        """data[B,H,C,D], ctx_indices[B|1, 1|H, K], comp_ctx_len (= K) -> [B,H,K,D]:
        out[b,h,k,:] = data[b,h,ctx_indices[b,h,k],:]."""
        index = op.Unsqueeze(op.Mod(op.Cast(ctx_indices, to=INT64), op.Constant(value_int=INT32_MAX), fmod=1), [3])
        index = op.Expand(index, op.Concat(op.Shape(data, start=0, end=2), op.Reshape(comp_ctx_len, [1]),
                                           op.Constant(value_ints=[1]), axis=0))
        out = op.GatherND(data, index, batch_dims=2)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGather3D(data, ctx_indices):
        """data[B,C,D], ctx_indices[B|1, K] -> [B,K,D]: out[b,k,:] = data[b,ctx_indices[b,k],:]."""
        index = op.Unsqueeze(op.Mod(op.Cast(ctx_indices, to=INT64), op.Constant(value_int=INT32_MAX), fmod=1), [2])
        index = op.Expand(index, op.Concat(op.Shape(data, start=0, end=1), op.Shape(index, start=1), axis=0))
        out = op.GatherND(data, index, batch_dims=1)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGatherBlockedKV(data, ctx_indices):
        """data[B,H,C,D], ctx_indices[B,H,K] -> [B,H,K,D]: one block of the cache,
        out[b,h,k,:] = data[b,h,ctx_indices[b,h,k],:]."""
        index = op.Mod(op.Cast(ctx_indices, to=INT64), op.Constant(value_int=INT32_MAX), fmod=1)
        out = op.GatherND(data, op.Unsqueeze(index, [3]), batch_dims=2)
        return out

    # Continuous batching: one Gather on the cache seen as rows [N*H*C, D] (a view, no copy), at row
    # (slot * H + head) * C + index. The index is taken modulo C so that a negative one counts from
    # the end of its own (slot, head) block.

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGatherCB(data, batch_index, ctx_indices, comp_ctx_len):
        """data[N,H,C,D], batch_index[B,1], ctx_indices[B, 1|H, K], comp_ctx_len (= K) -> [B,H,K,D]:
        out[b,h,k,:] = data[batch_index[b,0],h,ctx_indices[b,h,k],:]."""
        head_row = op.Gather(op.Gather(data, [0], axis=2), [0], axis=0)  # [1,H,1,D]: see the scatters
        num_heads = op.Shape(head_row, start=1, end=2)
        ctx_len = op.Shape(data, start=2, end=3)
        heads = op.CumSum(op.ConstantOfShape(num_heads, value=ONE), op.Constant(value_int=0), exclusive=1)
        index = op.Mod(op.Mod(op.Cast(ctx_indices, to=INT64), op.Constant(value_int=INT32_MAX), fmod=1), ctx_len)
        block = (op.Unsqueeze(op.Cast(batch_index, to=INT64), [2]) * num_heads + op.Reshape(heads, [-1, 1])) * ctx_len
        out = op.Gather(op.Flatten(data, axis=3), block + index, axis=0)
        return out

    @onnxscript.script(qualcomm, default_opset=op)
    def CtxGatherCB3D(data, batch_index, ctx_indices):
        """data[N,C,D], batch_index[B,1], ctx_indices[B,K] -> [B,K,D]:
        out[b,k,:] = data[batch_index[b,0],ctx_indices[b,k],:]."""
        ctx_len = op.Shape(data, start=1, end=2)
        index = op.Mod(op.Mod(op.Cast(ctx_indices, to=INT64), op.Constant(value_int=INT32_MAX), fmod=1), ctx_len)
        out = op.Gather(op.Flatten(data, axis=2), op.Cast(batch_index, to=INT64) * ctx_len + index, axis=0)
        return out

    # ---- RMS norm --------------------------------------------------------------------------
    # Written as Pow(2) -> ReduceMean(-1) -> Add(epsilon) -> Sqrt -> Div -> Mul(weight): onnxruntime
    # fuses exactly this chain into one SimplifiedLayerNormalization kernel. The weight is Mul's second
    # operand: as the first, onnxruntime 1.32's fusion mis-wires a hidden size of 1 (the model then fails
    # to load). ReduceMean's axes moved from attribute to input at opset 18, so the body is written once
    # per side of that change.

    if opset >= 18:
        @onnxscript.script(qti_aisw, default_opset=op)
        def CustomRMSNorm(hidden, weight, epsilon: float):
            """hidden[...,D], weight[D] -> [...,D]:
            weight * hidden / sqrt(mean(hidden**2, -1) + epsilon), computed in hidden's dtype."""
            mean_square = op.ReduceMean(op.Pow(hidden, op.Constant(value_float=2.0)), [-1], keepdims=1)
            out = (hidden / op.Sqrt(mean_square + op.CastLike(epsilon, hidden))) * weight
            return out
    else:
        @onnxscript.script(qti_aisw, default_opset=op)
        def CustomRMSNorm(hidden, weight, epsilon: float):
            """hidden[...,D], weight[D] -> [...,D]:
            weight * hidden / sqrt(mean(hidden**2, -1) + epsilon), computed in hidden's dtype."""
            mean_square = op.ReduceMean(op.Pow(hidden, op.Constant(value_float=2.0)), axes=[-1], keepdims=1)
            out = (hidden / op.Sqrt(mean_square + op.CastLike(epsilon, hidden))) * weight
            return out

    bodies = [
        CtxScatter, CtxScatter3D, CtxScatterCB, CtxScatterCB3D,
        CtxGather, CtxGather3D, CtxGatherBlockedKV, CtxGatherCB, CtxGatherCB3D,
        CustomRMSNorm,
    ]  # fmt: skip
    functions = {body.name: body.to_function_proto() for body in bodies}
    # Two compiler ops share a body: the int32 3-D scatter (index tables) is CtxScatter3D on int32 data,
    # and the blocked CB read is CtxGatherCB without the (unused) comp_ctx_len input.
    functions["CtxScatter3DInt"] = _renamed(functions["CtxScatter3D"], "CtxScatter3DInt")
    functions["CtxGatherBlockedKVCB"] = _renamed(functions["CtxGatherCB"], "CtxGatherBlockedKVCB",
                                                 drop_input="comp_ctx_len")
    for function in functions.values():
        onnx.checker.check_function(function)
    return functions


def _renamed(function: onnx.FunctionProto, name: str, drop_input: str | None = None) -> onnx.FunctionProto:
    """A copy of `function` called `name`, without the input `drop_input` (which its body must not use)."""
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    copy.name = name
    if drop_input is not None:
        assert all(drop_input not in node.input for node in copy.node), f"{drop_input} is used"
        copy.input.remove(drop_input)
    return copy
