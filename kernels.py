"""Triton kernels for one-token decoding (CUDA only; the rest of ssmttm never needs them).

A decoding step multiplies 2 rows (one prompt and its guidance row) by each weight matrix: a
matrix-vector product, bound by reading the weights, not by arithmetic. Run as separate kernels,
each block of the model is a dozen launches that mostly wait on each other (norm, matmul, bias,
activation, residual add ...). `linear_rows` does one matrix-vector product with the norm before
it and the bias, GELU and residual add after it in the same kernel, so a SiMBA block decodes in six
kernels: norm+in_proj, conv, state update, gated norm+out_proj+residual, norm+fc1+GELU,
fc2+residual.

    out = residual + act(norm(x) @ W^T + bias)        x (M, K), W (N, K), out (M, N)

norm is nothing, RMSNorm (x * rsqrt(mean(x^2) + eps) * w), or Mamba-2's gated RMSNorm
(RMSNorm(x * silu(gate)) * w). Everything is computed in float32 and rounded once at the end.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch has no triton
    triton = None

NORM_NONE, NORM_RMS, NORM_GATED_RMS = 0, 1, 2
MAX_ROWS, MAX_WIDTH = 8, 4096  # each program holds all rows of x and a whole row of W


def available(t, width):
    """Whether linear_rows runs on t (rows, width) with inputs up to `width` wide."""
    return triton is not None and t.is_cuda and t.shape[0] <= MAX_ROWS and width <= MAX_WIDTH


if triton is not None:

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in [(2, 4), (4, 4), (4, 8), (8, 8)]],
        key=["N", "K", "M"])
    @triton.jit
    def _linear_rows_kernel(x_ptr, gate_ptr, norm_w_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, N, K, eps,
                            stride_x, stride_gate, stride_res,
                            M: tl.constexpr, M_PAD: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            GELU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        # One program: BLOCK_N outputs for all M rows, so each weight is read once. Each program
        # loads its whole slice of W (BLOCK_N x K) and all of x at once, with no loop: the kernel is
        # a few microseconds long, and a loop would wait on memory once per iteration.
        rows = tl.arange(0, M_PAD)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok, k_ok = rows < M, cols < N, ks < K
        x_ok = row_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_ok, other=0.0).to(tl.float32)
        if NORM == 2:
            g = tl.load(gate_ptr + rows[:, None] * stride_gate + ks[None, :], mask=x_ok, other=0.0).to(tl.float32)
            v = v * g * tl.sigmoid(g)
        if NORM != 0:  # every program computes the rows' mean squares itself: x is tiny and in L2
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / K + eps)
            v = v * rstd[:, None] * tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.sum(v[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)  # (M_PAD, BLOCK_N)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as F.gelu
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        out_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=out_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def linear_rows(x, weight, bias=None, norm_weight=None, eps=1e-5, gate=None, gelu=False, residual=None):
    """residual + gelu(norm(x) @ weight^T + bias) for a few rows, in one kernel.

    x (M, K) with M <= 8 and K <= 4096, weight (N, K). norm: RMSNorm with norm_weight (K,) if given; with gate
    (M, K) too, Mamba-2's gated RMSNorm of x * silu(gate). residual (M, N). Returns (M, N) in the
    dtype of residual if given, else of x."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or K > MAX_WIDTH:
        raise ValueError(f"linear_rows is for <= {MAX_ROWS} rows of width <= {MAX_WIDTH}; got {M} x {K}")
    norm = NORM_NONE if norm_weight is None else (NORM_RMS if gate is None else NORM_GATED_RMS)
    rows = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # rows may be strided views
    x, gate, residual, weight = rows(x), rows(gate), rows(residual), weight.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=(residual if residual is not None else x).dtype)
    dummy = weight  # a valid pointer for the arguments a variant does not read
    _linear_rows_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, dummy if gate is None else gate, dummy if norm_weight is None else norm_weight, weight,
        dummy if bias is None else bias, dummy if residual is None else residual, out, N, K, eps,
        x.stride(0), 0 if gate is None else gate.stride(0), 0 if residual is None else residual.stride(0),
        M=M, M_PAD=max(triton.next_power_of_2(M), 2), NORM=norm, HAS_BIAS=bias is not None, GELU=gelu,
        HAS_RES=residual is not None, BLOCK_K=triton.next_power_of_2(K))
    return out
