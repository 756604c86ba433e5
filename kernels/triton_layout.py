"""Launch-side helpers shared by the Triton kernels: query tiles, positions, grid sizing."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.fp8_quantize import quantized_buffers
from kernels.reference import ActivationLayout, QuantizedRows

# Scores are scaled by log2(e) so the kernels' softmax runs on exp2.
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionShape:
    """The sizes every sparse-attention launcher needs, read off its arguments."""

    total_q: int
    num_heads: int
    head_dim: int
    num_groups: int
    group: int  # query heads per KV head
    topk: int
    scale: float

    @classmethod
    def of(cls, q: torch.Tensor, k_cache: torch.Tensor, blocks: torch.Tensor,
           softmax_scale: float | None) -> "AttentionShape":
        total_q, num_heads, head_dim = q.shape
        num_groups = k_cache.shape[2]
        return cls(total_q, num_heads, head_dim, num_groups, num_heads // num_groups,
                   blocks.shape[2], head_dim ** -0.5 if softmax_scale is None else softmax_scale)

    def outputs(self, q: torch.Tensor, gated: "GatedOutput | None" = None,
                quantized: ActivationLayout | None = None,
                ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """(out [T, Hq, D] in the queries' dtype, lse float32 [T, Hq]): the gated buffers, or
        new ones; out as [T, Hq * D] quantized as `quantized` says, for a kernel that writes it
        so."""
        if gated is not None:
            return gated.out, gated.lse
        lse = torch.empty(self.total_q, self.num_heads, dtype=torch.float32, device=q.device)
        if quantized is not None:
            return quantized_buffers(self.total_q, self.num_heads * self.head_dim, q.dtype,
                                     q.device, quantized), lse
        return torch.empty(self.total_q, self.num_heads, self.head_dim, dtype=q.dtype,
                           device=q.device), lse


@dataclass(frozen=True)
class GatedOutput:
    """Output buffers shared by two attention kernels launched back to back, and the device flag
    that lets exactly one of them write: every program of a gated kernel reads the flag first
    and returns unless it equals `runs_when`. A dispatcher that must look at the selection to
    choose a kernel then needs no host sync; the kernel that stands aside still launches its
    grid, paid in CTA launches (H100, a KV-major fallback over a 32K-row chunk: ~0.15 ms with
    one row per program in its sort and merge, ~0.09 ms with 8 and 4, which cost nothing when
    it runs). Its partials kernel keeps one work item per program: two, unrolled, saved another
    ~16 us standing aside but cost 4% running (16K rows after 68K 1.88 -> 1.97 ms; 10% as a
    loop, 2x with four unrolled, its shared memory multiplied). Capping
    the gated KV-major partials and merge grids at a few waves that walk their items was
    measured too: standing aside got cheaper (coherent 32K / 128K prompts dispatched 1.48 ->
    1.41, 6.04 -> 5.75 ms) but running got dearer (unrelated selections, 16K rows after 68K
    1.92 -> 2.27 ms, a 128K prompt 15.0 -> 17.6 ms), so grids stay one program per item.
    Reading the flag on the host instead (a sync, then one kernel) was measured as well: the
    Python launch after the sync leaves the GPU idle ~0.1 ms, so a coherent 32K prompt gains
    only 1.47 -> 1.43 ms and unrelated selections lose (16K rows after 68K 1.92 -> 2.38 ms)."""

    out: torch.Tensor  # [T, Hq, D]
    lse: torch.Tensor  # float32 [T, Hq]
    flag: torch.Tensor  # int32 [1]
    runs_when: int  # 0 or 1

    @staticmethod
    def launch_args(gated: "GatedOutput | None", placeholder: torch.Tensor) -> tuple:
        """(flag pointer, GATE constexpr) for a kernel: GATE -1 is ungated."""
        return (placeholder, -1) if gated is None else (gated.flag, gated.runs_when)


@triton.jit
def stands_aside(gate_flag, GATE: tl.constexpr):
    """Whether this program of a gated kernel must return at once (`GatedOutput`); GATE -1:
    ungated, never."""
    if GATE < 0:
        return False
    return tl.load(gate_flag) != GATE


def page_rows(cache: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor over a paged K or V cache [pages, 128, heads, dim] seen as rows of
    tokens [pages * 128, heads * dim]; `.load([physical_page * 128, head * dim])` in a kernel
    copies one page of one head ([128, dim]) to shared memory, the addresses computed by the
    copy engine (H100: 1.06x for the query-tiled kernel, 1.01-1.03x for KV-major and
    query-major). The engine's caches are contiguous; any other is copied first (the view
    needs its layout)."""
    pages, page, heads, dim = cache.shape
    rows = cache.contiguous().view(pages * page, heads * dim)
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [page, dim])


