"""GPU kernels (CUDA only): Triton kernels for one-token decoding, the mamba-ssm and causal-conv1d
calls, the training pass's conv + SiLU (causal_conv_silu), RMSNorms (rms_norm_fwd / rms_norm_bwd,
the residual add or the gate fused in), feed-forward GELU + dropout (gelu_dropout) and Mamba-2's step
sizes softplus(dt + dt_bias) (dt_softplus) in Triton, and at the end, mamba2_train, the Mamba-2 layer's
training pass from mamba-ssm's kernels (or ssd_grouped's SSD with that conv, gated norm and step sizes).

Functions of tensors only: this file knows nothing of ssmttm's classes. fast.py attaches these
kernels to the model; ssmttm.py is the plain reference that each of them is tested against.

A decoding step multiplies 2 rows (one prompt and its guidance row) by each weight matrix: a
matrix-vector product, bound by reading the weights, not by arithmetic. Run as separate kernels,
each block of the model is a dozen launches that mostly wait on each other (norm, matmul, bias,
activation, residual add, conv, state update ...). Two kernels do a SiMBA block in five launches:

    norm + in_proj + conv  ->  ssm_step + gate  ->  norm + out_proj + residual
                                ->  norm + fc1 + GELU  ->  fc2 + residual

(six with ssm_chunk_step, whose first kernel computes what all heads of a row share).

`linear_rows`: out = residual + act(norm(x) @ W^T + bias), x (M, K), W (N, K), out (M, N).
    norm is nothing or RMSNorm (x * rsqrt(mean(x^2) + eps) * w). Optionally a range of the
    outputs goes through Mamba-2's causal depthwise conv + SiLU: the conv is per channel, so the
    program that computes a channel owns its conv state and updates it alone. Up to 4 rows the
    products run on CUDA cores, at 5-8 rows on tensor cores (each still one kernel), and past 8
    rows (many prompts at once) as cuBLAS's product between a norm kernel and an epilogue kernel;
    there the kernel that adds a sublayer's residual also makes the next sublayer's norm
    (norm_out), which then needs no norm kernel of its own.
`ssm_step`: one step of the SSD recurrence (ssd_reference.ssd_step) with softplus(dt + dt_bias),
    and the gate of Mamba-2's gated RMSNorm, y * silu(z). It reads and writes the state every step,
    which past a few rows is most of a frame's bytes.
`ssm_chunk_step`: the same output from the state at the start of a chunk of K steps and the
    chunk's steps so far (PendingSteps), in the SSD's chunked form: the state is read every step but
    written once per chunk, as the recurrence's state at the chunk's last step (fold_pending, or
    fold_chunk's every_row on the GPU, adds what is pending at any other step).

Around the blocks, a frame has two more: `embed_rows` (the K code embeddings plus the sinusoidal
positions, then position += 1) and `sample_top_k` (guidance, temperature, top-k and the draw of
sample_next, then generate's bookkeeping: the token into the delayed layout and into the next
step's input), so that the small bookkeeping ops do not each cost a launch.

Everything is computed in float32 and rounded once, where the plain ops round too (except the
gated y, passed on unrounded).

Programmatic dependent launch (Hopper and later): each kernel lets the next one start at once, and
the next one loads what no earlier kernel of the step writes (its weights; the SSM and conv states,
last written by the same layer a step before) before it waits for the previous kernel's results
(`gdc_wait`). The weights of one matrix then stream in while the previous kernel runs, which hides
part of the fixed cost of a short kernel (BENCHMARKS.md). Inside a CUDA graph the dependency is
kept as a programmatic edge. embed_rows and sample_top_k are plain launches: they wait for
everything before them, which is what lets the states be read early.
"""
import functools
import inspect
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import ssd_grouped
from ssd_grouped import as_is, cdiv, next_power_of_2
from ssmttm import check_integer

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.runtime.errors import OutOfResources
except ImportError:  # a CPU-only torch has no triton
    triton = None
