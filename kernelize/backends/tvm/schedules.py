"""kernelize's own CPU schedules for TVM PrimFuncs (after LegalizeOps + FuseOps + FuseTIR).

``MatmulCPU`` is the rule that matters: every matmul-like block ``C[..., i, j] += A[..., i, k] *
B[..., k, j]`` (dense layers, batched attention products; the operators' lowerings keep B in
this row-major "NN" layout, K^T included) is register-blocked:

* an ``MR x NR`` tile of C lives in registers (``NR`` = two vectors of the target, ``MR`` rows:
  6 for a 16-register ISA such as AVX2, 8 for 32 registers), ``k`` runs innermost over the
  tile: one broadcast of ``A[i, k]`` per row and ``NR / lanes`` loads of the contiguous
  ``B[k, j:j+NR]`` feed ``MR * NR / lanes`` FMAs;
* loop order ``batch, j-tile, i-tile, k``: the ``K x NR`` panel of B stays in cache while all
  rows of A stream through it; the batch and j-tile loops are fused and run in parallel;
  reductions longer than ``LONG_K`` run as ``batch, j-tile, k-block, i-tile, k`` (the block of
  the panel stays in L1; the column panel's accumulators stay local between blocks);
* the elementwise epilogue FuseOps attached (bias, GELU, residual add, mask add) is inlined
  into the tile's write-back, so C never goes to memory;
* the single-row form ``C[j] += A[k] * B[k, j]`` (a pooler, batch-1 decoding) gets the same
  tile with ``MR = 1``. Rows that the tile does not divide are padded to a multiple of ``MR``
  (a partial row tile halves the speed of the whole kernel) where the columns tile exactly;
  otherwise they are predicated, and widths that are no multiple of the vector are tiled
  without vectorizing.

``RowReductionCPU`` handles softmax and layer/RMS norm: row loop parallel, each reduction split
into ``lanes`` partial sums (rfactor) so it vectorizes, elementwise steps vectorized.
``InjectiveCPU`` fuses, parallelizes and vectorizes elementwise/layout functions.
``default_rules(target)`` lists them (with dlight's CPU rules as fallbacks) and
``apply_rules`` runs them like dlight's ``ApplyDefaultSchedule``, recording which rule took
each PrimFunc. Rules never raise: a PrimFunc a rule cannot handle is left to the next one
(an unscheduled PrimFunc still compiles, just slowly).
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

log = logging.getLogger(__name__)


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """SIMD lanes for ``dtype_bits``-wide elements on ``target`` (LLVM's own query reports
    512 bits for any x86 CPU, so the ISA is read from the target's features)."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm")):
        bits = 128
    else:
        try:
            if codegen.target_has_features("avx512f", target):
                bits = 512
            elif codegen.target_has_features("avx", target):
                bits = 256
            else:
                bits = 128
        except Exception:  # noqa: BLE001 - a target LLVM cannot describe
            bits = 128
    return max(bits // dtype_bits, 1)


def vector_registers(target: Target) -> int:
    """Architectural vector registers (16 for SSE/AVX2, 32 for AVX-512 and NEON)."""
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith("aarch64"):
        return 32
    return 32 if vector_lanes(target) >= 16 else 16


def _vars_in(expr) -> set:
    import tvm_ffi

    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def _index_vars(region) -> list[set]:
    return [_vars_in(r.min) for r in region]


def matmul_operands(block: tirx.Stmt):
    """For a block computing ``C[s..., i, j] += A[..., i, k] * B[..., k, j]`` (iterators S..S R)
    the tuple (A, B, True); for the matrix-vector form ``C[s..., j] += A[..., k] * B[..., k, j]``
    (a single row, after normalization drops unit axes) (A, B, False); None for anything else,
    other layouts included."""
    iters = list(block.iter_vars)
    if len(iters) < 2 or len(block.writes) != 1 or block.init is None:
        return None
    if iters[-1].iter_type != tirx.IterVar.CommReduce:
        return None
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]):
        return None
    spatial = [iv.var for iv in iters[:-1]]
    k, j = iters[-1].var, spatial[-1]
    out = block.writes[0]
    out_idx = _index_vars(out.region)  # unit axes are constants after normalization
    if not out_idx or out_idx[-1] != {j} or set().union(*out_idx) != set(spatial) or \
            any(len(v) > 1 for v in out_idx):
        return None
    body = block.body
    if not isinstance(body, tirx.BufferStore) or type(body.value).__name__ != "Add":
        return None
    reads = [r for r in block.reads if not r.source.same_as(out.source)]
    if len(reads) != 2:
        return None
    indices = [(_index_vars(r.region), r.source) for r in reads]
    if len(spatial) >= 2 and len(out_idx) >= 2 and out_idx[-2] == {spatial[-2]}:
        i = spatial[-2]
        a = b = None
        for idx, buf in indices:
            used = set().union(*idx) if idx else set()
            if len(idx) >= 2 and idx[-1] == {k} and idx[-2] == {i} and j not in used:
                a = buf
            elif len(idx) >= 2 and idx[-1] == {j} and idx[-2] == {k} and i not in used:
                b = buf
        if a is not None and b is not None:
            return a, b, True
    batch = set(spatial[:-1])
    a = b = None
    for idx, buf in indices:
        used = set().union(*idx) if idx else set()
        if idx and idx[-1] == {k} and j not in used and used - {k} <= batch:
            a = buf
        elif len(idx) >= 2 and idx[-1] == {j} and idx[-2] == {k} and batch <= used:
            b = buf
    if a is not None and b is not None:
        return a, b, False
    return None