@dataclass
class QueryTiles:
    """Tiles of consecutive query rows that never cross a sequence boundary.

    Built on the device by one small kernel, without a host sync (so a decode step can be
    captured in a CUDA graph): the grid is an upper bound on the tile count, and spare tiles are
    empty (start == end).
    """

    seq: torch.Tensor  # int32 [num_tiles]: the tile's sequence
    start: torch.Tensor  # int32 [num_tiles]: first packed query row
    end: torch.Tensor  # int32 [num_tiles]: one past the last row

    @property
    def num_tiles(self) -> int:
        return self.seq.shape[0]

    @staticmethod
    def rows_for(total_q: int, batch: int, max_rows: int) -> int:
        """Query rows per tile for a step of total_q rows over `batch` sequences."""
        # Shapes are all the host knows: uniform decode (q_len 1..16 everywhere) gets tiles of
        # its q_len; anything longer gets full tiles.
        return min(max_rows, triton.next_power_of_2(triton.cdiv(max(total_q, 1), max(batch, 1))))

    @classmethod
    def build(cls, cu_seqlens_q: torch.Tensor, total_q: int, rows: int) -> "QueryTiles":
        batch = cu_seqlens_q.shape[0] - 1
        if total_q == 0 or batch == 0:
            empty = torch.zeros(0, dtype=torch.int32, device=cu_seqlens_q.device)
            return cls(empty, empty, empty)
        upper = triton.cdiv(total_q, rows) + batch
        tiles = cls(*(torch.empty(upper, dtype=torch.int32, device=cu_seqlens_q.device)
                      for _ in range(3)))
        _query_tiles_kernel[(upper,)](
            tile_offsets(cu_seqlens_q, rows), cu_seqlens_q, tiles.seq, tiles.start, tiles.end,
            batch, ROWS=rows, SEARCH_STEPS=search_steps(batch))
        return tiles


def tile_offsets(cu_seqlens_q: torch.Tensor, rows: int) -> torch.Tensor:
    """The first tile of every sequence, then the tile count: int32 [batch + 1] (one launch
    instead of a handful of torch ones: it runs on every step, in CUDA graphs too)."""
    batch = cu_seqlens_q.shape[0] - 1
    offsets = torch.empty(batch + 1, dtype=torch.int32, device=cu_seqlens_q.device)
    _tile_offsets_kernel[(1,)](cu_seqlens_q, offsets, batch, ROWS=rows,
                               BLOCK=max(16, triton.next_power_of_2(batch)))
    return offsets


