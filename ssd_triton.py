"""Grouped chunked SSD forward in Triton, for ngroups = 1 (B and C shared by all heads).

Issue 15, first step: the forward pass only. Standalone: nothing imports this module yet.
It computes exactly `ssd_reference.ssd_chunked` (read that first; same names, same equations):

    a_t      = dt_t * A_h                                   (per head, a_t <= 0)
    acum_q   = a_1 + ... + a_q                              (cumsum inside each chunk of Q steps)
    S_c      = sum_q (dt_q exp(acum_Q - acum_q) x_q)^T B_q   chunk state, all heads in one GEMM
    S_prev_c = exp(acum_Q of chunk c-1) S_prev_{c-1} + S_{c-1}, S_prev_0 = initial_state
    y_q      = exp(acum_q) C_q S_prev^T                      state -> output
             + sum_{s <= q} (C_q . B_s) exp(acum_q - acum_s) dt_s x_s     diagonal block
             + D x_q

What ngroups = 1 buys: C_q . B_s (the Q x Q Gram matrix, cost Q^2 N) and the state products
(cost Q N H P) do not depend on the head, so a program's tile spans several heads: the columns of
a tile are (head, p) pairs, HEADS heads of BLOCK_P columns each, and the per-head decays are
elementwise scales on the x tile (prologue) or on the output tile (epilogue). No per-head (Q, Q)
decay matrix is ever written to memory; inside the output kernel the diagonal block is done in
(BLOCK_M, BLOCK_M) tiles of C B^T, flash-attention style.

Stability: A < 0 and dt >= 0 make acum non-increasing along the chunk, so every exponential the
kernels take is exp(non-positive) <= 1, except masked entries that are thrown away:
  - chunk state:  exp(acum_Q - acum_q), q <= Q.
  - output, off-diagonal tiles (s before the row block that starts at m0): with the reference
    r = acum_{m0}, exp(acum_q - acum_s) = exp(acum_q - r) * exp(r - acum_s), both factors <= 1
    (a factor can only underflow where the true product is even smaller). exp(r - acum_s) goes on
    the x tile, exp(acum_q - r) on the accumulator once at the end; the state term's exp(acum_q) is
    exp(r) * exp(acum_q - r) the same way.
  - output, diagonal tile (s and q in the same row block): the exact exp(acum_q - acum_s) per
    head, a (HEADS, BLOCK_M, BLOCK_M) register tile, multiplied into C B^T, then a batched dot.

Shapes (b batch, l length, h heads, p head dim, n state size, c chunks, Q chunk size):
    x (b, l, h, p)   dt (b, l, h) (after softplus)   A (h,)   B, C (b, l, 1, n) or (b, l, n)
    D (h,)   initial_state (b, h, p, n)   ->   y (b, l, h, p) in x's dtype, final state (b, h, p, n) fp32
Intermediates: acum (b, h, c, Q) fp32, chunk states (b, c, h, p, n) fp32.

The last chunk is padded by masking: rows t >= l load dt = 0 and x = 0, so they leave the state
unchanged (as the reference's zero padding does) and are never stored.

Plain Triton (tl.dot, tl.cumsum, 3-D batched tl.dot): no Hopper-only instructions, so it runs on
Ampere (sm_80/86) as well. On the CPU: TRITON_INTERPRET=1 (slow; tiny shapes only).
Matmul operands are cast to x's dtype (bf16 in training) with fp32 accumulation; for fp32 inputs
`ieee=True` asks for full fp32 dots instead of TF32 (the tests use it).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# 1. chunk cumsum
# --------------------------------------------------------------------------------------------
@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr, A_ptr, acum_ptr,
    L, H, CHUNK,
    s_dt_b, s_dt_l, s_dt_h,
    s_a_b, s_a_h, s_a_c,                  # acum (b, h, c, Q), stride 1 along Q
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """acum[b, h, c, q] = sum_{t <= q} dt[b, c*Q + t, h] * A[h], in fp32 (dt = 0 past the end).

    Grid (b, c, cdiv(h, BLOCK_H)). One program: a (BLOCK_Q >= Q, BLOCK_H) tile, cumsum over Q."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_h = tl.program_id(2)
    q = tl.arange(0, BLOCK_Q)                                            # (BLOCK_Q,)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)                         # (BLOCK_H,)
    t = pid_c * CHUNK + q
    q_ok = q < CHUNK
    load_ok = (q_ok & (t < L))[:, None] & (hh < H)[None, :]
    dt = tl.load(dt_ptr + pid_b * s_dt_b + t[:, None] * s_dt_l + hh[None, :] * s_dt_h,
                 mask=load_ok, other=0.0).to(tl.float32)                 # (BLOCK_Q, BLOCK_H)
    A = tl.load(A_ptr + hh, mask=hh < H, other=0.0).to(tl.float32)       # (BLOCK_H,)
    acum = tl.cumsum(dt * A[None, :], axis=0)                            # (BLOCK_Q, BLOCK_H)
    out = acum_ptr + pid_b * s_a_b + hh[None, :] * s_a_h + pid_c * s_a_c + q[:, None]
    tl.store(out, acum, mask=q_ok[:, None] & (hh < H)[None, :])