# mamba-ssm and causal-conv1d cannot even be imported without CUDA: every use is behind these flags.
try:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401 (fast.py's)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    HAS_MAMBA_SSM = True
except Exception:  # ImportError, or a CUDA extension that fails to load
    HAS_MAMBA_SSM = False
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401 (fast.py's)
    HAS_CAUSAL_CONV1D = True
except Exception:
    HAS_CAUSAL_CONV1D = False
if HAS_MAMBA_SSM:  # under torch.compile these are graph breaks; mamba2_train below is an op it traces
    mamba_chunk_scan_combined = torch.compiler.disable(mamba_chunk_scan_combined)
    mamba_split_conv1d_scan_combined = torch.compiler.disable(mamba_split_conv1d_scan_combined)

# linear_rows: up to CORE_ROWS rows in one kernel (each program holds a slice of W and all rows of x),
# up to MAX_ROWS rows as cuBLAS's product with a kernel before and after it; width <= MAX_WIDTH
CORE_ROWS, MAX_ROWS, MAX_WIDTH = 8, 128, 4096
TC_ROWS = 4  # 16-bit weights, TC_ROWS < rows <= CORE_ROWS: the tensor-core kernel (_default_path)
# split_k (with counters): SPLIT_MIN_ROWS to SPLIT_MAX_ROWS rows, products of up to SPLIT_OUTPUTS outputs
# (_default_path); a program takes a slice of at most SPLIT_WIDTH of K (wider: more shared memory than a GPU has)
SPLIT_MIN_ROWS, SPLIT_MAX_ROWS, SPLIT_OUTPUTS, SPLIT_WIDTH = 4, 32, 2048, 512
NORM_PDL_ROWS = 64  # past this many rows the norm before a product launches early (PDL); at fewer it costs time
LINEAR_PATHS = ("cuda_cores", "tensor_cores", "many_rows", "split_k")


def fits_linear_rows(rows, width):
    """Whether linear_rows takes `rows` rows with inputs up to `width` wide (and Triton is here)."""
    return triton is not None and rows <= MAX_ROWS and width <= MAX_WIDTH


@functools.cache
def _has_pdl(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_options(t, pdl):
    """Keyword arguments for a launch on t's device: programmatic dependent launch if pdl and the
    GPU has it (sm_90 and later; asked once per device: eager decoding launches often)."""
    return dict(PDL=True, launch_pdl=True) if pdl and _has_pdl(t.device) else dict(PDL=False)


if triton is not None:

    @triton.jit
    def _conv_columns(cols, col_ok, conv_w_ptr, conv_b_ptr, conv_start, conv_dim, D_CONV: tl.constexpr):
        # linear_rows' outputs that go through the conv: their channel c (0 elsewhere), which of them
        # do, the taps, and the conv's weight (BLOCK_N, D_CONV) and bias (BLOCK_N,) in fp32
        c = cols - conv_start
        in_conv = col_ok & (c >= 0) & (c < conv_dim)
        c = tl.where(in_conv, c, 0)
        taps = tl.arange(0, D_CONV)
        conv_ok = in_conv[:, None] & (taps[None, :] < D_CONV)
        w_conv = tl.load(conv_w_ptr + c[:, None] * D_CONV + taps[None, :], mask=conv_ok, other=0.0).to(tl.float32)
        b_conv = tl.load(conv_b_ptr + c, mask=in_conv, other=0.0).to(tl.float32)
        return c, in_conv, taps, conv_ok, w_conv, b_conv

    @triton.jit
    def _conv_rows(acc, rows, row_ok, c, in_conv, taps, conv_ok, w_conv, b_conv, conv_state_ptr, conv_dim, out_ptr,
                   D_CONV: tl.constexpr):
        # A tile of projections acc (rows, outputs) in fp32 -> the same with Mamba-2's causal conv +
        # SiLU on the conv's columns (from _conv_columns), whose states (M, conv_dim, D_CONV) move on
        # by one: the window is the last D_CONV - 1 inputs, then x_t. The caller owns these channels.
        states, state_ok, shifted = _conv_states(rows, row_ok, c, taps, conv_ok, conv_state_ptr, conv_dim, D_CONV)
        return _conv_step(acc, states, state_ok, shifted, taps, in_conv, w_conv, b_conv, conv_state_ptr, out_ptr,
                          D_CONV)

    @triton.jit
    def _conv_states(rows, row_ok, c, taps, conv_ok, conv_state_ptr, conv_dim, D_CONV: tl.constexpr):
        # _conv_rows' first half, which a kernel may run before its wait (the same layer's kernel wrote the
        # states a step ago): the states of `rows` for channels c, their pointers, mask, and values
        # shifted by one step in fp32 (the newest tap 0, for x_t)
        last = (taps[None, :] == D_CONV - 1)[None, :, :]
        states = conv_state_ptr + rows[:, None, None] * (conv_dim * D_CONV) + c[None, :, None] * D_CONV \
            + taps[None, None, :]
        state_ok = row_ok[:, None, None] & conv_ok[None, :, :]
        shifted = tl.load(states + 1, mask=state_ok & ~last, other=0.0).to(tl.float32)
        return states, state_ok, shifted

    @triton.jit
    def _conv_step(acc, states, state_ok, shifted, taps, in_conv, w_conv, b_conv, conv_state_ptr, out_ptr,
                   D_CONV: tl.constexpr):
        # _conv_rows' second half, on the states _conv_states loaded
        last = (taps[None, :] == D_CONV - 1)[None, :, :]
        x_t = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the conv sees the rounded projection
        window = tl.where(last, x_t[:, :, None], shifted)
        conv = tl.sum(window * w_conv[None, :, :], axis=2) + b_conv[None, :]
        tl.debug_barrier()  # every thread has read the old states before any is overwritten
        tl.store(states, window.to(conv_state_ptr.dtype.element_ty), mask=state_ok)
        return tl.where(in_conv[None, :], conv * tl.sigmoid(conv), acc)

    @triton.jit
    def _linear_rows_kernel(x_ptr, norm_w_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, N, K, eps, stride_x, stride_res,
                            conv_state_ptr, conv_w_ptr, conv_b_ptr, conv_start, conv_dim,
                            M: tl.constexpr, M_POW2: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            GELU: tl.constexpr, HAS_RES: tl.constexpr, D_CONV: tl.constexpr, PDL: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program: BLOCK_N outputs for all M rows, so each weight is read once. It loads its
        # whole slice of W (BLOCK_N x K) at once, with no loop over K: the kernel is a few
        # microseconds long, and a loop would wait on memory once per iteration. The rows are a
        # static loop, so every product is a 2-D tile reduced within a warp.
        if PDL:
            gdc_launch_dependents()
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        col_ok, k_ok = cols < N, ks < K
        # First what no earlier kernel writes: the weights (and the norm's, folded into W), bias, conv.
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        if NORM:  # norm(x) @ W^T = (x * rstd) @ (W * norm_w)^T: rstd is one number per row
            w = w * tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if D_CONV > 0:  # outputs conv_start ... conv_start + conv_dim - 1 go through the causal conv
            c, in_conv, taps, conv_ok, w_conv, b_conv = _conv_columns(cols, col_ok, conv_w_ptr, conv_b_ptr, conv_start,
                                                                      conv_dim, D_CONV)
            last = taps[None, :] == D_CONV - 1
            # The conv states of all rows too, shifted by one step (the newest tap is filled below):
            # the same layer's kernel wrote them a step ago, and has finished (see ssm_step).
            ms = tl.arange(0, M_POW2)
            states = (conv_state_ptr + ms[:, None, None] * (conv_dim * D_CONV) + c[None, :, None] * D_CONV
                      + taps[None, None, :])
            shifted = tl.load(states + 1, mask=(ms < M)[:, None, None] & (conv_ok & ~last)[None, :, :], other=0.0)
            shifted = shifted.to(tl.float32)
        if PDL:  # everything below may read what the previous kernel writes
            gdc_wait()
        # The rows' results are gathered in registers and stored after the loop: a store inside it
        # could alias the next row's x, so the compiler would have to wait for each row's loads in
        # turn; with the stores last, the loads of all rows may be in flight at once.
        ms = tl.arange(0, M_POW2)
        out = tl.zeros((M_POW2, BLOCK_N), dtype=tl.float32)
        if D_CONV > 0:
            new_states = tl.zeros((M_POW2, BLOCK_N, D_CONV), dtype=tl.float32)
        for m in tl.static_range(M):
            v = tl.load(x_ptr + m * stride_x + ks, mask=k_ok, other=0.0).to(tl.float32)
            acc = tl.sum(w * v[None, :], axis=1)  # (BLOCK_N,)
            if NORM:  # every program computes the row's mean square itself: x is tiny and in L2
                acc = acc * (1.0 / tl.sqrt(tl.sum(v * v, axis=0) / K + eps))
            if HAS_BIAS:
                acc += bias
            if GELU:  # exact (erf) GELU, as F.gelu
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            if HAS_RES:
                acc += tl.load(res_ptr + m * stride_res + cols, mask=col_ok, other=0.0).to(tl.float32)
            if D_CONV > 0:  # Mamba-2's causal depthwise conv + SiLU; this program owns these channels
                x_t = acc.to(out_ptr.dtype.element_ty)  # the conv sees the rounded projection, as unfused
                # this step's window: row m of the shifted states, then x_t
                window = tl.sum(tl.where(ms[:, None, None] == m, shifted, 0.0), axis=0)
                window = tl.where(last, x_t[:, None].to(tl.float32), window)
                conv = tl.sum(window * w_conv, axis=1) + b_conv
                new_states = tl.where(ms[:, None, None] == m, window[None, :, :], new_states)
                acc = tl.where(in_conv, conv * tl.sigmoid(conv), acc)
            out = tl.where(ms[:, None] == m, acc[None, :], out)
        row_ok = ms < M
        if D_CONV > 0:
            tl.debug_barrier()  # every thread has used the old states before any is overwritten
            tl.store(states, new_states.to(conv_state_ptr.dtype.element_ty),  # where `shifted` came from
                     mask=row_ok[:, None, None] & conv_ok[None, :, :])
        tl.store(out_ptr + ms[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _linear_rows_tc_kernel(x_ptr, norm_w_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, N, K, eps, stride_x, stride_res,
                               conv_state_ptr, conv_w_ptr, conv_b_ptr, conv_start, conv_dim,
                               M: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                               HAS_RES: tl.constexpr, D_CONV: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
                               K_HALVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        # One program: BLOCK_N outputs for all M rows on tensor cores. Its slice of W (BLOCK_N x K,
        # in K_HALVES loads of BLOCK_K) is loaded once, before the wait, and stays on chip (Triton
        # puts it in shared memory for tl.dot) while the rows go through in tiles of BLOCK_M: each
        # weight is read once whatever the rows.
        if PDL:
            gdc_launch_dependents()
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        col_ok = cols < N
        w0 = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
        if NORM:
            nw0 = tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        if K_HALVES == 2:
            w1 = tl.load(w_ptr + cols[:, None] * K + BLOCK_K + ks[None, :],
                         mask=col_ok[:, None] & (BLOCK_K + ks < K)[None, :], other=0.0)
            if NORM:
                nw1 = tl.load(norm_w_ptr + BLOCK_K + ks, mask=BLOCK_K + ks < K, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if D_CONV > 0:  # outputs conv_start ... conv_start + conv_dim - 1 go through the causal conv
            c, in_conv, taps, conv_ok, w_conv, b_conv = _conv_columns(cols, col_ok, conv_w_ptr, conv_b_ptr, conv_start,
                                                                      conv_dim, D_CONV)
        ONE_TILE: tl.constexpr = M <= BLOCK_M
        if D_CONV > 0 and ONE_TILE:  # the rows' conv states too, before the wait (as _linear_rows_kernel)
            first_rows = tl.arange(0, BLOCK_M)
            states, state_ok, shifted = _conv_states(first_rows, first_rows < M, c, taps, conv_ok, conv_state_ptr,
                                                     conv_dim, D_CONV)
        if PDL:  # everything below may read what the previous kernel writes
            gdc_wait()
        for m0 in tl.range(0, M, BLOCK_M, num_stages=1):  # not pipelined: each stage of x would take shared memory
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            x0 = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                         other=0.0).to(tl.float32)
            if K_HALVES == 2:
                x1 = tl.load(x_ptr + rows[:, None] * stride_x + BLOCK_K + ks[None, :],
                             mask=row_ok[:, None] & (BLOCK_K + ks < K)[None, :], other=0.0).to(tl.float32)
            if NORM:  # RMSNorm, rounded to W's dtype as the plain ops round it
                sq = tl.sum(x0 * x0, axis=1)
                if K_HALVES == 2:
                    sq += tl.sum(x1 * x1, axis=1)
                rstd = 1.0 / tl.sqrt(sq / K + eps)
                x0 = x0 * rstd[:, None] * nw0[None, :]
                if K_HALVES == 2:
                    x1 = x1 * rstd[:, None] * nw1[None, :]
            acc = tl.dot(x0.to(w0.dtype), tl.trans(w0), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), fp32
            if K_HALVES == 2:
                acc = tl.dot(x1.to(w1.dtype), tl.trans(w1), acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc += bias[None, :]
            if GELU:  # exact (erf) GELU, as F.gelu
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            if HAS_RES:
                acc += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :],
                               mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            if D_CONV > 0 and ONE_TILE:  # Mamba-2's causal depthwise conv + SiLU; this program owns these channels
                acc = _conv_step(acc, states, state_ok, shifted, taps, in_conv, w_conv, b_conv, conv_state_ptr,
                                 out_ptr, D_CONV)
            elif D_CONV > 0:
                acc = _conv_rows(acc, rows, row_ok, c, in_conv, taps, conv_ok, w_conv, b_conv, conv_state_ptr,
                                 conv_dim, out_ptr, D_CONV)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _linear_rows_split_kernel(x_ptr, norm_w_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, sq_ptr, count_ptr,
                                  N, K, eps, stride_x, stride_res, conv_state_ptr, conv_w_ptr, conv_b_ptr, conv_start,
                                  conv_dim, M: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  GELU: tl.constexpr, HAS_RES: tl.constexpr, D_CONV: tl.constexpr, PDL: tl.constexpr,
                                  PRECISION: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: BLOCK_N outputs over one slice of K (split s of SPLIT, BLOCK_K wide) for all M
        # rows, so that SPLIT times more programs, each with a shorter slice of W, read the weights. Its
        # partial products (fp32) go to part_ptr; the tile's last program to finish (an atomic count)
        # adds the SPLIT of them in split order, which keeps the sum the same whatever order the
        # programs finish in, and does the epilogue. The norm: x * norm_w is rounded to W's dtype before
        # the product and the row's rstd multiplies the sum (the sums of squares come with the parts).
        # Which program is last is known only at the end, so every program loads what the epilogue
        # reads besides the parts (bias and conv weights before the wait, the residual's tile after it):
        # the last one then waits only for the parts.
        if PDL:
            gdc_launch_dependents()
        tile, s = tl.program_id(0), tl.program_id(1)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = s * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok, k_ok = cols < N, ks < K
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            nw = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if D_CONV > 0:  # outputs conv_start ... conv_start + conv_dim - 1 go through the causal conv
            c, in_conv, taps, conv_ok, w_conv, b_conv = _conv_columns(cols, col_ok, conv_w_ptr, conv_b_ptr, conv_start,
                                                                      conv_dim, D_CONV)
        if PDL:  # everything below may read what the previous kernel writes
            gdc_wait()
        ONE_TILE: tl.constexpr = M <= BLOCK_M  # the rows in one tile: its residual loaded here
        if HAS_RES and ONE_TILE:
            first_rows = tl.arange(0, BLOCK_M)
            res = tl.load(res_ptr + first_rows[:, None] * stride_res + cols[None, :],
                          mask=(first_rows < M)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        for m0 in tl.range(0, M, BLOCK_M, num_stages=1):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            if NORM:
                tl.store(sq_ptr + (tile * SPLIT + s) * M + rows, tl.sum(x * x, axis=1), mask=row_ok)
                x = x * nw[None, :]
            part = tl.dot(x.to(w.dtype), tl.trans(w), input_precision=PRECISION)
            tl.store(part_ptr + (s * M + rows[:, None]) * N + cols[None, :], part,
                     mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # all of this program's parts are stored before it counts itself
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            for m0 in tl.range(0, M, BLOCK_M, num_stages=1):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < M
                ok = row_ok[:, None] & col_ok[None, :]
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(SPLIT):  # in split order: the same sum whoever finishes last
                    acc += tl.load(part_ptr + (j * M + rows[:, None]) * N + cols[None, :], mask=ok, other=0.0,
                                   cache_modifier=".cg")
                if NORM:
                    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    for j in tl.static_range(SPLIT):
                        sq += tl.load(sq_ptr + (tile * SPLIT + j) * M + rows, mask=row_ok, other=0.0,
                                      cache_modifier=".cg")
                    acc = acc * (1.0 / tl.sqrt(sq / K + eps))[:, None]
                if HAS_BIAS:
                    acc += bias[None, :]
                if GELU:  # exact (erf) GELU, as F.gelu
                    acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
                if HAS_RES and ONE_TILE:
                    acc += res
                elif HAS_RES:
                    acc += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=ok,
                                   other=0.0).to(tl.float32)
                if D_CONV > 0:  # Mamba-2's causal depthwise conv + SiLU; this program owns these channels
                    acc = _conv_rows(acc, rows, row_ok, c, in_conv, taps, conv_ok, w_conv, b_conv, conv_state_ptr,
                                     conv_dim, out_ptr, D_CONV)
                tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(count_ptr + tile, 0)  # ready for the next launch

    @triton.jit
    def _add_norm_rows_kernel(x_ptr, stride_x, res_ptr, stride_res, sum_ptr, norm_w_ptr, normed_ptr, K, eps,
                              HAS_RES: tl.constexpr, SUM: tl.constexpr, NORM: tl.constexpr, NORMED: tl.constexpr,
                              BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # One program per row, in float32: with SUM, sum = x (+ res) rounded to sum's dtype (the
        # residual stream, as the plain ops round x + f(x)); with NORMED, normed = RMSNorm(that) *
        # norm_w (or it alone without NORM), rounded once to normed's dtype, the next product's. With
        # PDL (after ssm_step, which lets it start at once) the norm's weight loads before the wait.
        row = tl.program_id(0)
        ks = tl.arange(0, BLOCK_K)
        ok = ks < K
        if NORM:
            w = tl.load(norm_w_ptr + ks, mask=ok, other=0.0).to(tl.float32)
        if PDL:
            gdc_wait()
        x = tl.load(x_ptr + row * stride_x + ks, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(res_ptr + row * stride_res + ks, mask=ok, other=0.0).to(tl.float32)
        if SUM:
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * K + ks, x, mask=ok)
            x = x.to(tl.float32)
        if NORMED:
            if NORM:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
                x = x * rstd * w
            tl.store(normed_ptr + row * K + ks, x.to(normed_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _epilogue_rows_kernel(y_ptr, out_ptr, M, N, col_start, col_end, conv_state_ptr, conv_w_ptr, conv_b_ptr,
                              conv_start, conv_dim, x_ptr, stride_x, K, eps, bias_ptr, GELU: tl.constexpr,
                              D_CONV: tl.constexpr, ROW_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                              PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        # What follows cuBLAS's product y (M, N) in _linear_many_rows, in one pass over outputs
        # col_start ... col_end - 1: with ROW_NORM, each row times 1/rms of its row of x (M, K), the
        # RMSNorm whose weight the product's weight holds (linear_rows' norm_folded), then the bias;
        # GELU, the cast to out's dtype, and Mamba-2's causal conv + SiLU for outputs conv_start ...
        # conv_start + conv_dim - 1, whose state (M, conv_dim, D_CONV) moves on by one. One program:
        # BLOCK_M rows x BLOCK_N outputs, which it alone reads and writes. With PDL the next kernel
        # (in_proj's: ssm_step) may start at once and load its state while this one runs; cuBLAS's
        # product before it is waited for.
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col_start + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < col_end
        ok = row_ok[:, None] & col_ok[None, :]
        acc = tl.load(y_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if ROW_NORM:  # each program sums its rows' squares itself: a row of x is a few KB, in L2
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                             other=0.0).to(tl.float32)
                squares += tl.sum(xs * xs, axis=1)
            acc = acc * (1.0 / tl.sqrt(squares / K + eps))[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as F.gelu
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        if D_CONV > 0:
            c, in_conv, taps, conv_ok, w_conv, b_conv = _conv_columns(cols, col_ok, conv_w_ptr, conv_b_ptr, conv_start,
                                                                      conv_dim, D_CONV)
            acc = _conv_rows(acc, rows, row_ok, c, in_conv, taps, conv_ok, w_conv, b_conv, conv_state_ptr, conv_dim,
                             out_ptr, D_CONV)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _softplus(x):
        # F.softplus of fp32 x: log1p(exp(x)), accurate where exp(x) is small (Goldberg's trick), x itself
        # past F.softplus's threshold 20
        e = tl.exp(tl.minimum(x, 20.0))
        u = 1.0 + e
        return tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))

    @triton.jit
    def _step_x_dt(inputs, x_start, dt_start, dt_bias_ptr, head, ps, p_ok, HEADDIM: tl.constexpr):
        # A decoding step's x (the channels ps of head) and dt = softplus(dt + dt_bias), fp32, from
        # its row of the in_proj output (inputs)
        x = tl.load(inputs + x_start + head * HEADDIM + ps, mask=p_ok, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(inputs + dt_start + head).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32))
        return x, dt

    @triton.jit
    def _ssm_step_kernel(state_ptr, xbc_ptr, stride_row, x_start, B_start, C_start, dt_start,
                         z_start, dt_bias_ptr, A_ptr, D_ptr, y_ptr, nheads, heads_per_group,
                         HEADDIM: tl.constexpr, DSTATE: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_N: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr):
        # One program: BLOCK_P channels of one head of one row, with their whole state (BLOCK_P x N).
        # Programs launch in the order of the state's memory (channels fastest, then heads, then
        # rows), so that the programs in flight read and write one contiguous stretch, as a copy
        # does; in the reverse order they touch pieces a row's state apart, which DRAM serves
        # slower (BENCHMARKS.md §0b).
        if PDL:
            gdc_launch_dependents()
        row, head = tl.program_id(2), tl.program_id(1)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns = tl.arange(0, BLOCK_N)
        p_ok, n_ok = ps < HEADDIM, ns < DSTATE
        s_ok = p_ok[:, None] & n_ok[None, :]
        s_ptrs = state_ptr + ((row * nheads + head) * HEADDIM + ps[:, None]) * DSTATE + ns[None, :]
        # The state was last written by this layer's previous step, which has finished: the kernels
        # between include plain launches (the next token's embedding), which wait for all before them.
        # It is read and written once per step and is larger than L2: it is marked to leave L2 first,
        # which keeps the weights and activations there.
        s = tl.load(s_ptrs, mask=s_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if PDL:
            gdc_wait()
        inputs = xbc_ptr + row * stride_row
        group = head // heads_per_group
        x, dt = _step_x_dt(inputs, x_start, dt_start, dt_bias_ptr, head, ps, p_ok, HEADDIM)
        B = tl.load(inputs + B_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
        C = tl.load(inputs + C_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
        decay = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))
        s = decay * s + (dt * x)[:, None] * B[None, :]                                   # h_t
        y = tl.sum(s * C[None, :], axis=1) + tl.load(D_ptr + head).to(tl.float32) * x    # h_t C_t + D x_t
        if GATE:  # y * silu(z), the gate of Mamba-2's norm, here where y is: out_proj's norm is then plain
            z = tl.load(inputs + z_start + head * HEADDIM + ps, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=s_ok, cache_modifier=".cs")
        tl.store(y_ptr + row * (nheads * HEADDIM) + head * HEADDIM + ps, y.to(y_ptr.dtype.element_ty), mask=p_ok)

    @triton.jit
    def _chunk_coefficients_kernel(xbc_ptr, stride_row, B_start, C_start, dt_start, dt_bias_ptr, A_ptr, Bs_ptr,
                                   acum_ptr, dts_ptr, slot_ptr, coef_ptr, nheads, heads_per_group, ngroups,
                                   DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
        # One program: one group of one row. What ssm_chunk_step's output needs of B and C, once per
        # row instead of once per program of _ssm_chunk_step_kernel: for the step j of its chunk
        # (slot) and each head, coef_i = exp(acum_j - acum_i) (C_j . B_i) for the chunk's steps i <= j,
        # and exp(acum_j); it appends B_j, acum_j and dt_j to the pending steps.
        if PDL:
            gdc_launch_dependents()
        group, row = tl.program_id(0), tl.program_id(1)
        ns, ks, hs = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_H)
        n_ok, h_ok = ns < DSTATE, hs < heads_per_group
        heads = group * heads_per_group + hs
        j = tl.load(slot_ptr + row)
        k_ok = ks < j
        pending = row * CHUNK + ks
        B_i = tl.load(Bs_ptr + pending[:, None] * (ngroups * DSTATE) + group * DSTATE + ns[None, :],
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)          # (BLOCK_K, BLOCK_N)
        acum_i = tl.load(acum_ptr + pending[:, None] * nheads + heads[None, :], mask=k_ok[:, None] & h_ok[None, :],
                         other=0.0)                                                           # (BLOCK_K, BLOCK_H)
        if PDL:
            gdc_wait()
        inputs = xbc_ptr + row * stride_row
        B = tl.load(inputs + B_start + group * DSTATE + ns, mask=n_ok, other=0.0)
        C = tl.load(inputs + C_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(inputs + dt_start + heads, mask=h_ok, other=0.0).to(tl.float32)
                       + tl.load(dt_bias_ptr + heads, mask=h_ok, other=0.0).to(tl.float32))
        acum = (tl.sum(tl.where(ks[:, None] == j - 1, acum_i, 0.0), axis=0)
                + dt * tl.load(A_ptr + heads, mask=h_ok, other=0.0).to(tl.float32))            # (BLOCK_H,)
        CB = tl.sum(B_i * C[None, :], axis=1)                                                  # C_j . B_i, i < j
        coef = tl.where(k_ok[:, None], tl.exp(acum[None, :] - acum_i) * CB[:, None], 0.0)
        coef = tl.where(ks[:, None] == j, tl.sum(B.to(tl.float32) * C), coef)                  # i = j: no decay
        out = coef_ptr + (row * nheads + heads) * (CHUNK + 1)
        tl.store(out[None, :] + ks[:, None], coef, mask=(ks < CHUNK)[:, None] & h_ok[None, :])
        tl.store(out + CHUNK, tl.exp(acum), mask=h_ok)
        tl.store(acum_ptr + (row * CHUNK + j) * nheads + heads, acum, mask=h_ok)
        tl.store(dts_ptr + (row * CHUNK + j) * nheads + heads, dt, mask=h_ok)
        tl.store(Bs_ptr + (row * CHUNK + j) * (ngroups * DSTATE) + group * DSTATE + ns, B.to(Bs_ptr.dtype.element_ty),
                 mask=n_ok)

    @triton.jit
    def _chunk_coefficients_by_step_kernel(xbc_ptr, stride_row, B_start, C_start, dt_start, dt_bias_ptr, A_ptr,
                                           Bs_ptr, acum_ptr, dts_ptr, slot_ptr, coef_ptr, nheads, heads_per_group,
                                           ngroups, DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                                           BLOCK_H: tl.constexpr, PDL: tl.constexpr):
        # _chunk_coefficients_kernel's work spread over the chunk's steps: one program per step i of
        # the chunk, group and row makes coef_i (one dot product C_j . B_i), and the program of step j
        # also coef_j, exp(acum_j) and the appends; programs past j return at once. Each program's work
        # after the wait is one load of C and one sum, so the chunk step that waits for all of them
        # starts sooner than after one program's K sums (at up to 32 rows: BENCHMARKS.md §0b).
        if PDL:
            gdc_launch_dependents()
        i, group, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        j = tl.load(slot_ptr + row)
        if i <= j:
            ns, hs = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_H)
            n_ok, h_ok = ns < DSTATE, hs < heads_per_group
            heads = group * heads_per_group + hs
            B_i = tl.load(Bs_ptr + (row * CHUNK + i) * (ngroups * DSTATE) + group * DSTATE + ns,
                          mask=n_ok & (i < j), other=0.0)
            acum_i = tl.load(acum_ptr + (row * CHUNK + i) * nheads + heads, mask=h_ok & (i < j), other=0.0)
            acum_before = tl.load(acum_ptr + (row * CHUNK + j - 1) * nheads + heads, mask=h_ok & (j > 0), other=0.0)
            if PDL:
                gdc_wait()
            inputs = xbc_ptr + row * stride_row
            C = tl.load(inputs + C_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
            dt = _softplus(tl.load(inputs + dt_start + heads, mask=h_ok, other=0.0).to(tl.float32)
                           + tl.load(dt_bias_ptr + heads, mask=h_ok, other=0.0).to(tl.float32))
            acum = acum_before + dt * tl.load(A_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
            out = coef_ptr + (row * nheads + heads) * (CHUNK + 1)
            if i < j:
                tl.store(out + i, tl.exp(acum - acum_i) * tl.sum(B_i.to(tl.float32) * C), mask=h_ok)
            else:
                B = tl.load(inputs + B_start + group * DSTATE + ns, mask=n_ok, other=0.0)
                tl.store(out + j, tl.sum(B.to(tl.float32) * C) + tl.zeros_like(acum), mask=h_ok)
                tl.store(out + CHUNK, tl.exp(acum), mask=h_ok)
                tl.store(acum_ptr + (row * CHUNK + j) * nheads + heads, acum, mask=h_ok)
                tl.store(dts_ptr + (row * CHUNK + j) * nheads + heads, dt, mask=h_ok)
                tl.store(Bs_ptr + (row * CHUNK + j) * (ngroups * DSTATE) + group * DSTATE + ns,
                         B.to(Bs_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _ssm_chunk_step_kernel(state_ptr, xbc_ptr, stride_row, x_start, C_start, dt_start, z_start,
                               dt_bias_ptr, D_ptr, y_ptr, xs_ptr, dts_ptr, slot_ptr, coef_ptr, nheads, heads_per_group,
                               HEADDIM: tl.constexpr, DSTATE: tl.constexpr, CHUNK: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GATE: tl.constexpr, PDL: tl.constexpr):
        # One program: BLOCK_P channels of one head of one row, as _ssm_step_kernel, but the state it
        # reads is the one at the start of the chunk, S_0, and the steps of the chunk before this one
        # (j of them) wait in the pending buffers: the output is the SSD's chunked form
        #   y_j = exp(acum_j) (C_j . S_0) + sum_{i<=j} coef_i dt_i x_i + D x_j
        # with coef from _chunk_coefficients_kernel, the launch before. It appends x_j to the pending
        # steps (dt_j comes with the coefficients) and never writes the state (_fold_chunk_kernel does,
        # at the chunk's end): a program's registers are those of its most demanding path, and a path
        # that writes the state would raise them at every step, lowering the programs an SM holds and
        # so the bytes in flight.
        if PDL:
            gdc_launch_dependents()
        row, head = tl.program_id(2), tl.program_id(1)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns, ks = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
        p_ok, n_ok = ps < HEADDIM, ns < DSTATE
        s_ok = p_ok[:, None] & n_ok[None, :]
        group = head // heads_per_group
        s_ptrs = state_ptr + ((row * nheads + head) * HEADDIM + ps[:, None]) * DSTATE + ns[None, :]
        # S_0 and the chunk's earlier steps were written a step or more before, by this layer's kernels,
        # which have finished (see _ssm_step_kernel): they load before the wait.
        s0 = tl.load(s_ptrs, mask=s_ok, other=0.0, eviction_policy="evict_first")
        j = tl.load(slot_ptr + row)
        k_ok = ks < j
        # dt_i x_i from x_i in xbc's dtype and dt_i in fp32: the product stored before, in half the bytes
        x_i = tl.load(xs_ptr + (row * CHUNK + ks[:, None]) * (nheads * HEADDIM) + head * HEADDIM + ps[None, :],
                      mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)          # (BLOCK_K, BLOCK_P)
        xdt_i = x_i * tl.load(dts_ptr + (row * CHUNK + ks) * nheads + head, mask=k_ok, other=0.0)[:, None]
        if PDL:
            gdc_wait()
        inputs = xbc_ptr + row * stride_row
        x, dt = _step_x_dt(inputs, x_start, dt_start, dt_bias_ptr, head, ps, p_ok, HEADDIM)
        xdt = dt * x
        coefs = coef_ptr + (row * nheads + head) * (CHUNK + 1)
        decay = tl.load(coefs + CHUNK)                                                         # exp(acum_j)
        C = tl.load(inputs + C_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
        coef = tl.load(coefs + ks, mask=ks <= j, other=0.0)
        coef_j = tl.sum(tl.where(ks == j, coef, 0.0))
        y = (decay * tl.sum(s0.to(tl.float32) * C[None, :], axis=1) + tl.sum(coef[:, None] * xdt_i, axis=0)
             + coef_j * xdt + tl.load(D_ptr + head).to(tl.float32) * x)
        tl.store(xs_ptr + (row * CHUNK + j) * (nheads * HEADDIM) + head * HEADDIM + ps, x.to(xs_ptr.dtype.element_ty),
                 mask=p_ok)
        if GATE:
            z = tl.load(inputs + z_start + head * HEADDIM + ps, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + row * (nheads * HEADDIM) + head * HEADDIM + ps, y.to(y_ptr.dtype.element_ty), mask=p_ok)

    @triton.jit
    def _ssm_chunk_end_kernel(state_ptr, xbc_ptr, stride_row, x_start, B_start, C_start, dt_start, z_start,
                              dt_bias_ptr, A_ptr, D_ptr, y_ptr, xs_ptr, dts_ptr, Bs_ptr, acum_ptr, slot_ptr, nheads,
                              heads_per_group, ngroups, HEADDIM: tl.constexpr, DSTATE: tl.constexpr,
                              CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr,
                              PRECISION: tl.constexpr):
        # One program: BLOCK_P channels of one head of one row at the chunk's last step j, all of it:
        #   h_j = exp(acum_j) S_0 + sum_{i<j} exp(acum_j - acum_i) dt_i x_i B_i^T + dt_j x_j B_j^T
        # written over S_0 in slices of BLOCK_S of d_state (the sum over i as one product per slice),
        # and y_j = h_j C_j + D x_j from each slice as it is written.
        if PDL:
            gdc_launch_dependents()
        row, head = tl.program_id(2), tl.program_id(1)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ks = tl.arange(0, BLOCK_K)
        p_ok = ps < HEADDIM
        group = head // heads_per_group
        j = tl.load(slot_ptr + row)
        k_ok = ks < j
        pending = row * CHUNK + ks
        xdt_i = (tl.load(xs_ptr + pending[None, :] * (nheads * HEADDIM) + head * HEADDIM + ps[:, None],
                         mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                 * tl.load(dts_ptr + pending * nheads + head, mask=k_ok, other=0.0)[None, :])  # (BLOCK_P, BLOCK_K)
        acum_i = tl.load(acum_ptr + pending * nheads + head, mask=k_ok, other=0.0)
        if PDL:
            gdc_wait()
        inputs = xbc_ptr + row * stride_row
        x, dt = _step_x_dt(inputs, x_start, dt_start, dt_bias_ptr, head, ps, p_ok, HEADDIM)
        xdt = dt * x
        acum = tl.sum(tl.where(ks == j - 1, acum_i, 0.0)) + dt * tl.load(A_ptr + head).to(tl.float32)   # acum_j
        w_xdt = xdt_i * tl.where(k_ok, tl.exp(acum - acum_i), 0.0)[None, :]
        decay = tl.exp(acum)
        y = tl.load(D_ptr + head).to(tl.float32) * x
        for n0 in tl.range(0, BLOCK_N, BLOCK_S, num_stages=2):
            ns = n0 + tl.arange(0, BLOCK_S)
            n_ok = ns < DSTATE
            s_ok = p_ok[:, None] & n_ok[None, :]
            s_ptrs = state_ptr + ((row * nheads + head) * HEADDIM + ps[:, None]) * DSTATE + ns[None, :]
            B = tl.load(inputs + B_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
            s = (decay * tl.load(s_ptrs, mask=s_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                 + xdt[:, None] * B[None, :])
            B_i = tl.load(Bs_ptr + pending[:, None] * (ngroups * DSTATE) + group * DSTATE + ns[None, :],
                          mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)    # (BLOCK_K, BLOCK_S)
            s = tl.dot(w_xdt, B_i, acc=s, input_precision=PRECISION)
            C = tl.load(inputs + C_start + group * DSTATE + ns, mask=n_ok, other=0.0).to(tl.float32)
            y += tl.sum(s * C[None, :], axis=1)
            tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=s_ok, cache_modifier=".cs")
        if GATE:
            z = tl.load(inputs + z_start + head * HEADDIM + ps, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + row * (nheads * HEADDIM) + head * HEADDIM + ps, y.to(y_ptr.dtype.element_ty), mask=p_ok)

    @triton.jit
    def _fold_chunk_kernel(state_ptr, xs_ptr, dts_ptr, Bs_ptr, acum_ptr, slot_ptr, rows, nheads, heads_per_group,
                           ngroups, HEADDIM: tl.constexpr, DSTATE: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, EVERY_ROW: tl.constexpr):
        # Persistent programs over tiles of the state (BLOCK_P channels x BLOCK_S of d_state, of one head
        # of one row). Launched at every step, they return at once unless a row is at its chunk's last
        # step, whose rows' tiles become
        #   h = exp(acum_last) S_0 + sum_i exp(acum_last - acum_i) dt_i x_i B_i^T
        # the sum as one product (channels x steps) @ (steps x slice of d_state) per tile. With
        # EVERY_ROW each row folds its `slot` pending steps instead (fold_pending's sum), whatever its place.
        rs = tl.arange(0, BLOCK_R)
        folding = 0
        for r0 in range(0, rows, BLOCK_R):
            slots = tl.load(slot_ptr + r0 + rs, mask=r0 + rs < rows, other=0)
            folding += tl.sum(((slots > 0) if EVERY_ROW else (slots == CHUNK - 1)).to(tl.int32))
        if folding == 0:
            return
        ps, ns, ks = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
        p_blocks, n_slices = tl.cdiv(HEADDIM, BLOCK_P), tl.cdiv(DSTATE, BLOCK_S)
        # tiles in the state's memory order (slices fastest): the programs in flight touch one stretch
        for t in tl.range(tl.program_id(0), rows * nheads * p_blocks * n_slices, tl.num_programs(0)):
            n = (t % n_slices) * BLOCK_S + ns
            p = (t // n_slices % p_blocks) * BLOCK_P + ps
            head = t // (n_slices * p_blocks) % nheads
            row = t // (n_slices * p_blocks * nheads)
            slot = tl.load(slot_ptr + row)
            steps = slot if EVERY_ROW else tl.where(slot == CHUNK - 1, CHUNK, 0)  # the row's steps to fold
            k_ok = ks < steps  # none: nothing moves, every access is masked
            p_ok, n_ok = (p < HEADDIM) & (steps > 0), n < DSTATE
            pending = row * CHUNK + ks
            acum_i = tl.load(acum_ptr + pending * nheads + head, mask=k_ok, other=0.0)
            acum = tl.sum(tl.where(ks == steps - 1, acum_i, 0.0))
            w = tl.where(k_ok, tl.exp(acum - acum_i), 0.0)
            xdt_i = (tl.load(xs_ptr + pending[None, :] * (nheads * HEADDIM) + head * HEADDIM + p[:, None],
                             mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                     * tl.load(dts_ptr + pending * nheads + head, mask=k_ok, other=0.0)[None, :])  # (BLOCK_P, BLOCK_K)
            B_i = tl.load(Bs_ptr + pending[:, None] * (ngroups * DSTATE) + head // heads_per_group * DSTATE
                          + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)     # (BLOCK_K, BLOCK_S)
            s_ptrs = state_ptr + ((row * nheads + head) * HEADDIM + p[:, None]) * DSTATE + n[None, :]
            s_ok = p_ok[:, None] & n_ok[None, :]
            s = tl.exp(acum) * tl.load(s_ptrs, mask=s_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
            s = tl.dot(xdt_i * w[None, :], B_i.to(tl.float32), acc=s, input_precision=PRECISION)
            tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=s_ok, cache_modifier=".cs")

    @triton.jit
    def _sample_top_k_kernel(logits_ptr, noise_ptr, out_ptr, n_cond, V, stride_row, stride_k, cfg_scale,
                             inv_temperature, top_k, steps_ptr, fixed_ptr, col_ptr, next_ptr, stride_steps,
                             stride_steps_k, stride_next, stride_next_k, noise_slots, GUIDANCE: tl.constexpr,
                             BLOCK_V: tl.constexpr, INTO: tl.constexpr, COPIES: tl.constexpr, RING: tl.constexpr):
        # One program: one codebook of one prompt. The k-th largest logit comes from a bitonic sort
        # of the row in registers; the draw is the exponential race of sample_next.
        row, k = tl.program_id(0), tl.program_id(1)
        vs = tl.arange(0, BLOCK_V)
        ok = vs < V
        logits = tl.load(logits_ptr + row * stride_row + k * stride_k + vs, mask=ok, other=0.0).to(tl.float32)
        if GUIDANCE:  # rows [conditional; null]: cond + (scale - 1) * (cond - uncond)
            uncond = tl.load(logits_ptr + (row + n_cond) * stride_row + k * stride_k + vs, mask=ok,
                             other=0.0).to(tl.float32)
            logits = logits + (cfg_scale - 1.0) * (logits - uncond)
        logits = tl.where(ok, logits * inv_temperature, -float("inf"))
        kth = tl.sum(tl.where(vs == top_k - 1, tl.sort(logits, descending=True), 0.0), axis=0)
        logits = tl.where(logits >= kth, logits, -float("inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        if RING:  # the noise of step col, in a ring of noise_slots steps' (b, K, V) draws
            noise_ptr += (tl.load(col_ptr) % noise_slots).to(tl.int64) * n_cond * tl.num_programs(1) * V
        noise = tl.load(noise_ptr + (row * tl.num_programs(1) + k) * V + vs, mask=ok, other=1.0)
        token = tl.argmax(p / noise, axis=0).to(tl.int64)
        if INTO:  # generate's bookkeeping: the slot at column col of the step layout, unless it is fixed,
            # and the input rows of the next step (every guidance copy of this prompt)
            col = tl.load(col_ptr)
            slot = steps_ptr + row * stride_steps + k * stride_steps_k + col
            keep = tl.load(fixed_ptr + row * stride_steps + k * stride_steps_k + col)
            token = tl.where(keep, tl.load(slot), token)
            tl.store(slot, token)
            for copy in tl.static_range(COPIES):
                tl.store(next_ptr + (copy * n_cond + row) * stride_next + k * stride_next_k, token)
        tl.store(out_ptr + row * tl.num_programs(1) + k, token)

    @triton.jit
    def _embed_rows_kernel(tokens_ptr, stride_row, stride_k, offsets_ptr, table_ptr, pos_ptr, freqs_ptr, out_ptr, d,
                           K: tl.constexpr, BLOCK_D: tl.constexpr, ADVANCE: tl.constexpr):
        # One program per row: the K codebook embeddings summed, plus the [cos | sin] position
        # embedding, rounded where the plain ops round (the sum, the positions, their sum).
        row = tl.program_id(0)
        ds = tl.arange(0, BLOCK_D)
        ok = ds < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            token = tl.load(tokens_ptr + row * stride_row + k * stride_k) + tl.load(offsets_ptr + k)
            acc += tl.load(table_ptr + token * d + ds, mask=ok, other=0.0).to(tl.float32)
        half = d // 2
        first = ds < half
        freq = tl.load(freqs_ptr + tl.where(first, ds, ds - half), mask=ok, other=0.0)
        pos = tl.load(pos_ptr + row)
        angle = pos.to(tl.float32) * freq
        position = tl.where(first, libdevice.cos(angle), libdevice.sin(angle))  # accurate for large angles
        dtype = out_ptr.dtype.element_ty
        x = acc.to(dtype).to(tl.float32) + position.to(dtype).to(tl.float32)
        tl.store(out_ptr + row * d + ds, x.to(dtype), mask=ok)
        if ADVANCE:  # only this program reads this row's position
            tl.store(pos_ptr + row, pos + 1)



def linear_rows(x, weight, bias=None, norm_weight=None, eps=1e-5, gelu=False, residual=None, conv=None,
                norm_out=None, pdl=True, path=None, block_n=None, num_warps=None, block_m=None, split=None,
                counters=None, norm_folded=False):
    """residual + gelu(norm(x) @ weight^T + bias) for the rows of a decoding step.

    x (M, K) with M <= 128 and K <= 4096, weight (N, K). norm: RMSNorm with norm_weight (K,) if given.
    residual (M, N). conv: (state, weight, bias, start) to pass outputs start ... start + C - 1
    through Mamba-2's causal conv + SiLU, with state (M, C, d_conv) updated in place, weight
    (C, d_conv), bias (C,). Returns out (M, N) in the dtype of residual if given, else of x.
    norm_out: (norm weight (N,), eps) of the product that takes out next: then returns (out,
    RMSNorm(out) * norm weight) with the second in the norm weight's dtype, which that product takes
    as its x without a norm_weight (past CORE_ROWS the residual's kernel makes it: one launch fewer).
    norm_folded: weight is W * w, an RMSNorm's weight w folded into the product's columns, and x is
    taken as it is: each row of the product is scaled by 1/rms(x) (with eps) before the bias, since
    RMSNorm(x) W^T = (x (W * w)^T) / rms(x). No norm kernel before the product; the many_rows path
    only (ValueError on another, or with norm_weight too).
    path: "cuda_cores" (one kernel, in float32), "tensor_cores" (one kernel, the product on tensor
    cores in weight's dtype, the norm rounded to it first, as the plain ops do) or "many_rows" (a
    norm kernel, the product, one kernel for the residual: _linear_many_rows); default:
    _default_path. ValueError where the tensor-core kernel does not fit the GPU's shared memory
    (fp32 weights wider than 1024; 16-bit ones wider than 2048 past 16 rows). ValueError naming weight,
    bias, norm_weight or residual where its shape is not the one above.
    pdl: programmatic dependent launch (Hopper and later): the weights, norm_weight, bias and the
    conv's weight, bias and state are read before the wait for the previous kernel, so they must not
    be what that kernel writes.
    block_n, num_warps, block_m: outputs per program, warps per program and (tensor_cores) rows per
    tile (default: _launch_shape, _tc_launch_shape).
    path "split_k": one kernel of programs that each take a slice of K, split of them per tile of
    outputs (split >= K / SPLIT_WIDTH, else ValueError; default _split_launch_shape); the last of a
    tile's programs adds their partial products in a fixed order and does the epilogue.
    counters: int32 zeros, at least one per tile of outputs, which split_k counts on and leaves at
    zero (default: new ones); with them the default path may be split_k (_default_path). Calls one
    after another on a stream may share them; calls that may run at once (on other streams) may not."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or K > MAX_WIDTH:
        raise ValueError(f"linear_rows is for <= {MAX_ROWS} rows of width <= {MAX_WIDTH}; got {M} x {K}")
    for name, t, shape in (("weight", weight, (N, K)), ("bias", bias, (N,)), ("norm_weight", norm_weight, (K,)),
                           ("residual", residual, (M, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"linear_rows: {name} {tuple(t.shape)} is not {shape} for x {tuple(x.shape)}")
    if conv is not None:
        conv_state, conv_w, conv_b, conv_start = conv
        if conv_state.shape[0] != M or not conv_state.is_contiguous() or not conv_w.is_contiguous():
            raise ValueError("linear_rows: the conv state must be contiguous (M, channels, d_conv)")
    path = path or _default_path(M, weight, split_k=counters is not None)
    if path not in LINEAR_PATHS:
        raise ValueError(f"linear_rows: path {path!r} is not one of {', '.join(LINEAR_PATHS)}")
    if norm_folded and (path != "many_rows" or norm_weight is not None):
        raise ValueError(f"linear_rows(norm_folded=True) is for the many_rows path without a norm_weight; got path "
                         f"{path!r}{', a norm_weight' if norm_weight is not None else ''}")
    if path == "many_rows":
        return _linear_many_rows(x, weight, bias, norm_weight, eps, gelu, residual, conv, norm_out, pdl, norm_folded)
    rows = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # rows may be strided views
    x, residual, weight = rows(x), rows(residual), weight.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=(residual if residual is not None else x).dtype)
    dummy = weight  # a valid pointer for the arguments a variant does not read
    if conv is None:
        conv_state, conv_w, conv_b, conv_start, d_conv = x, dummy, dummy, 0, 0
    else:
        d_conv = conv_state.shape[-1]
    args = (x, dummy if norm_weight is None else norm_weight, weight, dummy if bias is None else bias,
            dummy if residual is None else residual, out, N, K, eps, x.stride(0),
            0 if residual is None else residual.stride(0), conv_state, conv_w, conv_b, conv_start,
            conv_state.shape[1] if conv is not None else 0)
    flags = dict(NORM=norm_weight is not None, HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None,
                 D_CONV=d_conv, **_launch_options(x, pdl))
    if path == "split_k":
        default_m, default_n, default_split, default_warps = _split_launch_shape(M, K, weight.element_size(),
                                                                                 x.element_size())
        block_m, block_n = block_m or default_m, block_n or default_n
        split, num_warps = split or default_split, num_warps or default_warps
        if cdiv(K, split) > SPLIT_WIDTH:
            raise ValueError(f"linear_rows(path='split_k'): {split} slices of {K} are wider than {SPLIT_WIDTH}; "
                             f"take split >= {cdiv(K, SPLIT_WIDTH)}")
        n_tiles, block_k = cdiv(N, block_n), next_power_of_2(cdiv(K, split))
        counters = torch.zeros(n_tiles, device=x.device, dtype=torch.int32) if counters is None else counters
        if counters.numel() < n_tiles or counters.dtype != torch.int32:
            raise ValueError(f"linear_rows: counters must be {n_tiles} int32 zeros, got {counters.numel()} "
                             f"{counters.dtype}")
        part = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
        sq = torch.empty(n_tiles, split, M, device=x.device, dtype=torch.float32)
        _linear_rows_split_kernel[(n_tiles, split)](
            *args[:6], part, sq, counters, *args[6:], M=M,
            PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", SPLIT=split, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **flags)
    elif path == "tensor_cores":
        default_m, default_n, default_warps = _tc_launch_shape(M, K)
        block_m, block_n, num_warps = block_m or default_m, block_n or default_n, num_warps or default_warps
        halves = 2 if K > 2048 else 1
        try:
            _linear_rows_tc_kernel[(cdiv(N, block_n),)](
                *args, M=M, PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", K_HALVES=halves,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=next_power_of_2(cdiv(K, halves)),
                num_warps=num_warps, **flags)
        except OutOfResources as e:  # the slice of W and a tile of x live in shared memory
            raise ValueError(f"linear_rows(path='tensor_cores'): {block_n} outputs x {K} of {weight.dtype} and "
                             f"{block_m}-row tiles of x need more shared memory than this GPU has ({e}); "
                             "take path 'cuda_cores' or 'many_rows'") from None
    else:
        default_n, default_warps = _launch_shape(M, K, conv is not None)
        block_n, num_warps = block_n or default_n, num_warps or default_warps
        _linear_rows_kernel[(cdiv(N, block_n),)](
            *args, M=M, M_POW2=next_power_of_2(M), BLOCK_K=next_power_of_2(K), BLOCK_N=block_n,
            num_warps=num_warps, **flags)
    if norm_out is None:
        return out
    return out, _add_norm_rows(out, norm_weight=norm_out[0], eps=norm_out[1], normed_dtype=norm_out[0].dtype)[1]


def _default_path(rows, weight, split_k=False):
    """linear_rows' path for `rows` rows, from frames measured at 1-64 prompts (BENCHMARKS.md §0b).
    split_k (the caller has counters for it): split_k from SPLIT_MIN_ROWS to SPLIT_MAX_ROWS rows for
    products of up to SPLIT_OUTPUTS outputs (out_proj, fc1, fc2, the head), which leave most SMs idle
    with one program per tile of outputs; at 2 rows the CUDA-core kernel is faster, past 32 cuBLAS's
    product is. Else CUDA cores up to TC_ROWS rows, where reading W is the cost and a row's
    product is a reduction within a warp; tensor cores from there to CORE_ROWS rows for 16-bit
    weights (fp32 weights do not fit its shared memory at the model's widths); many_rows past
    CORE_ROWS."""
    if split_k and SPLIT_MIN_ROWS <= rows <= SPLIT_MAX_ROWS and weight.shape[0] <= SPLIT_OUTPUTS:
        return "split_k"
    if rows > CORE_ROWS:
        return "many_rows"
    return "tensor_cores" if rows > TC_ROWS and weight.element_size() == 2 else "cuda_cores"


def _tc_launch_shape(rows, width):
    """(rows per tile, outputs per program, warps per program) of linear_rows' tensor-core kernel,
    from the sweep at 8 rows in a chain of launches with PDL (bench.py --only decode-kernels
    --sweep-configs, BENCHMARKS.md §0b): tl.dot's smallest row tile, 16; 32 outputs on 4 warps for
    inputs up to 1024 wide (in_proj, fc1, the head), 16 outputs on 8 warps for wider ones
    (out_proj, fc2), whose slice of W is twice as long."""
    return (16, 32, 4) if width <= 1024 else (16, 16, 8)


def _split_launch_shape(rows, width, weight_bytes, x_bytes):
    """(rows per tile, outputs per program, slices of K, warps per program) of linear_rows' split_k
    kernel, from the sweep at 4-32 rows in a chain of launches with PDL (bench.py --only
    decode-kernels --sweep-configs, BENCHMARKS.md §0b): slices of 256 of K on 4 warps; 64 outputs
    per program up to 16 rows, 32 past (and for 4-byte weights: W's slice in half the registers).
    Past 16 rows, 16-bit inputs 2048 or more wide (fc2's) in slices of 512: half the partial
    products to add; 4-byte ones that wide do not fit the registers in slices of 512."""
    small = rows <= 16
    slice_k = 512 if not small and width >= 2048 and x_bytes == 2 else 256
    return (16 if small else 32), (64 if small and weight_bytes == 2 else 32), cdiv(width, slice_k), 4


def _add_norm_rows(x, residual=None, sum_dtype=None, norm_weight=None, eps=1e-5, normed_dtype=None, pdl=False):
    """_add_norm_rows_kernel on x (M, K): sum = x + residual in sum_dtype if given, and normed =
    RMSNorm(sum or x) * norm_weight in normed_dtype if given. Returns (sum, normed), None where not asked.
    pdl: launched as a programmatic dependent (linear_rows'), which pays after a kernel that lets it start
    early (ssm_step), not after cuBLAS's products, and only past NORM_PDL_ROWS rows."""
    M, K = x.shape
    new = lambda dtype: None if dtype is None else torch.empty(M, K, device=x.device, dtype=dtype)
    sum_, normed = new(sum_dtype), new(normed_dtype)
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    _add_norm_rows_kernel[(M,)](x, x.stride(0), x if residual is None else residual,
                                0 if residual is None else residual.stride(0), x if sum_ is None else sum_,
                                x if norm_weight is None else norm_weight, x if normed is None else normed, K, eps,
                                HAS_RES=residual is not None, SUM=sum_ is not None, NORM=norm_weight is not None,
                                NORMED=normed is not None, BLOCK_K=next_power_of_2(K), num_warps=4,
                                **_launch_options(x, pdl))
    return sum_, normed


def _linear_many_rows(x, weight, bias, norm_weight, eps, gelu, residual, conv, norm_out, pdl, norm_folded=False):
    """linear_rows past CORE_ROWS: the RMSNorm rounded to weight's dtype (as the plain ops round it)
    in one kernel, unless x comes normalised from the kernel before it (its norm_out) or the norm's
    weight is folded into weight (norm_folded: then cuBLAS's product in float32, and 1/rms(x) in the
    epilogue); cuBLAS's product with the bias; then GELU, cast and conv in one kernel
    (_epilogue_rows_kernel), or the residual, cast and the next product's norm in one
    (_add_norm_rows). Returns out, or (out, normed) with norm_out."""
    out_dtype = (residual if residual is not None else x).dtype
    if norm_folded:
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = _product_fp32(x if x.dtype == weight.dtype else x.to(weight.dtype), weight)
        y = _epilogue_rows(y, gelu, conv, out_dtype, pdl, bias=bias, row_norm=(x, eps))
    else:
        if norm_weight is not None or x.dtype != weight.dtype or x.stride(-1) != 1:
            x = _add_norm_rows(x, norm_weight=norm_weight, eps=eps, normed_dtype=weight.dtype,
                               pdl=pdl and x.shape[0] > NORM_PDL_ROWS)[1]
        y = F.linear(x, weight, bias)
        if gelu or conv is not None:
            y = _epilogue_rows(y, gelu, conv, out_dtype, pdl)
    y_is_out = residual is None and y.dtype == out_dtype
    if y_is_out and norm_out is None:
        return y
    next_w, next_eps = norm_out or (None, eps)
    out, normed = _add_norm_rows(y, residual, None if y_is_out else out_dtype, next_w, next_eps,
                                 None if norm_out is None else next_w.dtype)
    out = y if y_is_out else out
    return out if norm_out is None else (out, normed)


def _product_fp32(x, weight):
    """x @ weight^T (M, N) in float32, not rounded to the inputs' dtype: cuBLAS's 16-bit product with a
    float32 output on CUDA (torch.mm's out_dtype), else in float32."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


def _epilogue_rows(y, gelu, conv, out_dtype, pdl, bias=None, row_norm=None):
    """GELU, the cast to out_dtype and the conv (as linear_rows) on cuBLAS's product y (M, N), in one
    kernel, in place where the dtype allows; pdl as linear_rows'. row_norm: (x (M, K), eps): first
    each row times 1/rms of its row of x, then bias (N,) if given (linear_rows' norm_folded)."""
    M, N = y.shape
    out = y if out_dtype == y.dtype else torch.empty_like(y, dtype=out_dtype)
    if conv is None:
        conv_state, conv_w, conv_b, conv_start, d_conv, conv_dim = y, y, y, 0, 0, 0
    else:
        (conv_state, conv_w, conv_b, conv_start), d_conv = conv, conv[0].shape[-1]
        conv_dim = conv_state.shape[1]
    x, eps = row_norm if row_norm is not None else (y, 0.0)  # (x: a valid pointer when there is no norm)
    # In place with only the conv to do (in_proj), the other outputs are already final: the pass
    # covers the conv's columns alone (3072 of the LM's 5152).
    conv_only = conv is not None and out is y and not gelu and row_norm is None and bias is None
    cols = (conv_start, conv_start + conv_dim) if conv_only else (0, N)
    block_m, block_n, num_warps = _epilogue_launch_shape(M, conv is not None)
    _epilogue_rows_kernel[(cdiv(cols[1] - cols[0], block_n), cdiv(M, block_m))](
        y, out, M, N, *cols, conv_state, conv_w, conv_b, conv_start, conv_dim, x, x.stride(0), x.shape[1], eps,
        y if bias is None else bias, GELU=gelu, D_CONV=d_conv, ROW_NORM=row_norm is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(next_power_of_2(x.shape[1]), 2048 // block_m),
        num_warps=num_warps, **_launch_options(y, pdl))
    return out


def _epilogue_launch_shape(rows, conv):
    """(rows, outputs, warps) per program of _epilogue_rows_kernel, from a sweep at 32 and 128 rows
    (BENCHMARKS.md §0b). With the conv, one row per program: its conv states for the program's
    channels are then one contiguous stretch of memory."""
    if conv:
        return (1, 128, 4) if rows <= 32 else (1, 256, 2)
    return 16, 64, 4


def _launch_shape(rows, width, conv):
    """(outputs per program, warps per program) of linear_rows for `rows` rows of x `width` wide.
    Chosen in a chain of launches with PDL (bench.py --only decode-kernels --sweep-configs), which
    is how a frame runs them; Triton's autotuner, which times each launch alone, picks larger ones
    that are slower there (BENCHMARKS.md §0b). More rows: more work per weight, so fewer outputs
    per program, and more warps for the wide matrices (out_proj, fc2)."""
    if rows <= 2:
        return (4, 1) if conv else (2, 1)
    if rows <= 4:
        return (4, 2) if width >= 2048 else (4, 1)
    return (2, 4) if width >= 2048 else (2, 1)


def ssm_step(xbc, state, A, dt_bias, D, x_start, ngroups, z_start=None, pdl=True, block_p=None, num_warps=None):
    """One SSD step (ssd_reference.ssd_step, dt = softplus(dt + dt_bias)) for all heads, in one kernel.

    xbc (b, width): rows holding x (nheads * headdim) at x_start, then B and C (ngroups * d_state
    each), and dt (nheads) in the last columns, as Mamba-2's in_proj output after the conv.
    state (b, nheads, headdim, d_state), updated in place; A, dt_bias, D (nheads,).
    Returns y (b, nheads * headdim) in xbc's dtype; with z_start, y * silu(z) for the gate z
    (nheads * headdim) at z_start of xbc, in float32 (unrounded: the RMSNorm after it divides).
    pdl: as in linear_rows; the state is read before the wait. block_p, num_warps: channels of a
    head and warps per program (default: by the state's dtype and the rows). ValueError for a state that
    is not contiguous, rows of xbc that are not dense, and shapes that do not fit (_check_step)."""
    b, nheads, headdim, d_state = state.shape
    # launch shape measured at 8-128 rows, alone (bench.py --only decode-kernels) and in frames
    # (BENCHMARKS.md §0b)
    fp32 = state.element_size() == 4
    block_p = block_p or (2 if fp32 and b > CORE_ROWS else 4)
    num_warps = num_warps or (4 if fp32 else 1)
    if not (state.is_contiguous() and xbc.stride(-1) == 1):
        raise ValueError("ssm_step: the state must be contiguous and xbc's rows dense")
    _check_step("ssm_step", xbc, state, A, dt_bias, D, x_start, ngroups)
    if b > 65535:  # the grid's last dimension
        raise ValueError(f"ssm_step: at most 65535 rows, got {b}")
    y = torch.empty(b, nheads * headdim, device=xbc.device, dtype=xbc.dtype if z_start is None else torch.float32)
    B_start = x_start + nheads * headdim
    grid = (cdiv(headdim, block_p), nheads, b)
    _ssm_step_kernel[grid](state, xbc, xbc.stride(0), x_start, B_start, B_start + ngroups * d_state,
                           xbc.shape[1] - nheads, z_start or 0, dt_bias, A, D, y, nheads, nheads // ngroups,
                           HEADDIM=headdim, DSTATE=d_state, BLOCK_P=block_p, BLOCK_N=next_power_of_2(d_state),
                           GATE=z_start is not None, num_warps=num_warps, **_launch_options(xbc, pdl))
    return y


class PendingSteps(NamedTuple):
    """One Mamba-2 layer's decoding steps that ssm_chunk_step has not yet added to the state: the
    first `slot` steps of the current chunk of K, per row (b rows).

    x (b, K, nheads * headdim) and B (b, K, ngroups * d_state) of each step, in the in_proj output's
    dtype, as the step read them; dt (b, K, nheads) after the softplus, and acum (b, K, nheads), dt A
    summed from the chunk's start through each step, in fp32, or in the state's dtype if wider (the
    kernels' dt x is the product they would have stored, from half its bytes). slot (b,) int32,
    0 <= slot < K: how many steps are pending (one tensor for all layers)."""
    x: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    acum: torch.Tensor
    slot: torch.Tensor

    @property
    def chunk(self):
        """K, the steps of a chunk."""
        return self.x.shape[1]

    @staticmethod
    def empty(state, chunk, ngroups, dtype, slot):
        """No pending steps for a state (b, nheads, headdim, d_state): buffers of `chunk` steps, x and B
        in dtype (the in_proj output's); slot (b,) int32 zeros, shared by the layers."""
        b, h, p, n = state.shape
        f32 = dict(device=state.device, dtype=torch.promote_types(state.dtype, torch.float32))
        inputs = dict(device=state.device, dtype=dtype)
        return PendingSteps(torch.zeros(b, chunk, h * p, **inputs), torch.zeros(b, chunk, h, **f32),
                            torch.zeros(b, chunk, ngroups * n, **inputs), torch.zeros(b, chunk, h, **f32), slot)

    def rows(self, rows):
        """The pending steps of a slice of the rows (views)."""
        return PendingSteps(*(t[rows] for t in self))


def ssm_chunk_step(xbc, state, pending, A, dt_bias, D, x_start, ngroups, z_start=None, pdl=True, block_p=None,
                   num_warps=None, coefficients_by_step=None):
    """ssm_step's output, from the state at the start of a chunk of K decoding steps (K =
    pending.chunk >= 2) and the chunk's steps before this one (PendingSteps), in the SSD's
    chunked form (ssd_reference.ssd_chunked within one chunk; PAPER.md, Mamba-2 internals):

        y_t = exp(acum_t) C_t S_0 + sum_{s <= t} exp(acum_t - acum_s) (C_t . B_s) dt_s x_s + D x_t

    so the state (b, nheads, headdim, d_state) is read every step and never written here: the step
    appends x, dt, B and acum to `pending` at `slot`, and fold_chunk, called after it, writes the state
    at the chunk's last step (slot K - 1); or ssm_chunk_end takes that step in its place. Two
    kernels: the coefficients (C_t . B_s and the decays, once per row: coefficients_by_step), then
    the output. The caller
    advances pending.slot (+1 mod K) after each step's kernels and fold_chunk (one tensor for all
    layers) and folds what is pending into the state with fold_pending (fold_chunk(every_row=True)
    on the GPU) before anything else reads it. coefficients_by_step: the first kernel as one
    program per row and group (False) or per step of the chunk, row and group (True); None: by the
    rows, as measured. Other arguments and the result as ssm_step's."""
    b, nheads, headdim, d_state = state.shape
    chunk = pending.chunk
    # launch shape measured at 8-128 rows, fp32 and bf16 states (BENCHMARKS.md §0b): one warp, 8
    # channels, and 16 for an fp32 state up to CORE_ROWS rows
    block_p = block_p or (16 if state.element_size() == 4 and b <= CORE_ROWS else 8)
    num_warps = num_warps or 1
    _check_pending("ssm_chunk_step", state, pending, xbc)
    _check_step("ssm_chunk_step", xbc, state, A, dt_bias, D, x_start, ngroups)
    y = torch.empty(b, nheads * headdim, device=xbc.device, dtype=xbc.dtype if z_start is None else torch.float32)
    coef = torch.empty(b, nheads, chunk + 1, device=xbc.device, dtype=torch.float32)
    B_start = x_start + nheads * headdim
    C_start, dt_start, heads_per_group = B_start + ngroups * d_state, xbc.shape[1] - nheads, nheads // ngroups
    launch = _launch_options(xbc, pdl)
    sizes = dict(DSTATE=d_state, CHUNK=chunk, BLOCK_N=next_power_of_2(d_state), BLOCK_K=next_power_of_2(chunk))
    if coefficients_by_step is None:  # measured at 8, 32 and 128 rows (BENCHMARKS.md §0b)
        coefficients_by_step = b <= 32
    coef_args = (xbc, xbc.stride(0), B_start, C_start, dt_start, dt_bias, A, pending.B, pending.acum, pending.dt,
                 pending.slot, coef, nheads, heads_per_group, ngroups)
    block_h = next_power_of_2(heads_per_group)
    if coefficients_by_step:
        _chunk_coefficients_by_step_kernel[(chunk, ngroups, b)](
            *coef_args, DSTATE=d_state, CHUNK=chunk, BLOCK_N=sizes["BLOCK_N"], BLOCK_H=block_h, num_warps=1, **launch)
    else:
        _chunk_coefficients_kernel[(ngroups, b)](*coef_args, BLOCK_H=block_h, num_warps=4, **sizes, **launch)
    _ssm_chunk_step_kernel[(cdiv(headdim, block_p), nheads, b)](
        state, xbc, xbc.stride(0), x_start, C_start, dt_start, z_start or 0, dt_bias, D, y, pending.x, pending.dt,
        pending.slot, coef, nheads, heads_per_group, HEADDIM=headdim, BLOCK_P=block_p, GATE=z_start is not None,
        num_warps=num_warps, **sizes, **launch)
    return y


def ssm_chunk_end(xbc, state, pending, A, dt_bias, D, x_start, ngroups, z_start=None, pdl=True, block_p=None,
                  block_s=None, num_warps=None):
    """ssm_chunk_step and fold_chunk in one kernel, for a step that the caller knows is its chunk's
    last (pending.slot == K - 1 in every row): y as ssm_step's, and the state, S_0 until now,
    becomes h of this step, the K - 1 pending steps and this one added (fold_chunk's sum, on tensor
    cores, in its precision). Nothing is appended to `pending`: once the caller advances the slot
    (to 0) none is pending. Arguments and the result as ssm_chunk_step's; block_p, block_s, num_warps:
    a program's channels, the slices of d_state it writes at a time, and its warps."""
    b, nheads, headdim, d_state = state.shape
    chunk = pending.chunk
    # launch shape measured at 8-128 rows (BENCHMARKS.md §0b): 16 channels (tl.dot's least), one warp
    block_p, num_warps = block_p or 16, num_warps or 1
    block_s = block_s or min(64, max(16, next_power_of_2(d_state)))
    _check_pending("ssm_chunk_end", state, pending, xbc)
    _check_step("ssm_chunk_end", xbc, state, A, dt_bias, D, x_start, ngroups)
    y = torch.empty(b, nheads * headdim, device=xbc.device, dtype=xbc.dtype if z_start is None else torch.float32)
    B_start = x_start + nheads * headdim
    _ssm_chunk_end_kernel[(cdiv(headdim, block_p), nheads, b)](
        state, xbc, xbc.stride(0), x_start, B_start, B_start + ngroups * d_state, xbc.shape[1] - nheads,
        z_start or 0, dt_bias, A, D, y, pending.x, pending.dt, pending.B, pending.acum, pending.slot, nheads,
        nheads // ngroups, ngroups, HEADDIM=headdim, DSTATE=d_state, CHUNK=chunk, BLOCK_P=block_p, BLOCK_S=block_s,
        BLOCK_N=next_power_of_2(d_state), BLOCK_K=max(16, next_power_of_2(chunk)), GATE=z_start is not None,
        PRECISION="tf32x3" if state.element_size() == 4 else "tf32", num_warps=num_warps, **_launch_options(xbc, pdl))
    return y


def _check_step(name, xbc, state, A, dt_bias, D, x_start, ngroups):
    """A one-line ValueError naming what does not fit state (b, nheads, headdim, d_state): A, dt_bias, D
    (nheads,), ngroups that do not divide the heads, or xbc rows too narrow for x at x_start, then B, C and dt."""
    b, nheads, headdim, d_state = state.shape
    for arg, t in (("A", A), ("dt_bias", dt_bias), ("D", D)):
        if tuple(t.shape) != (nheads,):
            raise ValueError(f"{name}: {arg} {tuple(t.shape)} is not ({nheads},) for the state {tuple(state.shape)}")
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"{name}: ngroups {ngroups} does not divide the {nheads} heads")
    width = x_start + nheads * headdim + 2 * ngroups * d_state + nheads
    if xbc.dim() != 2 or xbc.shape[0] != b or xbc.shape[1] < width:
        raise ValueError(f"{name}: xbc {tuple(xbc.shape)} is not ({b}, >= {width}) rows of x from column {x_start}, "
                         f"B, C and dt")


def _check_pending(name, state, pending, xbc=None):
    """A one-line ValueError unless state and pending (and the step's in_proj output xbc) suit the chunk
    kernels."""
    if pending.chunk < 2:
        raise ValueError(f"{name}: chunks of at least 2 steps, got {pending.chunk} (ssm_step is the chunk of one)")
    if not (state.is_contiguous() and all(t.is_contiguous() for t in pending[:4])):
        raise ValueError(f"{name}: the state and the pending steps must be contiguous")
    if xbc is not None and xbc.stride(-1) != 1:
        raise ValueError(f"{name}: xbc's rows must be dense")
    if xbc is not None and xbc.dtype != pending.x.dtype:  # the pending x must hold xbc's values exactly
        raise ValueError(f"{name}: the pending steps' x is {pending.x.dtype}, xbc {xbc.dtype}")
    if state.shape[0] > 65535:  # the grid's last dimension
        raise ValueError(f"{name}: at most 65535 rows, got {state.shape[0]}")


def fold_chunk(state, pending, block_p=None, block_s=None, num_warps=4, programs_per_sm=4, every_row=False):
    """Where a row is at its chunk's last step (pending.slot == K - 1, after that step's
    ssm_chunk_step, before the slot advances), add the chunk's K steps to its state, in place:
    h = exp(acum_last) S_0 + sum_i exp(acum_last - acum_i) dt_i x_i B_i^T, as fold_pending with one
    more step pending; other rows' states stay as they are. One kernel, launched at every step with
    no host synchronisation: its programs return at once when no row ends its chunk. Apart from the
    output's kernels it can run on a stream of its own, beside the layers after this one, as long
    as the next step's kernels of this layer wait for it.

    every_row: fold_pending on the GPU instead: every row adds its pending.slot steps, wherever it is
    in its chunk (the slot left as it is).

    state (b, nheads, headdim, d_state), fp32 or bf16; pending a PendingSteps. block_p, block_s: a
    tile's channels and columns of d_state (default: up to 64 channels, and 8 KiB of state);
    programs_per_sm: the persistent programs launched per SM. The steps' sum is one product per tile
    on tensor cores: in three TF32 products for an fp32 state (about fp32's rounding; fp32
    multiply-adds take twice the registers), in one for a bf16 state (2^-11, below the state's own)."""
    b, nheads, headdim, d_state = state.shape
    chunk, ngroups = pending.chunk, pending.B.shape[-1] // d_state
    _check_pending("fold_chunk", state, pending)
    block_p = block_p or min(64, max(16, next_power_of_2(headdim)))  # tl.dot: 16 or more each way
    block_s = block_s or min(8192 // block_p // state.element_size(), max(16, next_power_of_2(d_state)))
    tiles = b * nheads * cdiv(headdim, block_p) * cdiv(d_state, block_s)
    programs = min(tiles, _sm_count(state.device.index) * programs_per_sm) if state.is_cuda else tiles
    _fold_chunk_kernel[(programs,)](
        state, pending.x, pending.dt, pending.B, pending.acum, pending.slot, b, nheads, nheads // ngroups, ngroups,
        HEADDIM=headdim, DSTATE=d_state, CHUNK=chunk, BLOCK_P=block_p, BLOCK_S=block_s,
        BLOCK_K=max(16, next_power_of_2(chunk)), BLOCK_R=min(128, next_power_of_2(b)),
        PRECISION="tf32x3" if state.element_size() == 4 else "tf32", EVERY_ROW=every_row, num_warps=num_warps)


def fold_pending(state, pending):
    """Add the pending steps to the state, in place: each row's state becomes h of its last step,
    the state the recurrence (ssm_step) would hold. Plain torch, no host synchronisation: state (b,
    nheads, headdim, d_state), pending a PendingSteps. pending.slot is left as it is (the layers
    share it): set it to 0 once every layer is folded."""
    b, h, p, n = state.shape
    K = pending.chunk
    slot = pending.slot.long()
    g = pending.B.shape[-1] // n
    last = pending.acum.gather(1, (slot - 1).clamp(min=0)[:, None, None].expand(b, 1, h))     # (b, 1, h)
    last = torch.where(slot[:, None, None] > 0, last, torch.zeros_like(last))
    ok = torch.arange(K, device=state.device) < slot[:, None]                                 # (b, K)
    w = torch.where(ok[..., None], torch.exp(last - pending.acum), torch.zeros_like(pending.acum))   # (b, K, h)
    xdt = pending.x.to(pending.acum.dtype).view(b, K, h, p) * pending.dt[..., None]
    B = pending.B.to(pending.acum.dtype).view(b, K, g, 1, n).expand(b, K, g, h // g, n).reshape(b, K, h, n)
    added = torch.einsum("bkh,bkhp,bkhn->bhpn", w, xdt, B)
    state.copy_(torch.exp(last)[:, 0, :, None, None] * state.to(added.dtype) + added)

def sample_top_k(logits, noise, cfg_scale, top_k, temperature, steps=None, col=None, fixed=None,
                 next_input=None):
    """The draw of ssmttm.sample_next in one kernel: logits (rows, K, V) with dense rows,
    rows = [conditional; null] when cfg_scale != 1; noise (b, K, V) the contiguous Exp(1) draws
    sample_next would make, or, with steps, a ring of them (slots, b, K, V) of which the kernel
    reads slot col % slots; 1 <= top_k <= V (else ValueError). Returns tokens (b, K). For finite logits (the model's);
    the plain function's rule for a code at -inf in one row (ssmttm.classifier_free_guidance) is not here.

    A decoding frame's bookkeeping, in the same kernel, if steps is given: the token goes into
    column col (a (1,) device tensor) of steps (b, K, n) where fixed (bool, the same layout) is
    False, and that column, fixed slots included, into next_input (b * copies, K, 1), the next
    step's input, if given. The returned tokens are then what was written."""
    rows, K, V = logits.shape
    if not 1 <= top_k <= V:
        raise ValueError(f"sample_top_k: top_k {top_k} is not in 1 ... {V} (V)")
    b = rows // 2 if cfg_scale != 1.0 else rows
    ring = noise.dim() == 4 and steps is not None
    if logits.stride(-1) != 1 or not noise.is_contiguous() or noise.shape[-3:] != (b, K, V) or noise.dim() != 3 + ring:
        raise ValueError("sample_top_k: logits rows must be dense and noise (b, K, V) contiguous "
                         "(with steps, or (slots, b, K, V))")
    out = torch.empty(b, K, device=logits.device, dtype=torch.long)
    copies = 0  # how many input rows of the next step each prompt writes
    if steps is None:  # the pointers of the bookkeeping are never read
        steps = col = fixed = next_input = out
    else:
        if not (steps.stride(-1) == 1 and fixed.stride() == steps.stride() and fixed.dtype == torch.bool
                and steps.shape[:2] == (b, K)):
            raise ValueError("sample_top_k: steps (b, K, n) with dense rows, fixed a bool tensor of its layout")
        copies, next_input = (0, out) if next_input is None else (next_input.shape[0] // b, next_input)
    _sample_top_k_kernel[(b, K)](logits, noise, out, b, V, logits.stride(0), logits.stride(1), float(cfg_scale),
                                 1.0 / temperature, int(top_k), steps, fixed, col, next_input, steps.stride(0),
                                 steps.stride(1), next_input.stride(0), next_input.stride(1),
                                 noise.shape[0] if ring else 1, GUIDANCE=cfg_scale != 1.0,
                                 BLOCK_V=next_power_of_2(V), INTO=steps is not out, COPIES=copies, RING=ring,
                                 num_warps=4)
    return out


def embed_rows(tokens, offsets, table, positions, freqs, advance=False):
    """The input of a decoding step in one kernel: tokens (b, K) ids into the K stacked tables of
    table (K * V, d) at offsets (K,), positions (b,), freqs (d / 2,) the position frequencies.
    Returns (b, d) = sum_k table[tokens[:, k] + offsets[k]] + [cos(pos f) | sin(pos f)].
    advance: then add 1 to positions, in the same kernel. ValueError naming the argument whose shape
    or dtype does not fit: the kernel reads K offsets, b positions and d / 2 frequencies unmasked, so a
    shorter one was read past its end (another tensor's memory, or an illegal address). Shapes only,
    no GPU sync (a decoding step's, recorded into its CUDA graph)."""
    if tokens.dim() != 2 or table.dim() != 2:
        raise ValueError(f"embed_rows: tokens {tuple(tokens.shape)} and table {tuple(table.shape)}: want (b, K) "
                         "and (K * V, d)")
    b, K = tokens.shape
    d = table.shape[1]
    if not table.is_contiguous() or d % 2:
        raise ValueError(f"embed_rows: table {tuple(table.shape)}: want it contiguous, d even (cos and sin halves)")
    for name, t, shape, want in (("offsets", offsets, (K,), "integer"), ("positions", positions, (b,), "integer"),
                                 ("freqs", freqs, (d // 2,), torch.float32)):
        kind_ok = not (t.dtype.is_floating_point or t.dtype == torch.bool) if want == "integer" else t.dtype == want
        if tuple(t.shape) != shape or not kind_ok:
            raise ValueError(f"embed_rows: {name} {tuple(t.shape)} {t.dtype}: want {shape} {want} for tokens "
                             f"{tuple(tokens.shape)} and table {tuple(table.shape)}")
    out = torch.empty(b, d, device=table.device, dtype=table.dtype)
    _embed_rows_kernel[(b,)](tokens, tokens.stride(0), tokens.stride(1), offsets, table, positions, freqs, out, d, K=K,
                             BLOCK_D=next_power_of_2(d), ADVANCE=advance, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------
# Training: Mamba-2's causal depthwise conv + SiLU (width 4), forward and backward, in Triton
#
# Memory-bound passes over (b, l, channels), channels last. Each program owns a block of channels and
# a segment of positions, and walks its positions one row at a time (four rows per loop step, their
# loads issued together), keeping the conv's window in registers: the last three rows of x going
# forwards; going backwards, the next three rows of x and of the pre-activation gradient dz, which
# is made once per position. No row is shifted across threads, and every row of x, dout and dx moves
# once, but for three rows of overlap per segment.

if triton is not None:

    @triton.jit
    def _same(s_tap, s_t, HAS_SEQ: tl.constexpr):
        """1.0 where a tap at sequence index s_tap counts for the output at s_t, else 0.0 (no seq_idx: 1.0)."""
        if HAS_SEQ:
            return (s_tap == s_t).to(tl.float32)
        return 1.0

    @triton.jit
    def _conv_row(ptr, seq_ptr, t, L, c, c_ok, HAS_SEQ: tl.constexpr):
        """Row t of a (L, channels) slice in fp32 (0 outside [0, L)) and its sequence index (-1 outside)."""
        ok = (t >= 0) & (t < L)
        row = tl.load(ptr + c, mask=c_ok & ok, other=0.0).to(tl.float32)
        if HAS_SEQ:
            return row, tl.load(seq_ptr + t, mask=ok, other=-1)
        return row, tl.full((), 0, tl.int32)

    @triton.jit
    def _conv_fwd_step(t, xt, st, x1, x2, x3, s1, s2, s3, w0, w1, w2, w3, bias, out_row, t_lo, t_hi, c_ok,
                       HAS_SEQ: tl.constexpr):
        """out[t] = silu(bias + w3 x[t] + w2 x[t-1] + w1 x[t-2] + w0 x[t-3]), stored if t is the program's."""
        pre = (bias + w3 * xt + w2 * x1 * _same(s1, st, HAS_SEQ) + w1 * x2 * _same(s2, st, HAS_SEQ)
               + w0 * x3 * _same(s3, st, HAS_SEQ))
        tl.store(out_row, (pre * tl.sigmoid(pre)).to(out_row.dtype.element_ty), mask=c_ok & (t >= t_lo) & (t < t_hi))

    @triton.jit
    def _conv_fwd_loads(x_b, seq_b, t, sx_l, L, c, c_ok, HAS_SEQ: tl.constexpr):
        """The rows that _conv_fwd_kernel's four-row step at t reads: x[t] .. x[t+3], with their sequence
        indices."""
        xa, sa = _conv_row(x_b + t * sx_l, seq_b, t, L, c, c_ok, HAS_SEQ)
        xb, sb = _conv_row(x_b + (t + 1) * sx_l, seq_b, t + 1, L, c, c_ok, HAS_SEQ)
        xc, sc = _conv_row(x_b + (t + 2) * sx_l, seq_b, t + 2, L, c, c_ok, HAS_SEQ)
        xd, sd = _conv_row(x_b + (t + 3) * sx_l, seq_b, t + 3, L, c, c_ok, HAS_SEQ)
        return xa, sa, xb, sb, xc, sc, xd, sd

    @triton.jit
    def _one_sequence(seq_b, r_lo, r_hi, L, BLOCK: tl.constexpr):
        """Whether the rows of [r_lo, r_hi) that lie in [0, L) all carry one sequence index (r_hi - r_lo <=
        BLOCK). A segment for which this holds needs no masks: walked as without seq_idx, it computes the
        same sums, since a row outside [0, L) reads 0 either way (rounded alike only up to the order the
        compiler fuses the multiply-adds in, which the masks' products change)."""
        r = r_lo + tl.arange(0, BLOCK)
        ok = (r >= 0) & (r < L) & (r < r_hi)
        s = tl.load(seq_b + r, mask=ok, other=0)
        return tl.min(tl.where(ok, s, 2147483647), axis=0) == tl.max(tl.where(ok, s, -2147483647), axis=0)

    @triton.jit
    def _conv_fwd_walk(x_b, seq_b, o_b, sx_l, so_l, L, c, c_ok, t_lo, t_hi, w0, w1, w2, w3, bias,
                       SEG: tl.constexpr, HAS_SEQ: tl.constexpr, PREFETCH: tl.constexpr):
        """_conv_fwd_kernel's walk over one segment [t_lo, t_hi) of positions for the channels c."""
        x1, s1 = _conv_row(x_b + (t_lo - 1) * sx_l, seq_b, t_lo - 1, L, c, c_ok, HAS_SEQ)   # x[t-1], x[t-2], x[t-3]
        x2, s2 = _conv_row(x_b + (t_lo - 2) * sx_l, seq_b, t_lo - 2, L, c, c_ok, HAS_SEQ)
        x3, s3 = _conv_row(x_b + (t_lo - 3) * sx_l, seq_b, t_lo - 3, L, c, c_ok, HAS_SEQ)
        if PREFETCH:  # the first step's loads; each step then loads the next one's before it computes
            xa, sa, xb, sb, xc, sc, xd, sd = _conv_fwd_loads(x_b, seq_b, t_lo, sx_l, L, c, c_ok, HAS_SEQ)
        for i in range(SEG // 4):                                      # past t_hi nothing is stored
            t = t_lo + 4 * i
            if PREFETCH:
                ya, ua, yb, ub, yc, uc, yd, ud = _conv_fwd_loads(x_b, seq_b, t + 4, sx_l, L, c, c_ok, HAS_SEQ)
            else:
                xa, sa, xb, sb, xc, sc, xd, sd = _conv_fwd_loads(x_b, seq_b, t, sx_l, L, c, c_ok, HAS_SEQ)
            _conv_fwd_step(t, xa, sa, x1, x2, x3, s1, s2, s3, w0, w1, w2, w3, bias, o_b + t * so_l + c, t_lo, t_hi,
                           c_ok, HAS_SEQ)
            _conv_fwd_step(t + 1, xb, sb, xa, x1, x2, sa, s1, s2, w0, w1, w2, w3, bias, o_b + (t + 1) * so_l + c,
                           t_lo, t_hi, c_ok, HAS_SEQ)
            _conv_fwd_step(t + 2, xc, sc, xb, xa, x1, sb, sa, s1, w0, w1, w2, w3, bias, o_b + (t + 2) * so_l + c,
                           t_lo, t_hi, c_ok, HAS_SEQ)
            _conv_fwd_step(t + 3, xd, sd, xc, xb, xa, sc, sb, sa, w0, w1, w2, w3, bias, o_b + (t + 3) * so_l + c,
                           t_lo, t_hi, c_ok, HAS_SEQ)
            x1, x2, x3, s1, s2, s3 = xd, xc, xb, sd, sc, sb
            if PREFETCH:
                xa, sa, xb, sb, xc, sc, xd, sd = ya, ua, yb, ub, yc, uc, yd, ud

    @triton.jit
    def _conv_fwd_kernel(x_ptr, sx_b, sx_l, w_ptr, b_ptr, seq_ptr, out_ptr, so_b, so_l, L, L_OUT, C,
                         SEG: tl.constexpr, HAS_SEQ: tl.constexpr, BC: tl.constexpr, PREFETCH: tl.constexpr):
        """Grid (channel blocks, segments of SEG positions of the output's L_OUT >= L rows, batch rows); SEG a
        multiple of 4; the output's rows past L are zeros. With seq_idx, a segment whose positions and the
        three before them are one sequence (all but one segment of a left-padded row) is walked without its
        masks. PREFETCH: each four-row step issues the next step's loads before its own arithmetic (the
        compiler does not pipeline this loop), so that they are in flight meanwhile."""
        bi = tl.program_id(2).to(tl.int64)
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        c_ok = c < C
        t_lo = tl.program_id(1) * SEG
        t_hi = tl.minimum(t_lo + SEG, L)
        x_b, o_b, seq_b = x_ptr + bi * sx_b, out_ptr + bi * so_b, seq_ptr + bi * L
        for t in range(tl.maximum(t_lo, L), tl.minimum(t_lo + SEG, L_OUT)):  # rows past L: only the last segments
            tl.store(o_b + t * so_l + c, tl.zeros((BC,), dtype=out_ptr.dtype.element_ty), mask=c_ok)
        w0 = tl.load(w_ptr + c * 4, mask=c_ok, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + c * 4 + 1, mask=c_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + c * 4 + 2, mask=c_ok, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + c * 4 + 3, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if t_lo < L:  # (a segment past L holds zeros only)
            if HAS_SEQ:
                if _one_sequence(seq_b, t_lo - 3, t_hi, L, 2 * SEG):
                    _conv_fwd_walk(x_b, seq_b, o_b, sx_l, so_l, L, c, c_ok, t_lo, t_hi, w0, w1, w2, w3, bias, SEG,
                                   False, PREFETCH)
                else:
                    _conv_fwd_walk(x_b, seq_b, o_b, sx_l, so_l, L, c, c_ok, t_lo, t_hi, w0, w1, w2, w3, bias, SEG,
                                   True, PREFETCH)
            else:
                _conv_fwd_walk(x_b, seq_b, o_b, sx_l, so_l, L, c, c_ok, t_lo, t_hi, w0, w1, w2, w3, bias, SEG, False,
                               PREFETCH)

    @triton.jit
    def _conv_bwd_step(t, xa, xb, xc, xd, sa, sb, sc, sd, dout, d1, d2, d3, r1, r2, r3, w0, w1, w2, w3, bias,
                       dw0, dw1, dw2, dw3, db, dx_row, t_lo, t_hi, c_ok, HAS_SEQ: tl.constexpr):
        """Position t, going backwards: xa..xd = x[t], x[t-1], x[t-2], x[t-3] (sequence indices sa..sd), dout
        = dout[t]; d1..d3 = dz[t+1], dz[t+2], dz[t+3] (sequence indices r1..r3). Makes dz[t] (the gradient
        of the pre-activation, as silu' at the pre-activation made again), stores dx[t] = w3 dz[t] + w2 dz[t+1]
        + w1 dz[t+2] + w0 dz[t+3] and adds to the weight and bias sums if t is the program's; returns dz[t]
        and the sums."""
        m1, m2, m3 = _same(sb, sa, HAS_SEQ), _same(sc, sa, HAS_SEQ), _same(sd, sa, HAS_SEQ)
        pre = bias + w3 * xa + w2 * xb * m1 + w1 * xc * m2 + w0 * xd * m3
        sig = tl.sigmoid(pre)
        dz = dout * sig * (1.0 + pre * (1.0 - sig))
        dx = (w3 * dz + w2 * d1 * _same(r1, sa, HAS_SEQ) + w1 * d2 * _same(r2, sa, HAS_SEQ)
              + w0 * d3 * _same(r3, sa, HAS_SEQ))
        own = (t >= t_lo) & (t < t_hi)
        tl.store(dx_row, dx.to(dx_row.dtype.element_ty), mask=c_ok & own)
        dz_own = tl.where(own, dz, 0.0)
        return (dz, dw0 + dz_own * xd * m3, dw1 + dz_own * xc * m2, dw2 + dz_own * xb * m1, dw3 + dz_own * xa,
                db + dz_own)

    @triton.jit
    def _conv_bwd_loads(x_b, d_b, seq_b, t, sx_l, sd_l, L, c, c_ok, HAS_SEQ: tl.constexpr):
        """The rows that _conv_bwd_kernel's four-row step at t reads: x[t-3] .. x[t-6] with their sequence
        indices, and dout[t] .. dout[t-3]."""
        x3, s3 = _conv_row(x_b + (t - 3) * sx_l, seq_b, t - 3, L, c, c_ok, HAS_SEQ)
        x4, s4 = _conv_row(x_b + (t - 4) * sx_l, seq_b, t - 4, L, c, c_ok, HAS_SEQ)
        x5, s5 = _conv_row(x_b + (t - 5) * sx_l, seq_b, t - 5, L, c, c_ok, HAS_SEQ)
        x6, s6 = _conv_row(x_b + (t - 6) * sx_l, seq_b, t - 6, L, c, c_ok, HAS_SEQ)
        g0, _ = _conv_row(d_b + t * sd_l, seq_b, t, L, c, c_ok, False)
        g1, _ = _conv_row(d_b + (t - 1) * sd_l, seq_b, t - 1, L, c, c_ok, False)
        g2, _ = _conv_row(d_b + (t - 2) * sd_l, seq_b, t - 2, L, c, c_ok, False)
        g3, _ = _conv_row(d_b + (t - 3) * sd_l, seq_b, t - 3, L, c, c_ok, False)
        return x3, s3, x4, s4, x5, s5, x6, s6, g0, g1, g2, g3

    @triton.jit
    def _conv_bwd_walk(x_b, d_b, dx_b, seq_b, part, sx_l, sd_l, sdx_l, L, C, c, c_ok, t_lo, t_hi, w0, w1, w2, w3,
                       bias, SEG: tl.constexpr, HAS_SEQ: tl.constexpr, BC: tl.constexpr, PREFETCH: tl.constexpr):
        """_conv_bwd_kernel's walk over one segment [t_lo, t_hi) of positions for the channels c; stores the
        segment's sums for the weight's taps 0..3 and the bias at part: the weight's as a (C, 4) block, then
        the bias's C."""
        dw0 = tl.zeros((BC,), tl.float32)
        dw1, dw2, dw3, db = dw0, dw0, dw0, dw0
        d1, d2, d3 = dw0, dw0, dw0                                      # dz[t+1], dz[t+2], dz[t+3]
        r1 = tl.full((), -1, tl.int32)                                   # their sequence indices
        r2, r3 = r1, r1
        t0 = t_hi + 3
        xa, sa = _conv_row(x_b + t0 * sx_l, seq_b, t0, L, c, c_ok, HAS_SEQ)          # x[t], x[t-1], x[t-2]
        xb, sb = _conv_row(x_b + (t0 - 1) * sx_l, seq_b, t0 - 1, L, c, c_ok, HAS_SEQ)
        xc, sc = _conv_row(x_b + (t0 - 2) * sx_l, seq_b, t0 - 2, L, c, c_ok, HAS_SEQ)
        if PREFETCH:  # the first step's loads; each step then loads the next one's before it computes
            x3, s3, x4, s4, x5, s5, x6, s6, g0, g1, g2, g3 = _conv_bwd_loads(x_b, d_b, seq_b, t0, sx_l, sd_l, L, c,
                                                                             c_ok, HAS_SEQ)
        for i in range(SEG // 4 + 1):                                  # below t_lo, stores and sums are masked
            t = t0 - 4 * i
            if PREFETCH:
                n3, m3, n4, m4, n5, m5, n6, m6, h0, h1, h2, h3 = _conv_bwd_loads(x_b, d_b, seq_b, t - 4, sx_l, sd_l,
                                                                                 L, c, c_ok, HAS_SEQ)
            else:
                x3, s3, x4, s4, x5, s5, x6, s6, g0, g1, g2, g3 = _conv_bwd_loads(x_b, d_b, seq_b, t, sx_l, sd_l, L,
                                                                                 c, c_ok, HAS_SEQ)
            e0, dw0, dw1, dw2, dw3, db = _conv_bwd_step(t, xa, xb, xc, x3, sa, sb, sc, s3, g0, d1, d2, d3, r1, r2, r3,
                                                        w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
                                                        dx_b + t * sdx_l + c, t_lo, t_hi, c_ok, HAS_SEQ)
            e1, dw0, dw1, dw2, dw3, db = _conv_bwd_step(t - 1, xb, xc, x3, x4, sb, sc, s3, s4, g1, e0, d1, d2, sa, r1,
                                                        r2, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
                                                        dx_b + (t - 1) * sdx_l + c, t_lo, t_hi, c_ok, HAS_SEQ)
            e2, dw0, dw1, dw2, dw3, db = _conv_bwd_step(t - 2, xc, x3, x4, x5, sc, s3, s4, s5, g2, e1, e0, d1, sb, sa,
                                                        r1, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
                                                        dx_b + (t - 2) * sdx_l + c, t_lo, t_hi, c_ok, HAS_SEQ)
            e3, dw0, dw1, dw2, dw3, db = _conv_bwd_step(t - 3, x3, x4, x5, x6, s3, s4, s5, s6, g3, e2, e1, e0, sc, sb,
                                                        sa, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
                                                        dx_b + (t - 3) * sdx_l + c, t_lo, t_hi, c_ok, HAS_SEQ)
            d1, d2, d3, r1, r2, r3 = e3, e2, e1, s3, sc, sb
            xa, xb, xc, sa, sb, sc = x4, x5, x6, s4, s5, s6
            if PREFETCH:
                x3, s3, x4, s4, x5, s5, x6, s6, g0, g1, g2, g3 = n3, m3, n4, m4, n5, m5, n6, m6, h0, h1, h2, h3
        tl.store(part + c * 4, dw0, mask=c_ok)
        tl.store(part + c * 4 + 1, dw1, mask=c_ok)
        tl.store(part + c * 4 + 2, dw2, mask=c_ok)
        tl.store(part + c * 4 + 3, dw3, mask=c_ok)
        tl.store(part + 4 * C + c, db, mask=c_ok)

    @triton.jit
    def _conv_bwd_kernel(x_ptr, sx_b, sx_l, w_ptr, b_ptr, seq_ptr, dout_ptr, sd_b, sd_l, dx_ptr, sdx_b, sdx_l,
                         parts_ptr, L, C, SEG: tl.constexpr, HAS_SEQ: tl.constexpr, BC: tl.constexpr,
                         PREFETCH: tl.constexpr):
        """Grid (channel blocks, segments of SEG positions, batch rows); SEG a multiple of 4, at least 8. Walks
        from the segment's end + 3 down to its start (the first four rows only make dz for the rows after the
        segment, whose dx is another program's; in a short last segment, rows before the start are walked
        too, and not stored). With seq_idx, a segment whose positions and the three on either side are one
        sequence is walked without its masks. The weight's and bias's sums over the segment go to parts
        (b, segments, 5 C): the weight's as a (C, 4) block, then the bias's C. PREFETCH: each four-row step
        issues the next step's loads before its own arithmetic (the compiler does not pipeline this loop),
        so that they are in flight meanwhile."""
        tl.static_assert(SEG >= 8)                                      # _one_sequence's block holds SEG + 6 rows
        bi = tl.program_id(2).to(tl.int64)
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        c_ok = c < C
        t_lo = tl.program_id(1) * SEG
        t_hi = tl.minimum(t_lo + SEG, L)
        x_b, d_b, dx_b, seq_b = x_ptr + bi * sx_b, dout_ptr + bi * sd_b, dx_ptr + bi * sdx_b, seq_ptr + bi * L
        w0 = tl.load(w_ptr + c * 4, mask=c_ok, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + c * 4 + 1, mask=c_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + c * 4 + 2, mask=c_ok, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + c * 4 + 3, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        part = parts_ptr + (bi * tl.num_programs(1) + tl.program_id(1)) * 5 * C
        if HAS_SEQ:
            if _one_sequence(seq_b, t_lo - 3, t_hi + 3, L, 2 * SEG):
                _conv_bwd_walk(x_b, d_b, dx_b, seq_b, part, sx_l, sd_l, sdx_l, L, C, c, c_ok, t_lo, t_hi, w0, w1, w2,
                               w3, bias, SEG, False, BC, PREFETCH)
            else:
                _conv_bwd_walk(x_b, d_b, dx_b, seq_b, part, sx_l, sd_l, sdx_l, L, C, c, c_ok, t_lo, t_hi, w0, w1, w2,
                               w3, bias, SEG, True, BC, PREFETCH)
        else:
            _conv_bwd_walk(x_b, d_b, dx_b, seq_b, part, sx_l, sd_l, sdx_l, L, C, c, c_ok, t_lo, t_hi, w0, w1, w2, w3,
                           bias, SEG, False, BC, PREFETCH)

    @triton.jit
    def _conv_bwd_sum_kernel(parts_ptr, rows, C, dw_ptr, db_ptr, BR: tl.constexpr, BCOL: tl.constexpr):
        """Grid (column blocks of BCOL,): each column j of parts (rows, 5 C) summed over its rows in a fixed
        order, BR rows per load, into dw's (C, 4) values for j < 4 C, else into db[j - 4 C]."""
        j = tl.program_id(0) * BCOL + tl.arange(0, BCOL)
        j_ok = j < 5 * C
        acc = tl.zeros((BCOL,), tl.float32)
        for r0 in range(0, rows, BR):
            r = r0 + tl.arange(0, BR)
            tile = tl.load(parts_ptr + r[:, None].to(tl.int64) * (5 * C) + j[None, :],
                           mask=(r < rows)[:, None] & j_ok[None, :], other=0.0)
            acc += tl.sum(tile, axis=0)
        tl.store(dw_ptr + j, acc, mask=j < 4 * C)
        tl.store(db_ptr + (j - 4 * C), acc, mask=j_ok & (j >= 4 * C))


# launch shapes (channels per program, positions per segment, warps): the fastest of
# `bench_ssd_grouped.py --sweep conv` on an H200, for each pass; the prefetch pays with left padding
# (seq_idx, which training passes with a text mask) and costs nothing without. The backward's segments
# are the fastest with left padding: the segment holding a sequence's start takes the masked walk, the
# slowest program of the grid, and a shorter segment shortens it.
_CONV_FWD = dict(BC=128, SEG=64, num_warps=1, PREFETCH=True)
_CONV_BWD = dict(BC=128, SEG=128, num_warps=1, PREFETCH=True)
# the parts' sum: many programs of a few large loads each (at issue 15's shape 336 rows, two loads), not a loop
# of many small dependent loads
_CONV_SUM = dict(BR=256, BCOL=32, num_warps=4)


def _conv_args(x, weight, seq_idx, name):
    """Checks (x channels dense, weight (channels, 4), seq_idx (b, l) int32 or None); returns b, l, channels, the
    weight contiguous, and the sequence indices' pointer (x itself, never read, without seq_idx)."""
    b, l, ch = x.shape
    if x.stride(2) != 1 or weight.shape != (ch, 4):
        raise ValueError(f"{name}: x {tuple(x.shape)} with strides {x.stride()} (channels must be dense) and weight "
                         f"{tuple(weight.shape)} (channels, width 4) do not match")
    if seq_idx is not None and (seq_idx.shape != (b, l) or seq_idx.dtype != torch.int32):
        raise ValueError(f"{name}: seq_idx {tuple(seq_idx.shape)} {seq_idx.dtype} is not ({b}, {l}) int32")
    return b, l, ch, weight.contiguous(), x if seq_idx is None else seq_idx.contiguous()


def causal_conv_silu(x, weight, bias, seq_idx=None, rows=None, launch=as_is):
    """Mamba-2's causal depthwise conv over time, then SiLU, channels last, in Triton (CUDA, or
    TRITON_INTERPRET=1): out[b, t, c] = silu(bias[c] + sum_k weight[c, k] x[b, t - 3 + k, c]), a tap before
    the row's start or in another sequence than t's reading 0 (seq_idx as causal-conv1d's: (b, l) int32,
    here 0 at left padding and 1 at the sequence). x (b, l, channels) with channels dense; its rows may
    lie apart (xBC's columns of zxbcdt). weight (channels, 4), bias (channels,). Returns (b, rows, channels),
    contiguous, in x's dtype, computed in fp32 and rounded once, zeros past row l: rows >= l (default l), so
    that the grouped SSD takes B and C in whole chunks as views (ssd_grouped.padded_rows). The plain form:
    ssmttm.Mamba2's conv, then F.silu. Raises ValueError for rows < l, and for x, weight, bias or seq_idx
    of shapes that do not match; TypeError for rows that are not an integer."""
    b, l, ch, weight, seq = _conv_args(x, weight, seq_idx, "causal_conv_silu")
    if bias.shape != (ch,):
        raise ValueError(f"causal_conv_silu: bias {tuple(bias.shape)} is not ({ch},)")
    rows = l if rows is None else rows
    check_integer("causal_conv_silu: rows", rows)  # 16.0 failed in new_empty, True passed as 1 row; a SymInt passes
    if rows < l:
        raise ValueError(f"causal_conv_silu: rows {rows} is fewer than x's {l}")
    out = x.new_empty(b, rows, ch)
    grid = (cdiv(ch, _CONV_FWD["BC"]), cdiv(rows, _CONV_FWD["SEG"]), b)
    launch(_conv_fwd_kernel)[grid](x, x.stride(0), x.stride(1), weight, bias, seq, out, out.stride(0), out.stride(1),
                                   l, rows, ch, HAS_SEQ=seq_idx is not None, **_CONV_FWD)
    return out


def causal_conv_silu_backward(dout, x, weight, bias, seq_idx=None, dx_out=None, launch=as_is):
    """causal_conv_silu's backward from dout (b, l, channels), the gradient of its output, channels dense;
    the pre-activation is made again from x. Returns dx (into dx_out if given: (b, l, channels) with
    channels dense, any row stride; else new, in x's dtype), and dweight (channels, 4) and dbias
    (channels,) in fp32, summed in a fixed order (deterministic)."""
    b, l, ch, weight, seq = _conv_args(x, weight, seq_idx, "causal_conv_silu_backward")
    if bias.shape != (ch,):
        raise ValueError(f"causal_conv_silu_backward: bias {tuple(bias.shape)} is not ({ch},)")
    for name, t in (("dout", dout), ("dx_out", dx_out)):
        if t is not None and (t.shape != x.shape or t.stride(2) != 1):
            raise ValueError(f"causal_conv_silu_backward: {name} {tuple(t.shape)} with strides {t.stride()} does not "
                             f"match x {tuple(x.shape)} with channels dense")
    dx = torch.empty_like(x) if dx_out is None else dx_out
    segments = cdiv(l, _CONV_BWD["SEG"])
    parts = torch.empty(b * segments, 5 * ch, device=x.device, dtype=torch.float32)
    launch(_conv_bwd_kernel)[(cdiv(ch, _CONV_BWD["BC"]), segments, b)](
        x, x.stride(0), x.stride(1), weight, bias, seq, dout, dout.stride(0), dout.stride(1), dx, dx.stride(0),
        dx.stride(1), parts, l, ch, HAS_SEQ=seq_idx is not None, **_CONV_BWD)
    # each its own tensor, not views of one buffer (the training op's outputs may not share storage)
    dweight, dbias = torch.empty(ch, 4, device=x.device), torch.empty(ch, device=x.device)
    launch(_conv_bwd_sum_kernel)[(cdiv(5 * ch, _CONV_SUM["BCOL"]),)](
        parts, b * segments, ch, dweight, dbias, BR=min(_CONV_SUM["BR"], next_power_of_2(b * segments)),
        BCOL=_CONV_SUM["BCOL"], num_warps=_CONV_SUM["num_warps"])
    return dx, dweight, dbias


# ------------------------------------------------------------------------------------------------
# Training: one Mamba-2 layer, forward and backward, from mamba-ssm's kernels

try:  # mamba-ssm's internal kernels, as of 2.3 (tested: 2.3.2); else Mamba2 uses mamba_split_conv1d_scan_combined
    import mamba_ssm
    if tuple(int(v) for v in mamba_ssm.__version__.split(".")[:2]) < (2, 3):
        raise ImportError(f"mamba-ssm {mamba_ssm.__version__}: mamba2_train calls the internals of 2.3")
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd, _layer_norm_fwd
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import (_chunk_scan_bwd_dC, _chunk_scan_bwd_dcb,
                                                     _chunk_scan_bwd_ddAcs_stable, _chunk_scan_bwd_dstates,
                                                     _chunk_scan_fwd)
    from mamba_ssm.ops.triton.ssd_chunk_state import (_chunk_cumsum_bwd, _chunk_cumsum_fwd, _chunk_state_bwd_db,
                                                      _chunk_state_fwd)
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx, ensure_stride
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd
    HAS_TRAIN_KERNELS = True
except Exception:  # no CUDA, no mamba-ssm or causal-conv1d, or a mamba-ssm whose internals moved
    HAS_TRAIN_KERNELS = False


# ------------------------------------------------------------------------------------------------
# Dropout masks drawn in the kernels from a seed, and drawn again in the backward rather than kept

if triton is not None:

    @triton.jit
    def _keep_eight(seed_ptr, groups, threshold):
        """The dropout mask of the seed at seed_ptr, for the elements 8 g .. 8 g + 7 of each counter g in
        groups (int64, any shape): keep (groups' shape, 8), whether each survives. One Philox call per
        counter gives four 32-bit numbers, read as eight 16-bit ones, one per element: element e is kept
        iff number e % 8 of Philox(seed, e // 8) is >= threshold = round(p 2^16). Every dropout kernel
        here draws by this rule, so a mask is a function of (seed, flat element index) alone."""
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)
        j = tl.arange(0, 8)
        r = tl.where(j < 4, tl.where(j < 2, tl.expand_dims(r0, -1), tl.expand_dims(r1, -1)),
                     tl.where(j < 6, tl.expand_dims(r2, -1), tl.expand_dims(r3, -1)))
        return ((r >> (j % 2 * 16)) & 0xFFFF).to(tl.int32) >= threshold

    @triton.jit
    def _dropout_keep_rows(seed_ptr, rows, N, threshold, BM: tl.constexpr, BN: tl.constexpr):
        """keep (BM, BN): whether the element at column c < BN of row r (int64, BM of them) of a dropout
        over rows of N values survives, by _keep_eight's rule at its flat index r N + c. N % 8 == 0 and
        BN % 8 == 0: each eight lie in one row, and one Philox call serves them."""
        groups = rows[:, None] * (N // 8) + tl.arange(0, BN // 8)[None, :]
        return tl.reshape(_keep_eight(seed_ptr, groups, threshold), BM, BN)


# ------------------------------------------------------------------------------------------------
# Training: RMSNorm forward and backward in Triton, with the residual add or Mamba-2's gate fused in.
# The backward walks many rows per program, several programs per SM, rather than one row at a time
# per SM (mamba-ssm's layer norm backward, which waits on each row's loads in turn).

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, sx, res_ptr, sres, z_ptr, sz, w_ptr, out_ptr, sum_ptr, rstd_ptr, seed_ptr, M, N,
                             eps, threshold, scale, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, DROPOUT: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr):
        """For BM rows of N values: s = x (DROPOUT: x's dropout, x scale where kept, else 0; + res, then
        written to sum in fp32), g = s (* silu(z)), rstd = 1 / sqrt(mean(g^2) + eps) to rstd (M,), out = g
        rstd w in out's dtype. x, res and z with rows sx, sres and sz elements apart; sum and out N apart.
        Grid (cdiv(M, BM),)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BN)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        r = rows.to(tl.int64)[:, None]
        s = tl.load(x_ptr + r * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if DROPOUT:
            s = tl.where(_dropout_keep_rows(seed_ptr, rows.to(tl.int64), N, threshold, BM, BN), s * scale, 0.0)
        if HAS_RES:
            s = tl.load(res_ptr + r * sres + cols[None, :], mask=ok, other=0.0).to(tl.float32) + s
            tl.store(sum_ptr + r * N + cols[None, :], s, mask=ok)
        if HAS_Z:
            z = tl.load(z_ptr + r * sz + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            s = s * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * N + cols[None, :], (s * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _norm_bwd_loads(rows, M, cols, c_ok, s_ptr, ss, z_ptr, sz, dout_ptr, sdo, rstd_ptr, HAS_Z: tl.constexpr):
        """_rms_norm_bwd_kernel's inputs of these rows, as stored (z is s without HAS_Z): s, z, dout, rstd."""
        ok = (rows < M)[:, None] & c_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        s = tl.load(s_ptr + r * ss + cols[None, :], mask=ok, other=0.0)
        z = s
        if HAS_Z:
            z = tl.load(z_ptr + r * sz + cols[None, :], mask=ok, other=0.0)
        dout = tl.load(dout_ptr + r * sdo + cols[None, :], mask=ok, other=0.0)
        return s, z, dout, tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)

    @triton.jit
    def _rms_norm_bwd_kernel(dout_ptr, sdo, s_ptr, ss, z_ptr, sz, w_ptr, rstd_ptr, dsum_ptr, dx_ptr, dx32_ptr,
                             dz_ptr, sdz, out_ptr, dw_ptr, seed_ptr, M, N, threshold, scale, HAS_Z: tl.constexpr,
                             HAS_DSUM: tl.constexpr, HAS_DX32: tl.constexpr, RECOMPUTE: tl.constexpr,
                             DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """_rms_norm_fwd_kernel's backward from dout, the gradient of out, for the row blocks pid, pid +
        programs, ...: with g = s (* silu(z)) and xhat = g rstd, dg = rstd (dout w - xhat mean(dout w xhat));
        ds = dg (* silu(z)) (+ dsum, the gradient that reached s itself: the residual stream's), to dx32 in
        fp32 (HAS_DX32), and to dx in its dtype: through the forward's dropout with DROPOUT (ds scale where
        its mask, drawn again from the seed, kept x, else 0); dz = dg s silu'(z) (HAS_Z); out = xhat w again
        (RECOMPUTE); this program's share of dw = sum over rows of dout xhat to dw (programs, N) fp32. dout,
        s, z and dz with rows sdo, ss, sz and sdz elements apart; dsum, dx, dx32 and out N apart. Grid
        (programs,)."""
        pid, programs = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BN)
        c_ok = cols < N
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros((BM, BN), dtype=tl.float32)
        # Each step loads the next row block before it works on this one, so that the loads of one overlap
        # the arithmetic and stores of the other (Triton does not pipeline these loads by itself).
        s_next, z_next, dout_next, rstd_next = _norm_bwd_loads(pid * BM + tl.arange(0, BM), M, cols, c_ok, s_ptr, ss,
                                                               z_ptr, sz, dout_ptr, sdo, rstd_ptr, HAS_Z)
        for r0 in range(pid * BM, M, programs * BM):
            rows = r0 + tl.arange(0, BM)
            ok = (rows < M)[:, None] & c_ok[None, :]
            r = rows.to(tl.int64)[:, None]
            s, z, dout, rstd = s_next.to(tl.float32), z_next.to(tl.float32), dout_next.to(tl.float32), rstd_next
            s_next, z_next, dout_next, rstd_next = _norm_bwd_loads(rows + programs * BM, M, cols, c_ok, s_ptr, ss,
                                                                   z_ptr, sz, dout_ptr, sdo, rstd_ptr, HAS_Z)
            rstd = rstd[:, None]
            g = s
            if HAS_Z:
                sig = tl.sigmoid(z)
                g = s * z * sig
            xhat = g * rstd
            dw += dout * xhat
            wd = dout * w
            dg = (wd - xhat * (tl.sum(wd * xhat, axis=1) / N)[:, None]) * rstd
            if RECOMPUTE:
                tl.store(out_ptr + r * N + cols[None, :], (xhat * w).to(out_ptr.dtype.element_ty), mask=ok)
            if HAS_Z:
                tl.store(dz_ptr + r * sdz + cols[None, :], (dg * s * sig * (1.0 + z * (1.0 - sig))).to(
                    dz_ptr.dtype.element_ty), mask=ok)
                dg = dg * z * sig
            if HAS_DSUM:
                dg += tl.load(dsum_ptr + r * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_DX32:
                tl.store(dx32_ptr + r * N + cols[None, :], dg, mask=ok)
            if DROPOUT:
                dg = tl.where(_dropout_keep_rows(seed_ptr, rows.to(tl.int64), N, threshold, BM, BN), dg * scale, 0.0)
            tl.store(dx_ptr + r * N + cols[None, :], dg.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dw_ptr + pid * N + cols, tl.sum(dw, axis=0), mask=c_ok)


# Elements per row block (rows = this / the padded row length) and the launch options (warps) of the
# two kernels; the backward runs PER_SM programs per SM (its loop covers the rest): at 8 warps and
# d_inner 2048 its registers let two fit (a local sm_90 / sm_80 compile), so that none waits for
# another's slot. Chosen by bench_ssd_grouped.py --sweep norm and an A/B on an H200 (BENCHMARKS.md).
_NORM_FWD = dict(ELEMS=4096, num_warps=8)
_NORM_BWD = dict(ELEMS=2048, num_warps=8, PER_SM=2)


def _rows_2d(name, t, M, N):
    """t as (M, N) with dense rows (any row stride), or a one-line ValueError naming it."""
    if t.dim() != 2 or t.shape != (M, N) or t.stride(1) != 1:
        raise ValueError(f"{name}: {tuple(t.shape)} with strides {t.stride()} is not ({M}, {N}) with dense rows")
    return t


@functools.cache
def _sm_count(device_index):
    """The number of SMs of a CUDA device (cached: the properties' query costs host time at every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def rms_norm_fwd(x, weight, eps, residual=None, z=None, dropout=0.0, seed=None, launch=as_is):
    """RMSNorm in Triton (CUDA, or TRITON_INTERPRET=1), with the residual add before it or Mamba-2's gate
    (ssmttm.GatedRMSNorm: the norm of x * silu(z)) inside it: x (M, N) with dense rows, any row stride;
    residual, z (M, N) likewise or None; weight (N,). Returns out = rms_norm(x (+ residual) (* silu(z))) *
    weight (M, N) in x's dtype, the sum x + residual in fp32 (None without residual: the backward's
    input), and rstd (M,) fp32. Computed in fp32, rounded once. dropout (0 < p < 1, with a residual and
    N % 8 == 0): x's dropout before the add, its mask drawn from seed ((1,) int64) by _keep_eight's rule
    at x's flat index, the rate a multiple of 2^-16 (_dropout_launch), kept values scaled by 1 / (1 - p).
    ValueError naming x, residual, z or weight where its shape or rows are not as above."""
    M, N = x.shape
    _rows_2d("rms_norm_fwd: x", x, M, N)
    if weight.shape != (N,):
        raise ValueError(f"rms_norm_fwd: weight {tuple(weight.shape)} is not ({N},)")
    for name, t in (("residual", residual), ("z", z)):
        if t is not None:
            _rows_2d(f"rms_norm_fwd: {name}", t, M, N)
    threshold, scale = _norm_dropout("rms_norm_fwd", dropout, seed, N, residual is not None)
    out = x.new_empty(M, N)
    summed = None if residual is None else torch.empty(M, N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    bn = next_power_of_2(N)
    bm = max(1, _NORM_FWD["ELEMS"] // bn)
    launch(_rms_norm_fwd_kernel)[(cdiv(M, bm),)](
        x, x.stride(0), x if residual is None else residual, 0 if residual is None else residual.stride(0),
        x if z is None else z, 0 if z is None else z.stride(0), weight, out, out if summed is None else summed, rstd,
        rstd if seed is None else seed, M, N, eps, threshold, scale, HAS_RES=residual is not None, HAS_Z=z is not None,
        DROPOUT=bool(dropout), BM=bm, BN=bn, **{k: v for k, v in _NORM_FWD.items() if k != "ELEMS"})
    return out, summed, rstd


def _norm_dropout(name, p, seed, N, has_residual):
    """The norm kernels' threshold and scale for x's dropout at rate p (0: none), or a one-line ValueError
    naming what stands in its way."""
    if not p:
        return 0, 1.0
    if not 0 < p < 1 or seed is None or not has_residual or N % 8:
        raise ValueError(f"{name}: a dropout needs 0 < p < 1 (got {p}), its seed, a residual and rows of a multiple "
                         f"of 8 values (got {N})")
    return _dropout_launch(1, p)[1:]


def rms_norm_bwd(dout, s, weight, rstd, z=None, dsum=None, dx_dtype=None, dx32=False, dz_out=None, out=None,
                 dropout=0.0, seed=None, launch=as_is):
    """rms_norm_fwd's backward: dout (M, N), the gradient of its output; s (M, N), the norm's input before
    the gate (x, or the fp32 sum x + residual); weight; rstd (M,) from the forward; z (M, N) or None;
    dsum (M, N) or None, a gradient that reached s itself (the residual stream's), added to dx. dout, s
    and z with dense rows, any row stride. Returns dx (M, N) in dx_dtype (default s's), dx in fp32 as well
    if dx32 (else None), dz (into dz_out if given: (M, N) with dense rows, any row stride; else new in z's
    dtype; None without z), and dweight (N,) fp32. out: (M, N) contiguous, where the forward's output is
    written again (for a weight gradient after it), or None. dropout, seed: the forward's (s then the fp32
    sum); dx is then the gradient of x before its dropout, and dx32 still that of the sum (the residual's).
    ValueError naming the tensor whose shape or rows are not as above (weight (N,), rstd (M,) fp32)."""
    M, N = s.shape
    if weight.shape != (N,) or rstd.shape != (M,) or rstd.dtype != torch.float32:
        raise ValueError(f"rms_norm_bwd: weight {tuple(weight.shape)} and rstd {tuple(rstd.shape)} {rstd.dtype} are "
                         f"not ({N},) and ({M},) fp32")
    for name, t in (("dout", dout), ("s", s), ("z", z), ("dsum", dsum), ("dz_out", dz_out), ("out", out)):
        if t is not None:
            _rows_2d(f"rms_norm_bwd: {name}", t, M, N)
    for name, t in (("dsum", dsum), ("out", out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"rms_norm_bwd: {name} with strides {t.stride()} is not contiguous")
    threshold, scale = _norm_dropout("rms_norm_bwd", dropout, seed, N, True)
    dx = torch.empty(M, N, device=s.device, dtype=dx_dtype or s.dtype)
    d32 = torch.empty(M, N, device=s.device, dtype=torch.float32) if dx32 else None
    dz = None if z is None else (torch.empty_like(z) if dz_out is None else dz_out)
    bn = next_power_of_2(N)
    bm = max(1, _NORM_BWD["ELEMS"] // bn)
    sms = _sm_count(s.device.index) if s.is_cuda else 4
    programs = max(1, min(cdiv(M, bm), _NORM_BWD["PER_SM"] * sms))
    dw = torch.empty(programs, N, device=s.device, dtype=torch.float32)
    launch(_rms_norm_bwd_kernel)[(programs,)](
        dout, dout.stride(0), s, s.stride(0), s if z is None else z, 0 if z is None else z.stride(0), weight, rstd,
        dx if dsum is None else dsum, dx, dx if d32 is None else d32, dx if dz is None else dz,
        0 if dz is None else dz.stride(0), dx if out is None else out, dw, rstd if seed is None else seed, M, N,
        threshold, scale, HAS_Z=z is not None, HAS_DSUM=dsum is not None, HAS_DX32=dx32, RECOMPUTE=out is not None,
        DROPOUT=bool(dropout), BM=bm, BN=bn, **{k: v for k, v in _NORM_BWD.items() if k not in ("ELEMS", "PER_SM")})
    return dx, d32, dz, dw.sum(0)


# Each training op (the add + norm, the GELU + dropout, the Mamba-2 layer) is two custom ops, forward
# and backward, joined by register_autograd: torch.compile sees one opaque op where the Triton launches
# would break its graph. Eager calls skip torch.library's dispatch around the ops' Python (tens of µs
# of host time per call; at the paper's batch 4 an eager step waits on the host, BENCHMARKS.md §0c,
# twenty-sixth session): the same plain functions run through one autograd.Function.
class TrainingOp(NamedTuple):
    """A training op's parts: the custom op (for torch.compile) and, for eager calls, its forward
    implementation, its setup_context(ctx, inputs, output) and its backward(ctx, *grads) calling the
    backward's implementation."""
    op: Callable
    forward: Callable
    setup: Callable
    backward: Callable


class _EagerTrainingOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *inputs):
        output = op.forward(*inputs)
        op.setup(ctx, inputs, output)
        ctx.op_backward = op.backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(ctx.op_backward(ctx, *grads))


def run_training_op(op: TrainingOp, *inputs):
    """op's custom op while torch.compile traces, else its plain functions through one autograd.Function:
    the same numbers either way."""
    if torch.compiler.is_compiling():
        return op.op(*inputs)
    return _EagerTrainingOp.apply(op, *inputs)


def _add_rms_norm_fwd_impl(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (b, s, d), residual (b, s, d), weight (d,) -> normed (b, s, d) in h's dtype, x = residual +
    dropout(h, p) (b, s, d) fp32, rstd (b s,) fp32, and the seed (1,) int64 of the dropout's mask, drawn
    from h's device's default generator as gelu_dropout's (0, and no draw, at p = 0)."""
    d = h.shape[-1]
    seed = torch.randint(2 ** 62, (1,), device=h.device) if p else torch.zeros(1, dtype=torch.int64, device=h.device)
    normed, x, rstd = rms_norm_fwd(h.reshape(-1, d), weight, eps, residual=residual.reshape(-1, d), dropout=p,
                                   seed=seed)
    return normed.view(h.shape), x.view(h.shape), rstd, seed


_add_rms_norm_fwd = torch.library.custom_op("ssmttm::add_rms_norm_fwd", _add_rms_norm_fwd_impl, mutates_args=(),
                                            tags=(torch.Tag.nondeterministic_seeded,))


@_add_rms_norm_fwd.register_fake
def _(h, residual, weight, eps, p):
    return (torch.empty_like(h), h.new_empty(h.shape, dtype=torch.float32),
            h.new_empty(h.shape[:-1].numel(), dtype=torch.float32), h.new_empty(1, dtype=torch.int64))


def _add_rms_norm_bwd_impl(d_normed: Optional[torch.Tensor], d_x: Optional[torch.Tensor], x: torch.Tensor,
                           weight: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor, p: float, h_dtype: torch.dtype,
                           res_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_add_rms_norm_fwd's backward from the gradients of normed and x (either None: zero) -> the
    gradients of h in h_dtype (through the dropout's mask, drawn again from its seed), residual in
    res_dtype, and weight in its dtype."""
    d = x.shape[-1]
    dsum = None if d_x is None else d_x.reshape(-1, d).contiguous()
    dn = torch.zeros_like(x) if d_normed is None else d_normed.reshape(-1, d)
    dn = dn if dn.stride(1) == 1 else dn.contiguous()               # an expanded gradient, say
    # the residual's gradient is the sum's: h's own unless a dropout masks h's
    dh, d32, _, dw = rms_norm_bwd(dn, x.reshape(-1, d), weight, rstd, dsum=dsum, dx_dtype=h_dtype,
                                  dx32=res_dtype == torch.float32 or p > 0, dropout=p, seed=seed)
    dres = dh.to(res_dtype, copy=True) if d32 is None else d32.to(res_dtype)  # two gradients, never one tensor
    return dh.view(x.shape), dres.view(x.shape), dw.to(weight.dtype)


_add_rms_norm_bwd = torch.library.custom_op("ssmttm::add_rms_norm_bwd", _add_rms_norm_bwd_impl, mutates_args=())


@_add_rms_norm_bwd.register_fake
def _(d_normed, d_x, x, weight, rstd, seed, p, h_dtype, res_dtype):
    return x.new_empty(x.shape, dtype=h_dtype), x.new_empty(x.shape, dtype=res_dtype), torch.empty_like(weight)


def _add_rms_norm_setup(ctx, inputs, output):
    h, residual, weight, _, p = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3])
    ctx.p, ctx.dtypes = p, (h.dtype, residual.dtype)
    ctx.set_materialize_grads(False)


def _add_rms_norm_backward(bwd):
    """The backward formula, calling bwd: the backward op, or its implementation."""
    def backward(ctx, d_normed, d_x, *_):
        x, weight, rstd, seed = ctx.saved_tensors
        return bwd(d_normed, d_x, x, weight, rstd, seed, ctx.p, *ctx.dtypes) + (None, None)
    return backward


_add_rms_norm_fwd.register_autograd(_add_rms_norm_backward(_add_rms_norm_bwd), setup_context=_add_rms_norm_setup)
ADD_RMS_NORM = TrainingOp(_add_rms_norm_fwd, _add_rms_norm_fwd_impl, _add_rms_norm_setup,
                          _add_rms_norm_backward(_add_rms_norm_bwd_impl))


def add_rms_norm(h, residual, weight, eps, p=0.0, training=False):
    """The residual add of a sublayer's output, through its dropout, and the next sublayer's RMSNorm: h
    (b, s, d), the sublayer's output before its dropout (rate p, applied while training), and residual
    (b, s, d) -> (normed in h's dtype, x = residual + dropout(h) in fp32), normed = rms_norm(x) * weight.
    On CUDA one Triton pass each way (the custom op ssmttm::add_rms_norm_fwd and its backward, which
    torch.compile keeps whole). Its dropout (0 < p < 1, d % 8 == 0) keeps a seed for the backward instead
    of a mask and draws from Philox, as gelu_dropout (torch's rate to 2^-16, not torch's mask); other
    rates and widths take torch's dropout first. Elsewhere the plain ops (torch's dropout)."""
    p = p if training else 0.0
    if h.is_cuda and triton is not None:
        if p and (p >= 1 or h.shape[-1] % 8):
            h, p = F.dropout(h, p, True), 0.0
        return run_training_op(ADD_RMS_NORM, h, residual, weight, eps, float(p))[:2]
    x = residual.to(torch.promote_types(residual.dtype, torch.float32)) + F.dropout(h, p, training)
    return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps).to(h.dtype), x


# ------------------------------------------------------------------------------------------------
# The feed-forward's GELU and dropout in one pass each way

if triton is not None:

    @triton.jit
    def _dropout_keep(seed_ptr, pid, threshold, BQ: tl.constexpr):
        """This program's element offsets (BQ, 8), rows of eight contiguous elements, and keep (BQ, 8):
        whether each survives dropout (_keep_eight). Each thread holds whole rows of eight, so the
        numbers need no exchange between threads."""
        rows = pid * BQ + tl.arange(0, BQ)
        return rows[:, None] * 8 + tl.arange(0, 8)[None, :], _keep_eight(seed_ptr, rows, threshold)

    @triton.jit
    def _gelu_dropout_fwd_kernel(a_ptr, seed_ptr, y_ptr, numel, threshold, scale, BQ: tl.constexpr):
        """y = gelu(a) keep scale for numel elements (gelu: the exact, erf form; scale = 1 / (1 - p)), in
        fp32, rounded once to y's dtype. Grid (cdiv(numel, 8 BQ),)."""
        i, keep = _dropout_keep(seed_ptr, tl.program_id(0).to(tl.int64), threshold, BQ)
        a = tl.load(a_ptr + i, mask=i < numel, other=0.0).to(tl.float32)
        g = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
        tl.store(y_ptr + i, tl.where(keep, g * scale, 0.0).to(y_ptr.dtype.element_ty), mask=i < numel)

    @triton.jit
    def _gelu_dropout_bwd_kernel(dy_ptr, a_ptr, seed_ptr, da_ptr, numel, threshold, scale, BQ: tl.constexpr):
        """da = dy keep scale gelu'(a), gelu'(a) = Phi(a) + a phi(a), with the forward's mask drawn again
        from its seed. Grid (cdiv(numel, 8 BQ),)."""
        i, keep = _dropout_keep(seed_ptr, tl.program_id(0).to(tl.int64), threshold, BQ)
        a = tl.load(a_ptr + i, mask=i < numel, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + i, mask=i < numel, other=0.0).to(tl.float32)
        dgelu = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
        tl.store(da_ptr + i, tl.where(keep, dy * dgelu * scale, 0.0).to(da_ptr.dtype.element_ty), mask=i < numel)


_GELU_DROPOUT = dict(BQ=256, num_warps=8)  # rows of eight elements per program, warps


def _dropout_launch(numel, p):
    """Grid and the kernels' threshold and scale for dropout rate p (0 < p < 1)."""
    return (cdiv(numel, 8 * _GELU_DROPOUT["BQ"]),), round(p * 65536), 1.0 / (1.0 - p)


def _gelu_dropout_fwd_impl(a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a (any shape, contiguous) -> y = dropout(gelu(a), p) in a's dtype, and the seed (1,) int64 of its
    mask, drawn from a's device's default generator (so torch.manual_seed, a saved RNG state and CUDA
    graphs govern it as they do torch's dropout). p (0 < p < 1) is drawn at a multiple of 2^-16 (0.3:
    0.300003), kept values scale by 1 / (1 - p) as in torch's dropout. Tagged as random, so that
    torch.compile never merges two calls or reuses one's result."""
    seed = torch.randint(2 ** 62, (1,), device=a.device)
    y = torch.empty_like(a)
    grid, threshold, scale = _dropout_launch(a.numel(), p)
    _gelu_dropout_fwd_kernel[grid](a, seed, y, a.numel(), threshold, scale, **_GELU_DROPOUT)
    return y, seed


_gelu_dropout_fwd = torch.library.custom_op("ssmttm::gelu_dropout_fwd", _gelu_dropout_fwd_impl, mutates_args=(),
                                            tags=(torch.Tag.nondeterministic_seeded,))


@_gelu_dropout_fwd.register_fake
def _(a, p):
    return torch.empty_like(a), a.new_empty(1, dtype=torch.int64)


def _gelu_dropout_bwd_impl(dy: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """_gelu_dropout_fwd's backward: dy (a's shape) -> da in a's dtype."""
    dy, da = dy.contiguous(), torch.empty_like(a)
    grid, threshold, scale = _dropout_launch(a.numel(), p)
    _gelu_dropout_bwd_kernel[grid](dy, a, seed, da, a.numel(), threshold, scale, **_GELU_DROPOUT)
    return da


_gelu_dropout_bwd = torch.library.custom_op("ssmttm::gelu_dropout_bwd", _gelu_dropout_bwd_impl, mutates_args=())


@_gelu_dropout_bwd.register_fake
def _(dy, a, seed, p):
    return torch.empty_like(a)


def _gelu_dropout_setup(ctx, inputs, output):
    a, p = inputs
    ctx.save_for_backward(a, output[1])
    ctx.p = p
    ctx.set_materialize_grads(False)


def _gelu_dropout_backward(bwd):
    """The backward formula, calling bwd: the backward op, or its implementation."""
    def backward(ctx, dy, _):
        a, seed = ctx.saved_tensors
        return (None if dy is None else bwd(dy, a, seed, ctx.p)), None
    return backward


_gelu_dropout_fwd.register_autograd(_gelu_dropout_backward(_gelu_dropout_bwd), setup_context=_gelu_dropout_setup)
GELU_DROPOUT = TrainingOp(_gelu_dropout_fwd, _gelu_dropout_fwd_impl, _gelu_dropout_setup,
                          _gelu_dropout_backward(_gelu_dropout_bwd_impl))


def gelu_dropout(a, p, training):
    """dropout(gelu(a)) of the feed-forward (ssmttm.FeedForward; gelu the exact, erf form): a (..., d_ff),
    p the dropout rate. Training with 0 < p < 1 on CUDA: one Triton pass each way (ssmttm::gelu_dropout_fwd
    and its backward, opaque to torch.compile), which keeps a and a seed for the backward instead of a
    mask, and draws its mask from Philox (torch's rate to 2^-16, not torch's mask); else the plain ops."""
    if training and 0 < p < 1 and a.is_cuda and triton is not None:
        return run_training_op(GELU_DROPOUT, a.contiguous(), p)[0]
    return F.dropout(F.gelu(a), p, training)


# ------------------------------------------------------------------------------------------------
# Mamba-2's step sizes for the training pass: dt = softplus(dt_in + dt_bias), 0 at left padding

if triton is not None:

    @triton.jit
    def _dt_tile(dt_ptr, stride_dt, bias_ptr, seq_ptr, rows, cols, row_ok, col_ok, HAS_SEQ: tl.constexpr):
        """dt + bias at rows x cols (dt's rows stride_dt apart) in fp32, 0 where a row or column is not ok,
        and where they lie outside the padding (keep: ok and seq != 0). The offsets come in rather than
        out: torch.compile's analysis of which arguments a kernel writes takes every pointer given to a call
        whose result a store's address uses as written."""
        keep = row_ok[:, None] & col_ok[None, :]
        v = tl.load(dt_ptr + rows[:, None] * stride_dt + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        v += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SEQ:
            keep = keep & (tl.load(seq_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
        return keep, v

    @triton.jit
    def _dt_softplus_fwd_kernel(dt_ptr, stride_dt, bias_ptr, seq_ptr, out_ptr, M, H, HAS_SEQ: tl.constexpr,
                                BM: tl.constexpr, BH: tl.constexpr):
        """out = softplus(dt + bias) (M, H) fp32, 0 in rows whose seq is 0. Grid (cdiv(M, BM),)."""
        rows, cols = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM), tl.arange(0, BH)
        ok = (rows < M)[:, None] & (cols < H)[None, :]
        keep, v = _dt_tile(dt_ptr, stride_dt, bias_ptr, seq_ptr, rows, cols, rows < M, cols < H, HAS_SEQ)
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], tl.where(keep, _softplus(v), 0.0), mask=ok)

    @triton.jit
    def _dt_softplus_bwd_kernel(ddt_ptr, dt_ptr, stride_dt, bias_ptr, seq_ptr, out_ptr, stride_out, dbias_ptr, M,
                                H, HAS_SEQ: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        """out = ddt sigmoid(dt + bias) (softplus' = sigmoid), 0 in rows whose seq is 0, in out's dtype (rows
        stride_out apart); this program's column sums of it to dbias (programs, H) fp32. ddt (M, H) fp32."""
        rows, cols = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM), tl.arange(0, BH)
        ok = (rows < M)[:, None] & (cols < H)[None, :]
        keep, v = _dt_tile(dt_ptr, stride_dt, bias_ptr, seq_ptr, rows, cols, rows < M, cols < H, HAS_SEQ)
        ddt = tl.load(ddt_ptr + rows[:, None] * H + cols[None, :], mask=ok, other=0.0)
        g = tl.where(keep, ddt * tl.sigmoid(v), 0.0)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dbias_ptr + tl.program_id(0) * H + cols, tl.sum(g, axis=0), mask=cols < H)


_DT_ELEMS = 4096  # elements per program of the dt kernels


def _dt_args(name, t, dt_bias, seq_idx):
    """t (b, l, h) as (b l, h) rows with dense heads (a view where t's rows are evenly apart, as in_proj's
    output's dt columns), after checking dt_bias (h,) and seq_idx (b, l) int32 or None; and the launch."""
    b, l, h = t.shape
    if t.stride(2) != 1 or dt_bias.shape != (h,):
        raise ValueError(f"{name}: dt {tuple(t.shape)} with strides {t.stride()} (heads must be dense) and dt_bias "
                         f"{tuple(dt_bias.shape)} do not match")
    if seq_idx is not None and (seq_idx.shape != (b, l) or seq_idx.dtype != torch.int32):
        raise ValueError(f"{name}: seq_idx {tuple(seq_idx.shape)} {seq_idx.dtype} is not ({b}, {l}) int32")
    bh = next_power_of_2(h)
    bm = max(1, _DT_ELEMS // bh)
    return t.reshape(b * l, h), bh, bm, cdiv(b * l, bm)


def dt_softplus(dt, dt_bias, seq_idx=None, launch=as_is):
    """Mamba-2's step sizes for the SSD: softplus(dt + dt_bias) in fp32, 0 where seq_idx is 0 (left
    padding: with the conv's reset at the sequence's start, the state then passes the padding unchanged,
    as ssmttm's mask_padding has it), in one Triton pass (CUDA, or TRITON_INTERPRET=1). dt (b, l, h) in
    any float dtype with dense heads, its rows evenly apart (the dt columns of in_proj's output); dt_bias
    (h,); seq_idx (b, l) int32 or None. Returns (b, l, h) fp32, contiguous."""
    rows, bh, bm, programs = _dt_args("dt_softplus", dt, dt_bias, seq_idx)
    out = torch.empty(dt.shape, device=dt.device, dtype=torch.float32)
    launch(_dt_softplus_fwd_kernel)[(programs,)](rows, rows.stride(0), dt_bias, rows if seq_idx is None else seq_idx,
                                                 out, rows.shape[0], rows.shape[1], HAS_SEQ=seq_idx is not None, BM=bm,
                                                 BH=bh)
    return out


def dt_softplus_backward(ddt, dt, dt_bias, seq_idx=None, out=None, launch=as_is):
    """dt_softplus's backward: ddt (b, l, h) fp32 contiguous, the gradient of its output; dt, dt_bias and
    seq_idx as given to it. Returns the gradient for dt, written into out if given ((b, l, h) with dense
    heads and rows evenly apart, any float dtype: the dt columns of in_proj's output gradient), else new in
    dt's dtype; and dt_bias's gradient (h,) fp32, summed in a fixed order (deterministic)."""
    rows, bh, bm, programs = _dt_args("dt_softplus_backward", dt, dt_bias, seq_idx)
    if ddt.shape != dt.shape or ddt.dtype != torch.float32 or not ddt.is_contiguous():
        raise ValueError(f"dt_softplus_backward: ddt {tuple(ddt.shape)} {ddt.dtype} is not {tuple(dt.shape)} fp32 "
                         "contiguous")
    if out is None:
        out = torch.empty_like(dt)
    elif out.shape != dt.shape or out.stride(2) != 1 or out.stride(0) != out.shape[1] * out.stride(1):
        raise ValueError(f"dt_softplus_backward: out {tuple(out.shape)} with strides {out.stride()} is not "
                         f"{tuple(dt.shape)} with dense heads and rows evenly apart")
    out_rows = out.view(rows.shape)
    dbias = torch.empty(programs, dt.shape[2], device=dt.device, dtype=torch.float32)
    launch(_dt_softplus_bwd_kernel)[(programs,)](
        ddt, rows, rows.stride(0), dt_bias, rows if seq_idx is None else seq_idx, out_rows, out_rows.stride(0), dbias,
        rows.shape[0], rows.shape[1], HAS_SEQ=seq_idx is not None, BM=bm, BH=bh)
    return out, dbias.sum(0)


def _causal_conv(xBC, weight, bias, seq_idx):
    """Causal depthwise conv + SiLU, (b, l, channels) -> (b, l, channels), channels-last."""
    return causal_conv1d_fwd_function(ensure_stride(xBC).transpose(1, 2), weight, bias, seq_idx, None, None,
                                      True).transpose(1, 2)


def _split_xBC(xBC, h, headdim, g):
    """(b, l, h p + 2 g n) -> x (b, l, h, p), B and C (b, l, g, n): views."""
    n = (xBC.shape[-1] - h * headdim) // (2 * g)
    x, B, C = xBC.split([h * headdim, g * n, g * n], dim=-1)
    return x.unflatten(-1, (h, headdim)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))


def _causal_conv_backward(dout, xBC, weight, bias, seq_idx, dx_out):
    """_causal_conv's backward in causal-conv1d: dx into dx_out (b, l, channels, any row stride); returns
    dweight and dbias."""
    dx, dweight, dbias, *_ = causal_conv1d_bwd_function(
        ensure_stride(xBC).transpose(1, 2), weight, bias, ensure_stride(dout).transpose(1, 2), seq_idx, None, None,
        ensure_stride(dx_out).transpose(1, 2), False, True)
    if dx.transpose(1, 2).stride() != dx_out.stride():
        dx_out.copy_(dx.transpose(1, 2))
    return dweight, dbias


def _triton_conv(grouped, conv_w):
    """Whether the training pass's conv + SiLU is this module's Triton conv (with the grouped SSD, width 4
    only), else causal-conv1d's, as mamba-ssm's own path has it (and the one to compare against)."""
    return grouped and conv_w.shape[1] == 4


def _padded_width(width: int) -> int:
    """The row length of in_proj's output in the training op: width rounded up to 64 values (128 bytes in
    bf16). Unaligned rows of a product's output are what torch.compile pads (Inductor's comprehensive
    padding), and then every view of them that a Triton kernel reads is copied to the layout it was
    traced with; rows already aligned are left as they are."""
    return -(-width // 64) * 64


# The training pass is two ops (forward, backward) joined by register_autograd: custom ops with
# mamba-ssm's kernels, which torch.compile sees as one opaque op per layer instead of a graph break (a
# graph break inside the loop over blocks would make it give up on the whole model: it skips any frame
# with a break in a loop); for the grouped SSD with the Triton conv, if asked (mamba2_train's triton_op),
# triton ops, whose kernels Inductor launches from its generated code (less host time per launch) and
# whose small ops it fuses.
def _mamba2_train_fwd_impl(u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                           dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, norm_w: torch.Tensor,
                           out_w: torch.Tensor, seq_idx: Optional[torch.Tensor], chunk: int, headdim: int,
                           ngroups: int, eps: float, grouped: bool, launch=as_is
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor]:
    """in_proj -> conv -> SSD -> gated RMSNorm -> out_proj of ssmttm.Mamba2.forward, in mamba-ssm's kernels.

    The same kernels as mamba-ssm's mamba_split_conv1d_scan_combined, called in the same order,
    with one difference: the forward returns what it computed, for the backward (the conv's output,
    and the SSD's: the chunk states after state passing, in fp32, C B^T per chunk, the cumulative
    decays dA_cs and softplus(dt + dt_bias)) instead of the backward computing them again: memory
    for time (BENCHMARKS.md; mamba-ssm's function recomputes the conv).

    Shapes: u (b, l, d_model), in_w (2 d_inner + 2 g n + h, d_model) and out_w (d_model, d_inner) in
    u's dtype (the wrapper casts as autocast would); l split into chunks of Q. in_proj runs inside: its
    output zxbcdt = [z | x B C | dt | zeros] (b, l, _padded_width(2 d_inner + 2 g n + h)) and that output's
    gradient are not the op's input and gradient, which the compiled step copied whole (BENCHMARKS.md).
    Returns out (b, l, d_model), then for the backward zxbcdt, y (b, l, h, p) before the norm, rstd (g b l), xBC
    after the conv and SiLU (b, l, h p + 2 g n; with the Triton conv (b, l rounded up to whole chunks, h p + 2 g n),
    zeros past l), states (b, l/Q, h, p, n), CB (b, l/Q, g, Q, Q), dA_cs
    and dt (b, h, l/Q, Q), and two empty tensors (the grouped SSD's y_off and xs). Every dtype follows from
    the inputs' (no autocast inside).

    grouped (ngroups 1; issue 15): the SSD is ssd_grouped's Triton form instead, the conv + SiLU
    causal_conv_silu (d_conv 4; _conv_silu), the gated norm rms_norm_fwd / rms_norm_bwd, and the saved
    tensors are its own: S_prev (b, l/Q, h p, n) in x's dtype, G (b, l/Q, Q, Q), acum (b, l/Q, h, Q)
    and dt (b, l, h) fp32 after the softplus, 0 at padding (seq_idx 0): with the conv's reset at
    the sequence's start, the state passes the padding unchanged, as in mask_padding; y_off
    (b, l/Q, Q, h p) fp32, C S_prev^T (y's state -> output part before its decay); and xs (b, l/Q, Q, h p)
    in x's dtype, x dt decayed to its chunk's end (dB's operand). launch: how the
    grouped path's Triton kernels are launched (ssd_grouped.as_is; torch.library.wrap_triton in the triton
    op)."""
    b, l, _ = u.shape
    width = in_w.shape[0]
    with torch.autocast("cuda", enabled=False):
        zxbcdt = F.linear(u, F.pad(in_w, (0, 0, 0, _padded_width(width) - width)))
        z, xBC, dt = zxbcdt[..., :width].split([A.shape[0] * headdim, conv_w.shape[0], A.shape[0]], dim=-1)
        if _triton_conv(grouped, conv_w):  # rows to whole chunks, zeros past l: the SSD's chunks of B and C are views
            xBC = causal_conv_silu(xBC, conv_w, conv_b, seq_idx, rows=ssd_grouped.padded_rows(l, chunk), launch=launch)
        else:
            xBC = _causal_conv(xBC, conv_w, conv_b, seq_idx)
        x, B, C = _split_xBC(xBC, A.shape[0], headdim, ngroups)
        x = x[:, :l]
        d_inner, n = z.shape[-1], B.shape[-1]
        if grouped:
            dt = dt_softplus(dt, dt_bias, seq_idx, launch=launch)
            y, _, acum, S_prev, G, y_off, xs = ssd_grouped.forward_triton(x, dt, A, B[:, :, 0], C[:, :, 0], chunk,
                                                                          D, launch=launch)
            saved = S_prev, G, acum, dt, y_off, xs
        else:
            dA_cs, dt = _chunk_cumsum_fwd(dt, A, chunk, dt_bias=dt_bias, dt_softplus=True)
            states = _chunk_state_fwd(B, x, dt, dA_cs, seq_idx=seq_idx, states_in_fp32=True)  # each chunk alone
            states, _ = _state_passing_fwd(states.flatten(-2), dA_cs[:, :, :, -1], seq_idx=seq_idx, chunk_size=chunk)
            states = states.unflatten(-1, (headdim, n))  # the state entering each chunk, fp32
            CB = _bmm_chunk_fwd(C, B, chunk, seq_idx=seq_idx, output_dtype=torch.float32)
            y, _ = _chunk_scan_fwd(CB, x, dt, dA_cs, C, states, D=D, seq_idx=seq_idx)  # (b, l, h, p), with D x
            saved = states, CB, dA_cs, dt, dt.new_empty(0), dt.new_empty(0)
        if grouped:  # one group: the gated norm in this module's kernels too
            normed, _, rstd = rms_norm_fwd(y.reshape(b * l, d_inner), norm_w, eps, z=z.view(b * l, d_inner),
                                           launch=launch)
        else:
            normed, _, rstd = _layer_norm_fwd(y.reshape(b * l, d_inner), norm_w, None, eps, z.view(b * l, d_inner),
                                              group_size=d_inner // ngroups, norm_before_gate=False, is_rms_norm=True)
        out = F.linear(normed.view(b, l, d_inner), out_w)
    return (out, zxbcdt, y, rstd, xBC) + saved


def _op_impl(impl, launch):
    """impl(*args, launch=launch), with impl's signature less launch: the op's schema, which torch.library
    infers from it."""
    def op_impl(*args):
        return impl(*args, launch=launch)
    sig = inspect.signature(impl)
    op_impl.__signature__ = sig.replace(parameters=[p for name, p in sig.parameters.items() if name != "launch"])
    return op_impl


_mamba2_train_fwd = torch.library.custom_op("ssmttm::mamba2_train_fwd", _op_impl(_mamba2_train_fwd_impl, as_is),
                                            mutates_args=())


@_mamba2_train_fwd.register_fake
def _(u, in_w, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, seq_idx, chunk, headdim, ngroups, eps, grouped):
    # what torch.compile traces with: the outputs' shapes and dtypes, no computation
    b, l, _ = u.shape
    h, chunks = A.shape[0], -(-l // chunk)
    n = (conv_w.shape[0] - h * headdim) // (2 * ngroups)
    fp32 = lambda *shape: u.new_empty(shape, dtype=torch.float32)
    conv_rows = chunks * chunk if _triton_conv(grouped, conv_w) else l
    head = (u.new_empty(b, l, out_w.shape[0]), u.new_empty(b, l, _padded_width(in_w.shape[0])),
            u.new_empty(b, l, h, headdim),
            fp32(ngroups * b * l), u.new_empty(b, conv_rows, conv_w.shape[0]))
    if grouped:
        return head + (u.new_empty(b, chunks, h * headdim, n), fp32(b, chunks, chunk, chunk),
                       fp32(b, chunks, h, chunk), fp32(b, l, h), fp32(b, chunks, chunk, h * headdim),
                       u.new_empty(b, chunks, chunk, h * headdim))
    return head + (fp32(b, chunks, h, headdim, n), fp32(b, chunks, ngroups, chunk, chunk), fp32(b, h, chunks, chunk),
                   fp32(b, h, chunks, chunk), fp32(0), fp32(0))


def _mamba_ssd_backward(x, B, C, dt_in, dt, dA_cs, CB, states, dy, dx, dB, dC, ddt_in, A, D, dt_bias, seq_idx,
                        chunk, headdim, g, n):
    """The SSD's backward in mamba-ssm's kernels, writing dx, dB, dC and ddt_in in place; returns dA,
    ddt_bias and dD."""
    # the SSD: the gradients of the states entering each chunk, passed backwards through the chunks
    dstates = _chunk_scan_bwd_dstates(C, dA_cs, dy, seq_idx=seq_idx, dtype=states.dtype)
    dstates, ddA_chunk, _, states = _state_passing_bwd(
        states.flatten(-2), dA_cs[:, :, :, -1], dstates.flatten(-2), seq_idx=seq_idx, has_initial_states=False,
        dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk)
    states, dstates = states.unflatten(-1, (headdim, n)), dstates.unflatten(-1, (headdim, n))
    dx, ddt, dD = _chunk_scan_chunk_state_bwd_dx(x, dt, dA_cs, B, CB, dy, dstates, D=D, seq_idx=seq_idx, dx=dx)
    dB_part, ddA_next = _chunk_state_bwd_db(x, dt, dA_cs, dstates, seq_idx=seq_idx, B=B, ngroups=g)
    dC_part, ddA_prev = _chunk_scan_bwd_dC(states, dA_cs, dy, seq_idx=seq_idx, C=C, ngroups=g)
    dCB = _chunk_scan_bwd_dcb(x, dt, dA_cs, dy, seq_idx=seq_idx, ngroups=g).to(CB.dtype)
    _bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
    _bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
    # the decays' gradient: each term where it arises, then one reverse cumsum over the chunk
    ddA_prev[..., -1] += ddA_chunk
    ddA = _chunk_scan_bwd_ddAcs_stable(x, dt, dA_cs, dy, CB)
    ddA += ddA_next + ddA_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    _, dA, ddt_bias = _chunk_cumsum_bwd(ddA, ddt, dt_in, A, dt_bias=dt_bias, dt_softplus=True, ddt=ddt_in)
    return dA, ddt_bias, dD


def _mamba2_train_bwd_impl(dout: torch.Tensor, u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor,
                           conv_b: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                           norm_w: torch.Tensor, out_w: torch.Tensor, seq_idx: Optional[torch.Tensor],
                           zxbcdt: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, xBC_conv: torch.Tensor,
                           states: torch.Tensor, CB: torch.Tensor, dA_cs: torch.Tensor, dt: torch.Tensor,
                           y_off: torch.Tensor, xs: torch.Tensor, chunk: int, headdim: int, ngroups: int, eps: float,
                           grouped: bool,
                           launch=as_is) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of _mamba2_train_fwd's out for its tensor inputs u ... out_w, each in its input's dtype,
    from the forward's other outputs (zxbcdt: in_proj's output; xBC_conv: the conv's output, its rows as the
    forward returns them). With grouped,
    states, CB and dA_cs are the grouped SSD's S_prev, G and acum, and y_off and xs its own (empty otherwise)."""
    g = ngroups
    b, l, _ = zxbcdt.shape
    h, width = A.shape[0], in_w.shape[0]
    # the same numbers whatever dout's layout (AOT autograd hands the compiled backward a contiguous
    # one): out_w's gradient is an einsum, and einsum picks its product's order of sums by the strides
    dout = dout.contiguous()
    with torch.autocast("cuda", enabled=False):
        z, xBC, dt_in = zxbcdt[..., :width].split([h * headdim, conv_w.shape[0], h], dim=-1)
        x, B, C = _split_xBC(xBC_conv, h, headdim, g)  # B and C with the conv's rows (past l with the Triton conv)
        x = x[:, :l]
        d_inner, n = z.shape[-1], B.shape[-1]
        dzxbcdt = torch.empty_like(zxbcdt)[..., :width]  # rows as the forward's (padded); the padding unused
        dz, dxBC_in, ddt_in = dzxbcdt.split([d_inner, d_inner + 2 * g * n, h], dim=-1)
        dxBC = torch.empty_like(xBC)  # the gradient after the conv, before its backward
        dx, dB, dC = _split_xBC(dxBC, h, headdim, g)
        # Eager, the kernels write their gradients straight into the columns of dxBC and dzxbcdt. Traced
        # (the triton op), each writes a tensor of its own and a cat joins them: torch.compile copies a view
        # that a kernel writes into to a buffer of its own and back (functionalization), a copy of the
        # whole base for each.
        into = (lambda t: t) if launch is as_is else (lambda t: None)  # noqa: E731
        # out_proj, then the gated norm (which recomputes its output for out_proj's weight gradient)
        normed = torch.empty(b, l, d_inner, device=y.device, dtype=y.dtype)
        dnormed = F.linear(dout, out_w.t()).view(b * l, d_inner)
        if grouped:
            dy, _, dz, dnorm_w = rms_norm_bwd(dnormed, y.reshape(b * l, d_inner), norm_w, rstd,
                                              z=z.view(b * l, d_inner), dz_out=into(dz.view(b * l, d_inner)),
                                              out=normed.view(b * l, d_inner), launch=launch)
        else:
            dy, dnorm_w, *_ = _layer_norm_bwd(
                dnormed, y.reshape(b * l, d_inner), norm_w, None, eps, None, rstd, z.view(b * l, d_inner),
                group_size=d_inner // g, norm_before_gate=False, is_rms_norm=True, recompute_output=True,
                dz=dz.view(b * l, d_inner), out=normed.view(b * l, d_inner))
        dout_w = torch.einsum("bso,bsd->od", dout, normed)
        dy = dy.view(b, l, h, headdim)
        if grouped:
            dx, ddt, dA, dB, dC, dD, _ = ssd_grouped.backward_triton(  # dx, dB, dC into the conv's gradient
                dy, None, x, dt, A, B[:, :, 0], C[:, :, 0], D, None, dA_cs, states, CB, y_off, xs, chunk,
                dx_out=into(dx), dB_out=into(dB[:, :, 0]), dC_out=into(dC[:, :, 0]), launch=launch)
            ddt_in, ddt_bias = dt_softplus_backward(ddt, dt_in, dt_bias, seq_idx, out=into(ddt_in), launch=launch)
            if launch is not as_is:
                dxBC = torch.cat([dx.view(b, l, -1), dB, dC], dim=-1)
        else:
            dA, ddt_bias, dD = _mamba_ssd_backward(x, B, C, dt_in, dt, dA_cs, CB, states, dy, dx, dB, dC, ddt_in,
                                                   A, D, dt_bias, seq_idx, chunk, headdim, g, n)
        if _triton_conv(grouped, conv_w):
            dxBC_in, dconv_w, dconv_b = causal_conv_silu_backward(dxBC, xBC, conv_w, conv_b, seq_idx,
                                                                  dx_out=into(dxBC_in), launch=launch)
        else:
            dconv_w, dconv_b = _causal_conv_backward(dxBC, xBC, conv_w, conv_b, seq_idx, dx_out=dxBC_in)
        if launch is not as_is:
            dzxbcdt = torch.cat([dz.view(b, l, d_inner), dxBC_in, ddt_in], dim=-1)
        # in_proj's backward, as autograd's for F.linear: the same two products in the same layouts
        dz2 = dzxbcdt.view(b * l, width)
        du = torch.mm(dz2, in_w).view(u.shape)
        din_w = torch.mm(dz2.t(), u.reshape(b * l, -1))
    grads = din_w, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w, dout_w
    return (du,) + tuple(d.to(p.dtype) for d, p in zip(grads, (in_w, conv_w, conv_b, dt_bias, A, D, norm_w, out_w)))


_mamba2_train_bwd = torch.library.custom_op("ssmttm::mamba2_train_bwd", _op_impl(_mamba2_train_bwd_impl, as_is),
                                            mutates_args=())


@_mamba2_train_bwd.register_fake
def _(dout, u, in_w, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, *_):
    return tuple(torch.empty_like(t) for t in (u, in_w, conv_w, conv_b, dt_bias, A, D, norm_w, out_w))


def _mamba2_train_setup(ctx, inputs, output):
    *tensors, chunk, headdim, ngroups, eps, grouped = inputs
    ctx.save_for_backward(*tensors, *output[1:])
    # the outputs past the first have no gradient: None, not a tensor of zeros written for each (the
    # default), which cost a pass over each at every backward
    ctx.set_materialize_grads(False)
    ctx.sizes = chunk, headdim, ngroups, eps, grouped


def _mamba2_train_backward(bwd):
    """The backward formula, calling bwd: the backward op, or its implementation."""
    def backward(ctx, dout, *_):  # the other outputs are saved for the backward, not used
        return bwd(dout, *ctx.saved_tensors, *ctx.sizes) + (None,) * 6
    return backward


_mamba2_train_fwd.register_autograd(_mamba2_train_backward(_mamba2_train_bwd), setup_context=_mamba2_train_setup)
MAMBA2_TRAIN = TrainingOp(_mamba2_train_fwd, _mamba2_train_fwd_impl, _mamba2_train_setup,
                          _mamba2_train_backward(_mamba2_train_bwd_impl))
# The grouped path with the Triton conv (_triton_conv) as triton ops: the same functions, their kernels
# launched through wrap_triton
if triton is not None:
    _mamba2_grouped_fwd = torch.library.triton_op("ssmttm::mamba2_grouped_fwd",
                                                  _op_impl(_mamba2_train_fwd_impl, torch.library.wrap_triton),
                                                  mutates_args=())
    _mamba2_grouped_bwd = torch.library.triton_op("ssmttm::mamba2_grouped_bwd",
                                                  _op_impl(_mamba2_train_bwd_impl, torch.library.wrap_triton),
                                                  mutates_args=())
    _mamba2_grouped_fwd.register_autograd(_mamba2_train_backward(_mamba2_grouped_bwd),
                                          setup_context=_mamba2_train_setup)
    MAMBA2_GROUPED = MAMBA2_TRAIN._replace(op=_mamba2_grouped_fwd)  # eager calls: the same plain functions
else:
    MAMBA2_GROUPED = MAMBA2_TRAIN


@functools.cache
def _compiled_grouped_op():
    """MAMBA2_GROUPED for eager calls, its forward and its backward each one torch.compile'd call of the
    triton op: Inductor's generated code launches the op's kernels, which takes about half the host time of
    launching them from Python (BENCHMARKS.md §0c, sixty-first session), at the triton op's GPU cost (no TMA
    loads; a cat joins the backward's gradients). One graph per shape of the inputs, compiled at its first
    call; past torch's recompile limit a new shape runs the triton op uncompiled (the same numbers)."""
    def forward(*inputs):
        return _mamba2_grouped_fwd(*inputs)

    def backward(*inputs):
        return _mamba2_grouped_bwd(*inputs)
    compiled = functools.partial(torch.compile, fullgraph=True, dynamic=False)
    return MAMBA2_GROUPED._replace(forward=compiled(forward), backward=_mamba2_train_backward(compiled(backward)))


def mamba2_train(u, in_weight, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, seq_idx, chunk_size,
                 headdim, ngroups=1, eps=1e-5, grouped=False, triton_op=False):
    """A Mamba-2 layer's in_proj, conv, SSD, gated norm and out_proj for training, as ssmttm.Mamba2.forward:
    u (b, l, d_model); in_weight (2 d_inner + 2 g n + h, d_model); conv_weight (conv_dim, d_conv),
    conv_bias (conv_dim,); dt_bias, A = -exp(A_log), D (nheads,); norm_weight (d_inner,);
    out_weight (d_model, d_inner); seq_idx (b, l) int32 or None (0 at left padding, 1 at the
    sequence). Returns (b, l, d_model). CUDA, with mamba-ssm's kernels (HAS_TRAIN_KERNELS).
    in_proj and out_proj run in autocast's dtype (u's without autocast), their inputs cast as F.linear's
    under autocast would be, so the numbers are nn.Linear's; the conv, norm and SSD parameters go in as
    they are, as in mamba-ssm's function. grouped (also on the CPU under Triton's interpreter): the SSD is
    ssd_grouped's (ngroups 1 only; issue 15) instead of mamba-ssm's, the conv + SiLU is
    causal_conv_silu (Triton, width 4) instead of causal-conv1d's, the gated norm this module's
    rms_norm_fwd / rms_norm_bwd instead of mamba-ssm's, and dt's softplus dt_softplus. triton_op (with
    grouped and the Triton conv; ignored otherwise): the layer as a triton op, whose kernels Inductor
    launches from its own code (less host time per launch; through pointers, not TMA, and with a cat
    joining the backward's gradients: more GPU time): under torch.compile traced into the model's graph
    instead of an opaque custom op; eager, its forward and its backward each one torch.compile'd call of
    it (_compiled_grouped_op), the numbers within rounding of the eager op's (Inductor's own fusions)."""
    if grouped and ngroups != 1:
        raise ValueError(f"mamba2_train: the grouped SSD takes ngroups 1, not {ngroups}")
    seq_idx = None if seq_idx is None else seq_idx.contiguous()
    device = u.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else u.dtype
    op = MAMBA2_TRAIN
    if triton_op and triton is not None and _triton_conv(grouped, conv_weight):
        op = MAMBA2_GROUPED if torch.compiler.is_compiling() else _compiled_grouped_op()
    return run_training_op(op, u.to(dtype).contiguous(), in_weight.to(dtype), conv_weight, conv_bias, dt_bias, A, D,
                           norm_weight, out_weight.to(dtype), seq_idx, chunk_size, headdim, ngroups, eps, grouped)[0]