@triton.jit
def _tile_offsets_kernel(cu_seqlens_q, offsets, num_seqs, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
    seq = tl.arange(0, BLOCK)
    real = seq < num_seqs
    q_len = tl.load(cu_seqlens_q + seq + 1, mask=real, other=0) \
        - tl.load(cu_seqlens_q + seq, mask=real, other=0)
    tl.store(offsets + seq + 1, tl.cumsum((q_len + ROWS - 1) // ROWS, axis=0), mask=real)
    tl.store(offsets + seq, 0, mask=seq == 0)


@triton.jit
def segment_of(cumulative, index, num_segments, SEARCH_STEPS: tl.constexpr):
    """The last segment b with cumulative[b] <= index: the one that owns `index` (the sequence
    of a packed row given cu_seqlens_q, the sequence of a tile given its tile offsets, ...).

    A binary search inside the kernel replaces a per-item metadata tensor (and the handful of
    small launches that would build it on every step). One item per segment (decode rows) is
    answered by one pair of independent loads: the search's chain of dependent ones is a few
    microseconds at the start of every program."""
    lo = tl.minimum(index, num_segments - 1)
    hit = (tl.load(cumulative + lo) <= index) & (index < tl.load(cumulative + lo + 1))
    if not hit:
        lo = _search_segments(cumulative, index, num_segments, SEARCH_STEPS)
    return lo


@triton.jit
def segments_of(cumulative, indices, num_segments, SEARCH_STEPS: tl.constexpr):
    """`segment_of` for a vector of indices: one pair of loads when each owns its own segment
    (a decode step's rows), the search only if one does not."""
    lo = tl.minimum(indices, num_segments - 1)
    hit = (tl.load(cumulative + lo) <= indices) & (indices < tl.load(cumulative + lo + 1))
    if tl.sum((~hit).to(tl.int32), axis=0) > 0:
        lo = tl.where(hit, lo, _search_segments(cumulative, indices, num_segments,
                                                SEARCH_STEPS))
    return lo


@triton.jit
def _search_segments(cumulative, index, num_segments, SEARCH_STEPS: tl.constexpr):
    lo = index * 0  # same type (and shape) as index
    hi = lo + num_segments
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(cumulative + mid) <= index
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def rows_of_tile(first_tile, cu_seqlens_q, tile, num_seqs, ROWS: tl.constexpr,
                 SEARCH_STEPS: tl.constexpr):
    """(sequence, first row, one past the last row) of a query tile; a spare tile past the
    last one (grids are upper bounds) is empty: rows (0, 0)."""
    seq = segment_of(first_tile, tile, num_seqs, SEARCH_STEPS)
    seq_end = tl.load(cu_seqlens_q + seq + 1)
    begin = tl.load(cu_seqlens_q + seq) + (tile - tl.load(first_tile + seq)) * ROWS
    spare = begin >= seq_end
    end = tl.minimum(begin + ROWS, seq_end)
    return seq, tl.where(spare, 0, begin), tl.where(spare, 0, end)


@triton.jit
def _query_tiles_kernel(first_tile, cu_seqlens_q, tile_seq, tile_start, tile_end, num_seqs,
                        ROWS: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    tile = tl.program_id(0)
    seq, begin, end = rows_of_tile(first_tile, cu_seqlens_q, tile, num_seqs, ROWS,
                                   SEARCH_STEPS)
    tl.store(tile_seq + tile, seq)
    tl.store(tile_start + tile, begin)
    tl.store(tile_end + tile, end)


@triton.jit
def online_softmax_step(s, v, acc, running_max, running_sum, attends, PRECISION: tl.constexpr):
    """Folds one page of log2-scaled scores s [M, PAGE] (-inf where masked) and its values
    v [PAGE, D] into the running (acc, max, sum) of rows that attend page by page.

    attends [M] (or True): rows that take this page at all. The others are skipped through
    their reference point (+inf: every weight exp2(s - inf) is 0, their state unscaled), which
    costs M selects where masking s would cost M x PAGE (~9% of the query-tiled kernel)."""
    new_max = tl.where(attends, tl.maximum(running_max, tl.max(s, axis=1)), running_max)
    # A row that has seen nothing yet keeps a finite reference point (no inf - inf).
    ref = tl.where(attends, tl.where(new_max == float("-inf"), 0.0, new_max), float("inf"))
    p = tl.exp2(s - ref[:, None])
    alpha = tl.where(attends, tl.exp2(running_max - ref), 1.0)
    running_sum = running_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, new_max, running_sum


@triton.jit
def finish_softmax(acc, max_log2, total):
    """(acc / total, natural-log LSE) of rows whose scores were log2(e)-scaled; a row that saw
    no key (total 0) gives 0 and -inf. Shared by both sparse-attention kernels."""
    seen = total > 0
    safe_total = tl.where(seen, total, 1.0)
    lse = tl.where(seen, max_log2 * 0.6931471805599453 + tl.log(safe_total), float("-inf"))
    return acc / safe_total[:, None], lse


def search_steps(num_seqs: int) -> int:
    """Iterations of `segment_of`'s binary search. A constant for any batch below 256
    sequences, so batch sizes changing step to step never trigger a recompilation."""
    return max(8, num_seqs.bit_length())


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The device's SM count (2 under the CPU interpreter, so tests still split work)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep full precision (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


# Programmatic dependent launch (Hopper+): a kernel that follows another in a chain (a decode
# step's index scan -> selection rule -> attention -> merge; an FP8 GEMM -> the sum of its K
# splits) is launched so that its launch and prologue overlap the tail of the one before; it
# waits for its predecessor's memory before its first load and store (any input may be the
# predecessor's output, and its outputs may reuse memory the predecessor reads). The ways of
# overlapping the chain further that were measured and not kept: bench/results/kernels_h100.md.
def dependent_launch(device: torch.device) -> bool:
    return sm_major(device) >= 9


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next_kernel(USE_PDL: tl.constexpr):
    """Lets the next dependent kernel launch: called once a program's heavy work is done."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def weight_block_scales(scale_base, cols, k0, n, stride_sn, stride_sk, SCALE_N: tl.constexpr,
                        SCALE_K: tl.constexpr, E8M0: tl.constexpr):
    """The fp32 scale of each column of an e4m3 weight's K tile starting at k0. The caller's K
    tile lies inside one scale block (BLOCK_K divides SCALE_K, k0 is a multiple of BLOCK_K),
    so a column has one scale for the whole tile."""
    scale = tl.load(scale_base + (k0 // SCALE_K) * stride_sk + (cols // SCALE_N) * stride_sn,
                    mask=cols < n, other=0.0)
    return _scale_values(scale, E8M0)


@triton.jit
def _scale_values(stored, E8M0: tl.constexpr):
    """Stored weight scales as fp32: e8m0 bytes are the exponents of powers of two."""
    scale = stored.to(tl.float32)
    if E8M0:
        scale = tl.exp2(scale - 127.0)
    return scale


@triton.jit
def dequantized_weight_rows(w, scale_base, k0, cols, n, k, stride_sn, stride_sk,
                            SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, E8M0: tl.constexpr,
                            BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """An e4m3 weight tile w [N, BLOCK_K] (the weight's rows `cols`, K from k0) times its scales,
    in `dtype`. The tile lies inside one scale block along K, or spans whole scale groups
    (SCALE_K divides BLOCK_K)."""
    if SCALE_K >= BLOCK_K:
        scale = weight_block_scales(scale_base, cols, k0, n, stride_sn, stride_sk, SCALE_N,
                                    SCALE_K, E8M0)
        return (w.to(tl.float32) * scale[:, None]).to(dtype)
    GROUPS: tl.constexpr = BLOCK_K // SCALE_K
    groups = k0 // SCALE_K + tl.arange(0, GROUPS)
    offsets = (cols // SCALE_N)[:, None] * stride_sn + groups[None, :] * stride_sk
    scale = tl.load(scale_base + offsets, other=0.0,
                    mask=(cols[:, None] < n) & (groups[None, :] < tl.cdiv(k, SCALE_K)))
    scale = _scale_values(scale, E8M0)
    grouped = tl.reshape(w.to(tl.float32), (w.shape[0], GROUPS, SCALE_K)) * scale[:, :, None]
    return tl.reshape(grouped, (w.shape[0], BLOCK_K)).to(dtype)


@triton.jit
def weight_only_product(x_rows, x_real, x_row0, w_rows, stride_wk, scale_base, cols, n, k,
                        k_begin, k_end, stride_sn, stride_sk, SCALE_N: tl.constexpr,
                        SCALE_K: tl.constexpr, E8M0: tl.constexpr, PRECISION: tl.constexpr,
                        X_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Weight-only FP8 products over K in [k_begin, k_end), operands swapped: the fp32 tile
    [BLOCK_N, BLOCK_M] of y^T = W x^T for the e4m3 weight rows `cols` (`w_rows`: their starts,
    K elements `stride_wk` apart) and BLOCK_M rows of x: with X_DESC, `x_rows` is x's tensor
    descriptor and x_row0 the first row (zero past x's end); else `x_rows` holds the rows'
    starts (contiguous along K) and `x_real` masks the rows that exist. Each weight tile is
    scaled into x's dtype in registers, where it is the tensor cores' register operand, so the
    K tiles' products chain in one accumulator (`kernels/fp8_weight_only_gemm.py` says why).
    The weight always loads through pointers: Triton 3.6's pipelined loop summed garbage now
    and then when a descriptor-loaded tile was scaled in registers (fp8_picks_h200.md); x's
    tile goes to the tensor cores as loaded. PRECISION: `tl.dot`'s input precision (None:
    Triton's default)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        wt = tl.load(w_rows + ks[None, :] * stride_wk,
                     mask=(cols[:, None] < n) & (ks[None, :] < k), other=0.0)
        if X_DESC:
            xt = x_rows.load([x_row0, k0])
        else:
            xt = tl.load(x_rows + ks[None, :], mask=x_real[:, None] & (ks[None, :] < k),
                         other=0.0)
        wt = dequantized_weight_rows(wt, scale_base, k0, cols, n, k, stride_sn, stride_sk,
                                     SCALE_N, SCALE_K, E8M0, BLOCK_K, xt.dtype)
        acc = tl.dot(wt, xt.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def split_k_range(k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_begin, k_end): this program's share of K (program_id(2) of SPLIT_K), whole K tiles;
    the last share may be short or empty."""
    tiles_per_split = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(2) * tiles_per_split * BLOCK_K
    return k_begin, tl.minimum(k, k_begin + tiles_per_split * BLOCK_K)


@triton.jit
def store_split_k(acc, out, partials, arrivals, offsets, mask, tile, split_stride,
                  SPLIT_K: tl.constexpr, SUM_IN_GEMM: tl.constexpr, USE_PDL: tl.constexpr):
    """Stores an FP8 GEMM program's tile `acc` at out + offsets. With K split over SPLIT_K
    programs (program_id(2)), each writes its fp32 partial sums to partials + split x
    split_stride + offsets instead. SUM_IN_GEMM: the split that arrives last (an atomic count
    per output tile) adds them in split order, so the result does not depend on which finished
    first, and resets the count for the next launch (CUDA-graph replays included); else
    `split_k_sum.sum_splits` adds them, and may launch now (`split_k_sum.sums_in_gemm` says
    which)."""
    if SPLIT_K == 1:
        tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=mask)
    elif SUM_IN_GEMM:
        tl.store(partials + tl.program_id(2) * split_stride + offsets, acc, mask=mask)
        # Every thread's partial is stored before the count moves (acq_rel at GPU scope).
        tl.debug_barrier()
        if tl.atomic_add(arrivals + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in range(SPLIT_K):
                # .cg reads from L2, where the other programs' stores landed.
                total += tl.load(partials + split * split_stride + offsets, mask=mask,
                                 cache_modifier=".cg")
            tl.store(out + offsets, total.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(arrivals + tile, 0)
    else:
        release_next_kernel(USE_PDL)
        tl.store(partials + tl.program_id(2) * split_stride + offsets, acc, mask=mask)


# Output tiles one launch may split over K: the size of each device's arrival counts.
MAX_SPLIT_TILES = 1 << 16


@functools.lru_cache(maxsize=None)
def split_arrival_counts(device: torch.device) -> torch.Tensor:
    """Each output tile's count of finished K splits (`store_split_k`): zero between launches
    (the last split resets it), so one buffer serves every split FP8 GEMM on the device, graph
    replays included; the GEMMs run on one stream, one after another."""
    return torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)


def gemm_operands(x: torch.Tensor, weight: torch.Tensor, x_rows: int, weight_rows: int,
                  block_k: int) -> tuple[object, object, bool]:
    """x and the weight as a GEMM kernel loads them: tensor descriptors of [x_rows, block_k] and
    [weight_rows, block_k] tiles where `tma_loads` allows, else the tensors themselves (pointer
    loads); and whether they are descriptors."""
    if not tma_loads(x, weight):
        return x, weight, False
    return (TensorDescriptor.from_tensor(x, [x_rows, block_k]),
            TensorDescriptor.from_tensor(weight, [weight_rows, block_k]), True)


def tma_loads(*tensors: torch.Tensor) -> bool:
    """Whether a kernel may load these row-major matrices through tensor descriptors (the copy
    engine of Hopper and later, emulated by Triton's interpreter), which
    bench/results/fp8_picks_<gpu>.md measured faster than pointer loads in decode GEMMs. The
    engine needs 16-byte aligned starts and rows."""
    device = tensors[0].device
    aligned = all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                  and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)
    return aligned and (device.type == "cpu" or sm_major(device) >= 9)


@functools.lru_cache(maxsize=None)
def sm_major(device: torch.device) -> int:
    """The device's compute capability major (9: Hopper), 0 off CUDA; asked once per device,
    not at every GEMM launch."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


@triton.jit
def scaled_e4m3_dot(a, b, a_scale, b_scale, BLOCK_K: tl.constexpr):
    """a [M, K] @ b [K, N] for e4m3 tiles, scaled by the rows' and the columns' scales: one K
    tile's contribution, in fp32."""
    if BLOCK_K < 32:  # e4m3 tensor-core products need K >= 32; the values are exact in tf32
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])


def fp8_depth(depth: int, scale_block_k: int) -> int:
    """The deepest K tile up to `depth` that stays inside one scale block."""
    return min(depth, scale_block_k & -scale_block_k)  # largest power of two dividing it


def weight_only_depth(depth: int, scale_block_k: int) -> int:
    """A weight-only GEMM's K tile up to `depth` (a power of two): its scales are applied in
    registers, so it may span several scale groups along K (MXFP8's 32) as long as they tile
    it evenly."""
    if scale_block_k & (scale_block_k - 1) == 0 and scale_block_k < depth:
        return depth
    return fp8_depth(depth, scale_block_k)