def _extent(loop_info) -> int | None:
    dom = loop_info.dom
    return int(dom) if isinstance(dom, (int, tirx.IntImm)) else None


LONG_K = 512  # reductions longer than this run in blocks of K_BLOCKS (the first that divides K)
K_BLOCKS = (384, 256, 512, 128)  # measured at 258 x 1536 x 384: 70 GFLOP/s unblocked, 85-88 blocked


class MatmulCPU(CPUScheduleRule):
    """Register-blocked, vectorized, parallel matmul with its epilogue fused (see module doc)."""

    def __init__(self, rows: int | None = None, vectors: int = 2):
        self.rows = rows
        self.vectors = vectors

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func, target)
        except Exception as err:  # noqa: BLE001 - any schedule error: leave it to other rules
            log.debug("MatmulCPU skipped a PrimFunc: %s", err)
            return None

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        found = [(n, info) for n, info in enumerate(infos)
                 if info.is_reduction() and matmul_operands(sch.get(info.block_rv)) is not None]
        if len(found) != 1:
            return None
        index, info = found[0]
        has_rows = matmul_operands(sch.get(info.block_rv))[2]
        if any(not other.is_injective() for other in infos if other is not info):
            return None
        loops = [it.loop_rv for it in info.iters]
        extents = [_extent(it) for it in info.iters]
        if any(e is None for e in extents):
            return None  # symbolic shapes: not handled here
        if has_rows:
            *batch, loop_i, loop_j, loop_k = loops
            m = extents[-3]
        else:  # one row (matrix-vector): the same tile with MR = 1
            *batch, loop_j, loop_k = loops
            loop_i, m = None, 1
        n = extents[-2]
        lanes = vector_lanes(target)
        rows = self.rows or (6 if vector_registers(target) <= 16 else 8)
        nr = lanes * self.vectors
        vectorize = True
        if n % nr:
            if n % lanes == 0:
                nr = lanes
            else:
                nr, vectorize = min(n, nr), False  # odd widths: tiled, not vectorized
        mr = min(rows, m)
        if m % mr and n % nr == 0:
            # A partial last row tile makes the whole kernel ~2x slower (measured, interleaved:
            # 42 vs 91 GFLOP/s at M = 256, MR = 6, 384 x 384; M = 131 alike): pad the rows to a
            # multiple of MR instead (one copy of A). Only where the columns tile exactly: with
            # a partial column tile too, the inlined epilogue lost its column guard (wrote out of
            # bounds) in TVM 0.27.
            sch.pad_einsum(info.block_rv, [1] * len(batch) + [mr, 1, 1])
            infos = normalize_prim_func(sch)
            index = next(n for n, other in enumerate(infos) if other.is_reduction())
            info = infos[index]
            loops = [it.loop_rv for it in info.iters]
            *batch, loop_i, loop_j, loop_k = loops
        block = info.block_rv

        # epilogue: inline the elementwise chain into its last block
        consumers = infos[index + 1:]
        for other in consumers[:-1]:
            sch.compute_inline(other.block_rv)
        last = consumers[-1].block_rv if consumers else None

        j_outer, j_inner = sch.split(loop_j, [None, nr])
        k_block = next((kc for kc in K_BLOCKS if extents[-1] % kc == 0), None) if extents[-1] > LONG_K else None
        if loop_i is not None and k_block is not None:
            # long reductions: K in blocks, so the block of the B panel stays in L1 across the
            # row tiles; the accumulators of the whole column panel stay local between blocks
            i_outer, i_inner = sch.split(loop_i, [None, mr])
            k_outer, loop_k = sch.split(loop_k, [None, k_block])
            sch.reorder(*batch, j_outer, k_outer, i_outer, loop_k, i_inner, j_inner)
            tile, reduction_start = j_outer, k_outer
        elif loop_i is not None:
            i_outer, i_inner = sch.split(loop_i, [None, mr])
            sch.reorder(*batch, j_outer, i_outer, loop_k, i_inner, j_inner)
            tile, reduction_start = i_outer, loop_k
        else:
            i_inner = None
            sch.reorder(*batch, j_outer, loop_k, j_inner)
            tile, reduction_start = j_outer, loop_k
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, tile, preserve_unit_loops=True)
        if last is not None:
            try:
                sch.reverse_compute_inline(last)
            except Exception:  # noqa: BLE001 - keep it as its own loop nest
                self._injective(sch, last, lanes)
        outer = sch.fuse(*batch, j_outer) if batch else j_outer
        sch.parallel(outer)
        if i_inner is not None:
            sch.unroll(i_inner)
        if vectorize:
            sch.vectorize(j_inner)
            write_loops = sch.get_loops(local)
            sch.vectorize(write_loops[-1])
        init = sch.decompose_reduction(block, reduction_start)
        if vectorize:
            sch.vectorize(sch.get_loops(init)[-1])
        for producer in infos[:index]:
            self._injective(sch, producer.block_rv, lanes)
        return sch

    @staticmethod
    def _injective(sch, block, lanes):
        try:
            InjectiveCPU.schedule_block(sch, block, lanes)
        except Exception:  # noqa: BLE001 - leave the block as it is
            pass