# --------------------------------------------------------------------------------------------
# 2. chunk states
# --------------------------------------------------------------------------------------------
@triton.jit
def _chunk_state_kernel(
    x_ptr, dt_ptr, B_ptr, acum_ptr, S_ptr,
    L, H, P, N, CHUNK, NCHUNKS,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_n,
    s_a_b, s_a_h, s_a_c,
    s_S_b, s_S_c, s_S_h, s_S_p, s_S_n,
    HEADS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """S[b, c, (h, p), n] = sum_q (x * dt * exp(acum_end - acum_q))[q, (h, p)] * B[q, n].

    The chunk state of every head, as one GEMM (h*p, Q) x (Q, n) whose tiles span HEADS heads:
    the per-head decay to the chunk end and dt are applied to the x tile as it is loaded.
    Grid (b*c, cdiv(h, HEADS), cdiv(n, BLOCK_N)); tile (HEADS*BLOCK_P, BLOCK_N), fp32 accumulator."""
    pid_bc = tl.program_id(0)
    pid_b = pid_bc // NCHUNKS
    pid_c = pid_bc % NCHUNKS
    pid_h = tl.program_id(1)
    pid_n = tl.program_id(2)
    dot_dtype = x_ptr.dtype.element_ty

    # tile columns j = (head, p): head = pid_h*HEADS + j // BLOCK_P, p = j % BLOCK_P
    j = tl.arange(0, HEADS * BLOCK_P)                                    # (HP,)
    head = pid_h * HEADS + j // BLOCK_P
    pj = j % BLOCK_P
    col_ok = (head < H) & (pj < P)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                         # (BLOCK_N,)
    n_ok = nn < N

    acum_base = acum_ptr + pid_b * s_a_b + head * s_a_h + pid_c * s_a_c  # (HP,) pointers
    acum_end = tl.load(acum_base + CHUNK - 1, mask=col_ok, other=0.0)    # (HP,)

    acc = tl.zeros((HEADS * BLOCK_P, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, CHUNK, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)                                   # (BLOCK_Q,)
        t = pid_c * CHUNK + q
        row_ok = (q < CHUNK) & (t < L)
        ok = row_ok[:, None] & col_ok[None, :]                           # (BLOCK_Q, HP)
        x = tl.load(x_ptr + pid_b * s_x_b + t[:, None] * s_x_l
                    + head[None, :] * s_x_h + pj[None, :] * s_x_p, mask=ok, other=0.0)
        dt = tl.load(dt_ptr + pid_b * s_dt_b + t[:, None] * s_dt_l + head[None, :] * s_dt_h,
                     mask=ok, other=0.0).to(tl.float32)
        acum = tl.load(acum_base[None, :] + q[:, None], mask=ok, other=0.0)
        xs = x.to(tl.float32) * dt * tl.exp(acum_end[None, :] - acum)   # (BLOCK_Q, HP), prologue
        Bq = tl.load(B_ptr + pid_b * s_B_b + t[:, None] * s_B_l + nn[None, :] * s_B_n,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)   # (BLOCK_Q, BLOCK_N)
        if IEEE:
            acc = tl.dot(tl.trans(xs.to(dot_dtype)), Bq.to(dot_dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xs.to(dot_dtype)), Bq.to(dot_dtype), acc)

    out = (S_ptr + pid_b * s_S_b + pid_c * s_S_c
           + (head * s_S_h + pj * s_S_p)[:, None] + nn[None, :] * s_S_n)
    tl.store(out, acc, mask=col_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# 4. output (3, the scan between chunks, is plain torch below)
# --------------------------------------------------------------------------------------------
@triton.jit
def _gram_tile(C_ptr, B_ptr, tm, m_ok, ts, s_ok, N, s_C_l, s_C_n, s_B_l, s_B_n,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """G[m, s] = C[tm] . B[ts] over all n, (BLOCK_M, BLOCK_M) fp32: shared by every head.
    C_ptr, B_ptr already point at this batch row."""
    G = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        Cm = tl.load(C_ptr + tm[:, None] * s_C_l + nn[None, :] * s_C_n,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_N)
        Bs = tl.load(B_ptr + ts[:, None] * s_B_l + nn[None, :] * s_B_n,
                     mask=s_ok[:, None] & n_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_N)
        if IEEE:
            G = tl.dot(Cm, tl.trans(Bs), G, input_precision="ieee")
        else:
            G = tl.dot(Cm, tl.trans(Bs), G)
    return G


@triton.jit
def _chunk_output_kernel(
    x_ptr, dt_ptr, B_ptr, C_ptr, acum_ptr, Sprev_ptr, D_ptr, y_ptr,
    L, H, P, N, CHUNK, NCHUNKS,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_n,
    s_C_b, s_C_l, s_C_n,
    s_a_b, s_a_h, s_a_c,
    s_S_b, s_S_c, s_S_h, s_S_p, s_S_n,
    s_y_b, s_y_l, s_y_h, s_y_p,
    HEADS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, IEEE: tl.constexpr,
):
    """y[q, (h, p)] = exp(acum_q) (C_q S_prev^T)[(h, p)]
                    + sum_{s <= q} (C_q . B_s) exp(acum_q - acum_s) dt_s x_s[(h, p)]  + D_h x_q.

    Grid (b*c, Q / BLOCK_M, cdiv(h, HEADS)); tile: rows q in [m0, m0 + BLOCK_M) of the chunk,
    columns (head, p) for HEADS heads. Per tile, with r = acum_{m0} per head (see module doc):
      acc  = exp(r) * C[m] @ S_prev^T                                 (one GEMM over all heads)
      acc += G[m, s] @ (x dt exp(r - acum_s))[s]   for row blocks s before m0 (one GEMM each)
      acc *= exp(acum_m - r)
      acc += (G[m, s] * exp(acum_m - acum_s) * [s <= m]) @ (x dt)[s]  diagonal tile, per head
    G = C B^T is computed in (BLOCK_M, BLOCK_M) tiles and is the same for all heads."""
    pid_bc = tl.program_id(0)
    pid_b = pid_bc // NCHUNKS
    pid_c = pid_bc % NCHUNKS
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2)
    dot_dtype = x_ptr.dtype.element_ty
    HP: tl.constexpr = HEADS * BLOCK_P

    j = tl.arange(0, HP)                                                 # columns (head, p)
    head = pid_h * HEADS + j // BLOCK_P
    pj = j % BLOCK_P
    col_ok = (head < H) & (pj < P)
    m0 = pid_m * BLOCK_M
    m = m0 + tl.arange(0, BLOCK_M)                                       # rows, in the chunk
    tm = pid_c * CHUNK + m                                               # rows, in the sequence
    m_ok = tm < L

    x_b = x_ptr + pid_b * s_x_b
    dt_b = dt_ptr + pid_b * s_dt_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    acum_base = acum_ptr + pid_b * s_a_b + head * s_a_h + pid_c * s_a_c  # (HP,) pointers
    r = tl.load(acum_base + m0, mask=col_ok, other=0.0)                  # (HP,) reference point

    # state -> output: acc = C[m] @ S_prev^T, S_prev (HP, n) read as (n, HP) tiles
    acc = tl.zeros((BLOCK_M, HP), dtype=tl.float32)
    S_b = Sprev_ptr + pid_b * s_S_b + pid_c * s_S_c + head * s_S_h + pj * s_S_p   # (HP,)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        Cm = tl.load(C_b + tm[:, None] * s_C_l + nn[None, :] * s_C_n,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_N)
        S = tl.load(S_b[None, :] + nn[:, None] * s_S_n,
                    mask=n_ok[:, None] & col_ok[None, :], other=0.0)     # (BLOCK_N, HP) fp32
        if IEEE:
            acc = tl.dot(Cm.to(dot_dtype), S.to(dot_dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(Cm.to(dot_dtype), S.to(dot_dtype), acc)
    acc = acc * tl.exp(r)[None, :]

    # off-diagonal tiles: row blocks s entirely before m0, decays split at r (both factors <= 1)
    for s0 in range(0, m0, BLOCK_M):
        s = s0 + tl.arange(0, BLOCK_M)
        ts = pid_c * CHUNK + s
        s_ok = ts < L
        G = _gram_tile(C_b, B_b, tm, m_ok, ts, s_ok, N, s_C_l, s_C_n, s_B_l, s_B_n,
                       BLOCK_M, BLOCK_N, IEEE)                           # (BLOCK_M, BLOCK_M)
        ok = s_ok[:, None] & col_ok[None, :]                             # (BLOCK_M, HP)
        x = tl.load(x_b + ts[:, None] * s_x_l + head[None, :] * s_x_h + pj[None, :] * s_x_p,
                    mask=ok, other=0.0)
        dt = tl.load(dt_b + ts[:, None] * s_dt_l + head[None, :] * s_dt_h,
                     mask=ok, other=0.0).to(tl.float32)
        acum_s = tl.load(acum_base[None, :] + s[:, None], mask=ok, other=0.0)
        xs = x.to(tl.float32) * dt * tl.exp(r[None, :] - acum_s)        # (BLOCK_M, HP)
        if IEEE:
            acc = tl.dot(G.to(dot_dtype), xs.to(dot_dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(G.to(dot_dtype), xs.to(dot_dtype), acc)

    acum_m = tl.load(acum_base[None, :] + m[:, None], mask=col_ok[None, :], other=0.0)  # (BLOCK_M, HP)
    acc = acc * tl.exp(acum_m - r[None, :])

    # diagonal tile: s in the same row block, exact per-head decay, batched over the HEADS heads
    G = _gram_tile(C_b, B_b, tm, m_ok, tm, m_ok, N, s_C_l, s_C_n, s_B_l, s_B_n,
                   BLOCK_M, BLOCK_N, IEEE)                               # (BLOCK_M, BLOCK_M)
    hk = tl.arange(0, HEADS)
    head3 = pid_h * HEADS + hk                                           # (HEADS,)
    h_ok = head3 < H
    i = tl.arange(0, BLOCK_M)
    acum_h = acum_ptr + pid_b * s_a_b + head3 * s_a_h + pid_c * s_a_c    # (HEADS,) pointers
    acum_q3 = tl.load(acum_h[:, None, None] + m[None, :, None], mask=h_ok[:, None, None], other=0.0)
    acum_s3 = tl.load(acum_h[:, None, None] + m[None, None, :], mask=h_ok[:, None, None], other=0.0)
    causal = (i[:, None] >= i[None, :])[None, :, :]                      # (1, BLOCK_M, BLOCK_M)
    decay = tl.where(causal, tl.exp(tl.where(causal, acum_q3 - acum_s3, 0.0)), 0.0)
    W = G[None, :, :] * decay                                            # (HEADS, BLOCK_M, BLOCK_M)
    pp = tl.arange(0, BLOCK_P)
    ok3 = h_ok[:, None, None] & m_ok[None, :, None] & (pp < P)[None, None, :]
    x3 = tl.load(x_b + head3[:, None, None] * s_x_h + tm[None, :, None] * s_x_l
                 + pp[None, None, :] * s_x_p, mask=ok3, other=0.0)       # (HEADS, BLOCK_M, BLOCK_P)
    dt3 = tl.load(dt_b + head3[:, None, None] * s_dt_h + tm[None, :, None] * s_dt_l,
                  mask=h_ok[:, None, None] & m_ok[None, :, None], other=0.0).to(tl.float32)
    xs3 = x3.to(tl.float32) * dt3                                        # (HEADS, BLOCK_M, BLOCK_P)
    if IEEE:
        y_diag = tl.dot(W.to(dot_dtype), xs3.to(dot_dtype), input_precision="ieee")
    else:
        y_diag = tl.dot(W.to(dot_dtype), xs3.to(dot_dtype))              # (HEADS, BLOCK_M, BLOCK_P)
    acc += tl.reshape(tl.permute(y_diag, (1, 0, 2)), (BLOCK_M, HP))      # -> (BLOCK_M, HP)

    ok = m_ok[:, None] & col_ok[None, :]
    if HAS_D:
        Dh = tl.load(D_ptr + head, mask=col_ok, other=0.0).to(tl.float32)   # (HP,)
        xm = tl.load(x_b + tm[:, None] * s_x_l + head[None, :] * s_x_h + pj[None, :] * s_x_p,
                     mask=ok, other=0.0)
        acc += Dh[None, :] * xm.to(tl.float32)
    tl.store(y_ptr + pid_b * s_y_b + tm[:, None] * s_y_l + head[None, :] * s_y_h + pj[None, :] * s_y_p,
             acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Python driver
# --------------------------------------------------------------------------------------------
def state_passing(states, acum, initial_state=None):
    """3. The scan between chunks, in fp32 (plain torch, c sequential steps).

    states (b, c, h, p, n): each chunk's own state; acum (b, h, c, Q). Returns S_prev (b, c, h, p, n),
    the state entering each chunk, and the final state (b, h, p, n):
        S_prev_0 = initial_state,  S_prev_{c+1} = exp(acum[c, Q-1]) S_prev_c + states_c."""
    b, c, h, p, n = states.shape
    chunk_decay = torch.exp(acum[:, :, :, -1])                           # (b, h, c)
    prev = (states.new_zeros(b, h, p, n) if initial_state is None
            else initial_state.to(torch.float32))
    S_prev = torch.empty_like(states)
    for ci in range(c):
        S_prev[:, ci] = prev
        prev = chunk_decay[:, :, ci, None, None] * prev + states[:, ci]
    return S_prev, prev


def ssd_forward(x, dt, A, B, C, chunk_size, D=None, initial_state=None, *,
                heads_per_tile=None, block_m=None, block_n=None, block_q=None, ieee=False,
                num_warps=4, num_stages=2, return_intermediates=False):
    """The chunked SSD forward for ngroups = 1, as `ssd_reference.ssd_chunked`.

    x (b, l, h, p), dt (b, l, h) (after softplus, >= 0), A (h,) (< 0), B, C (b, l, 1, n) or (b, l, n),
    D (h,) or None, initial_state (b, h, p, n) or None. x, B, C share a dtype (the matmul operand
    dtype). Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) in fp32; with
    return_intermediates, also a dict of acum (b, h, c, Q) and the chunk states / S_prev
    (b, c, h, p, n), which the backward pass will need.

    Tiles: heads_per_tile heads of p columns per program (power of two), block_m rows of the
    output and of the C B^T tiles (divides chunk_size), block_n state columns per dot, block_q
    rows per step of the chunk-state loop; num_warps, num_stages for kernels 2 and 4. Not
    autotuned yet: bench_ssd_triton.py --sweep tries a grid of these on a GPU."""
    b, l, h, p = x.shape
    if B.dim() == 4:
        assert B.shape[2] == 1 and C.shape[2] == 1, "ngroups = 1 only"
        B, C = B[:, :, 0], C[:, :, 0]                                    # (b, l, n), views
    n = B.shape[-1]
    assert B.shape == C.shape == (b, l, n) and dt.shape == (b, l, h) and A.shape == (h,)
    assert x.dtype == B.dtype == C.dtype, "x, B, C: one dtype"
    Q = chunk_size
    nchunks = triton.cdiv(l, Q)
    BLOCK_P = max(16, triton.next_power_of_2(p))                         # tl.dot: dims >= 16
    HEADS = heads_per_tile or max(1, min(triton.next_power_of_2(h), 128 // BLOCK_P))
    BLOCK_M = block_m or min(64, triton.next_power_of_2(Q))
    BLOCK_N = block_n or max(16, min(64, triton.next_power_of_2(n)))
    BLOCK_Q = block_q or min(64, triton.next_power_of_2(Q))
    assert HEADS & (HEADS - 1) == 0, "heads_per_tile: a power of two"
    assert Q % BLOCK_M == 0 and BLOCK_M >= 16, "block_m: >= 16 and divides chunk_size"
    dev = x.device
    A = A.contiguous()
    if D is not None:
        D = D.contiguous()

    # 1. acum (b, h, c, Q)
    acum = torch.empty(b, h, nchunks, Q, device=dev, dtype=torch.float32)
    BLOCK_H = min(16, triton.next_power_of_2(h))
    _chunk_cumsum_kernel[(b, nchunks, triton.cdiv(h, BLOCK_H))](
        dt, A, acum, l, h, Q,
        *dt.stride(), *acum.stride()[:3],
        BLOCK_Q=triton.next_power_of_2(Q), BLOCK_H=BLOCK_H)

    # 2. chunk states (b, c, h, p, n)
    states = torch.empty(b, nchunks, h, p, n, device=dev, dtype=torch.float32)
    _chunk_state_kernel[(b * nchunks, triton.cdiv(h, HEADS), triton.cdiv(n, BLOCK_N))](
        x, dt, B, acum, states, l, h, p, n, Q, nchunks,
        *x.stride(), *dt.stride(), *B.stride(), *acum.stride()[:3], *states.stride(),
        HEADS=HEADS, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, IEEE=ieee,
        num_warps=num_warps, num_stages=num_stages)

    # 3. scan between chunks
    S_prev, final_state = state_passing(states, acum, initial_state)

    # 4. output
    y = torch.empty_like(x)
    _chunk_output_kernel[(b * nchunks, Q // BLOCK_M, triton.cdiv(h, HEADS))](
        x, dt, B, C, acum, S_prev, D if D is not None else A, y,
        l, h, p, n, Q, nchunks,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *acum.stride()[:3],
        *S_prev.stride(), *y.stride(),
        HEADS=HEADS, BLOCK_P=BLOCK_P, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_D=D is not None, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
    if return_intermediates:
        return y, final_state, dict(acum=acum, states=states, S_prev=S_prev)
    return y, final_state
