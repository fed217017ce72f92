"""TVM lowering of kernelize.LUTLinear (kernelize/ops/lut_linear.py)."""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx

from kernelize.backends.tvm.registry import lowering


@lowering("LUTLinear")
def lut_linear(bb, inputs, attrs):
    """One fused, hand-scheduled PrimFunc: for a block of tokens it encodes (distances
    ``|p|^2 - 2 x.p`` vectorized over the K prototypes, then the argmin) and then, per tile of
    output channels, gathers and accumulates the int8 table rows into int32 vector registers
    for a few tokens at a time."""
    x, prototypes, tables, scale, offset = inputs
    shape = [int(d) for d in x.ty.shape]
    c, k, v = (int(d) for d in prototypes.ty.shape)
    out = int(tables.ty.shape[2])
    tokens = int(np.prod(shape[:-1]))
    x2 = bb.emit(relax.op.reshape(x, [tokens, c * v]))
    if prototypes.ty.dtype != "float32":  # float16 storage: computed in float32
        prototypes = bb.emit(relax.op.astype(prototypes, "float32"))
    protos_t = bb.emit(relax.op.permute_dims(prototypes, [0, 2, 1]))  # [C, V, K]: K contiguous
    norms = bb.emit(relax.op.sum(relax.op.multiply(prototypes, prototypes), axis=[2]))  # [C, K]
    gvar = bb.add_func(_lut_kernel(tokens, c, k, v, out), "lut_linear")
    y = bb.emit(relax.call_tir(gvar, [x2, protos_t, norms, tables, scale, offset],
                               relax.TensorType([tokens, out], "float32")))
    return bb.emit(relax.op.reshape(y, [*shape[:-1], out]))


def _argmin_reducer():
    def combine(left, right):
        left_index, left_value = left
        right_index, right_value = right
        take_left = tirx.any(left_value < right_value,
                             tirx.all(left_value == right_value, left_index < right_index))
        return (tirx.Select(take_left, left_index, right_index),
                tirx.Select(take_left, left_value, right_value))

    def identity(index_dtype, value_dtype):
        return tirx.const(-1, index_dtype), tirx.max_value(value_dtype)

    return te.comm_reducer(combine, identity, name="argmin")


def _lut_kernel(tokens: int, c: int, k: int, v: int, out: int):
    """The scheduled PrimFunc ``(x [T, C*V], protos_t [C, V, K], norms [C, K], tables [C, K, out]
    int8, scale [out], offset [out]) -> y [T, out]``."""
    x = te.placeholder((tokens, c * v), "float32", name="x")
    protos_t = te.placeholder((c, v, k), "float32", name="protos_t")
    norms = te.placeholder((c, k), "float32", name="norms")
    tables = te.placeholder((c, k, out), "int8", name="tables")
    scale = te.placeholder((out,), "float32", name="scale")
    offset = te.placeholder((out,), "float32", name="offset")

    def distance_of(t, s, p):  # |p|^2 - 2 x.p, the dot product unrolled over the V features
        dot = x[t, s * v] * protos_t[s, 0, p]
        for f in range(1, v):
            dot = dot + x[t, s * v + f] * protos_t[s, f, p]
        return norms[s, p] - np.float32(2.0) * dot

    distance = te.compute((tokens, c, k), distance_of, name="distance")
    rk = te.reduce_axis((0, k), "rk")
    code, _ = te.compute((tokens, c), lambda t, s: _argmin_reducer()((rk.var.astype("int32"), distance[t, s, rk]),
                                                                      axis=rk), name="code")
    rc = te.reduce_axis((0, c), "rc")
    acc = te.compute((tokens, out), lambda t, j: te.sum(tables[rc, code[t, rc], j].astype("int32"), axis=rc),
                     name="acc")
    y = te.compute((tokens, out), lambda t, j: acc[t, j].astype("float32") * scale[j] + offset[j], name="y")
    func = te.create_prim_func([x, protos_t, norms, tables, scale, offset, y])

    sch = s_tir.Schedule(func)
    lanes = 8
    nr = 4 * lanes if out % (4 * lanes) == 0 else (lanes if out % lanes == 0 else 1)
    mr = min(3 if nr == 4 * lanes else 6, tokens)
    block_tokens = min(tokens, 16 * mr)
    acc_block = sch.get_sblock("acc")
    t_loop, j_loop, c_loop = sch.get_loops(acc_block)
    t_block, t_rest = sch.split(t_loop, [None, block_tokens])
    t_mid, t_inner = sch.split(t_rest, [None, mr])
    j_outer, j_inner = sch.split(j_loop, [None, nr])
    sch.reorder(t_block, j_outer, t_mid, c_loop, t_inner, j_inner)
    local = sch.cache_write(acc_block, 0, "local")
    sch.reverse_compute_at(local, t_mid, preserve_unit_loops=True)
    sch.reverse_compute_inline(sch.get_sblock("y"))
    sch.unroll(t_inner)
    if nr > 1:
        sch.vectorize(j_inner)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(acc_block, c_loop)
    if nr > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    # encoding: per block of tokens, before its gather loops
    code_block = sch.get_sblock("code")
    sch.compute_at(code_block, t_block, preserve_unit_loops=True)
    distance_block = sch.get_sblock("distance")
    sch.compute_at(distance_block, sch.get_loops(code_block)[-2], preserve_unit_loops=True)  # per (token, subspace)
    if k % lanes == 0:
        sch.vectorize(sch.get_loops(distance_block)[-1])
    # no parallel loop: the argmin block (two outputs) is not accepted under a parallel loop;
    # the kernel runs on one thread (as the benchmarks' dense matmuls do)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