class InjectiveCPU(CPUScheduleRule):
    """Elementwise and layout functions: producers inlined into the output block, whose loops
    are fused, split by the vector width (inner vectorized when it divides) and parallel."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or any(not info.is_injective() for info in infos):
                return None
            lanes = vector_lanes(target)
            for info in infos[:-1]:
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # noqa: BLE001 - stays a loop nest of its own
                    self.schedule_block(sch, info.block_rv, lanes)
            self.schedule_block(sch, infos[-1].block_rv, lanes)
            return sch
        except Exception as err:  # noqa: BLE001
            log.debug("InjectiveCPU skipped a PrimFunc: %s", err)
            return None

    @staticmethod
    def schedule_block(sch, block, lanes):
        loops = sch.get_loops(block)
        if not loops:
            return
        extents = []
        for loop in loops:
            ext = sch.get(loop).extent
            if not isinstance(ext, tirx.IntImm):
                return
            extents.append(int(ext))
        total = 1
        for e in extents:
            total *= e
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if extents[-1] % lanes == 0 and total >= 4 * lanes:
            outer, inner = sch.split(fused, [None, lanes])
            sch.vectorize(inner)
        else:
            outer = fused
        if total >= 4096:
            sch.parallel(outer)


def default_rules(target: Target) -> list:
    """The CPU rules, most specific first.

    dlight's ``cpu.GEMV`` is left out: on linear attention's normalizer (features x key sums)
    it produced a 128-lane gather with a 64-step unroll that LLVM took 3 to over 15 minutes
    to compile (benchmarks/attention_ops.py); none of the exact models' kernels used it."""
    from tvm.s_tir import dlight

    return [MatmulCPU(), RowReductionCPU(), dlight.cpu.Reduction(), InjectiveCPU()]


def gpu_rules() -> list:
    from tvm.s_tir import dlight

    gpu = dlight.gpu
    return [gpu.Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback()]


def apply_rules(mod, target: Target, rules: list) -> tuple[object, dict[str, str]]:
    """``ApplyDefaultSchedule`` with a record: each PrimFunc not yet scheduled gets the first
    rule that applies (a rule that raises counts as not applying). Returns the module and
    {PrimFunc name: rule name, or "unscheduled"}."""
    applied: dict[str, str] = {}
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            applied[gvar.name_hint] = "tuned"
            continue
        applied[gvar.name_hint] = "unscheduled"
        for rule in rules:
            try:
                with target:
                    sch = rule.apply(func, target, False)
            except Exception as err:  # noqa: BLE001 - a rule that cannot handle it
                log.debug("%s failed on %s: %s", type(rule).__name__, gvar.name_hint, err)
                continue
            if sch is None:
                continue
            if isinstance(sch, list):
                sch = sch[0]
            updates[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            applied[gvar.name_hint] = type(rule).__name__
            break
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod, applied


class RowReductionCPU(CPUScheduleRule):
    """Row-wise reductions (softmax, layer/RMS norm): every block shares the leading row axes;
    reductions run over the last axis. Each reduction is split into ``lanes`` independent
    vector accumulators (rfactor) so it vectorizes instead of waiting on one serial chain;
    elementwise blocks are vectorized; everything is computed per row (fused row loop, parallel).
    """

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func, target)
        except Exception as err:  # noqa: BLE001
            log.debug("RowReductionCPU skipped a PrimFunc: %s", err)
            return None

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or not infos[-1].is_injective():
            return None
        kinds = [info.dom_kind() for info in infos]
        if all("R" not in k for k in kinds):
            return None
        rows = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if rows == 0:
            return None
        for info, kind in zip(infos, kinds):
            if "R" in kind and kind != "S" * rows + "R":
                return None  # only reductions over the last axis, after the row axes
            if any(_extent(it) is None for it in info.iters):
                return None
        lanes = vector_lanes(target)
        row_extents = [_extent(it) for it in infos[-1].iters[:rows]]
        # 0. full-width elementwise steps with one consumer are computed there, not stored
        keep = []
        for info in infos[:-1]:
            if info.is_injective() and len(info.iters) > rows and len(sch.get_consumers(info.block_rv)) == 1:
                try:
                    sch.compute_inline(info.block_rv)
                    continue
                except Exception:  # noqa: BLE001
                    pass
            keep.append(info)
        infos = keep + [infos[-1]]
        # 1. reductions split into ``lanes`` partial accumulators (rfactor wants them alone
        #    under their loops, so before anything moves)
        vector_blocks, rf_blocks = [], []
        for info in infos[:-1]:
            if not info.is_injective():
                rf = self._rfactor(sch, info.block_rv, lanes)
                if rf is not None:
                    rf_blocks.append(rf)
            else:
                vector_blocks.append(info.block_rv)
        # 2. the output block: rows fused and parallel, the rest vectorized
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        row_loop = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        total_rows = 1
        for e in row_extents:
            total_rows *= e
        if total_rows > 1:
            sch.parallel(row_loop)
        self._vectorize_inner(sch, last, lanes)
        # 3. every other block computed per row, innermost loop vectorized
        root = sch.get_sblock("root")
        others = sch.get_child_blocks(root)[:-1]
        for block in reversed(others):
            sch.compute_at(block, row_loop, preserve_unit_loops=True)
        for block in vector_blocks:
            self._vectorize_inner(sch, block, lanes)
        for block in rf_blocks:  # compute_at made the partial-sum lane loop outer: swap
            *_, lane, reduce = sch.get_loops(block)
            sch.reorder(reduce, lane)
            sch.vectorize(lane)
        return sch

    @staticmethod
    def _rfactor(sch, block, lanes):
        loops = sch.get_loops(block)
        inner = loops[-1]
        extent = sch.get(inner).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) % lanes or int(extent) < 2 * lanes:
            return None
        _, vec = sch.split(inner, [None, lanes])
        return sch.rfactor(vec, factor_axis=len(sch.get(block).iter_vars) - 1)

    @staticmethod
    def _vectorize_inner(sch, block, lanes):
        loops = sch.get_loops(block)
        inner = loops[-1]
        extent = sch.get(inner).extent
        if len(loops) <= 1 or not isinstance(extent, tirx.IntImm) or int(extent) % lanes or int(extent) < lanes:
            return
        if int(extent) > lanes:
            _, inner = sch.split(inner, [None, lanes])
        sch.vectorize(inner)
