"""Grouped chunked SSD for ngroups = 1, forward and a hand-written backward (issue 15).

The same function as `ssd_reference.ssd_chunked` (read that first; same names), arranged so that
what costs the most is a few large matrix products over all heads at once:

    a_q      = dt_q A_h,  acum = cumsum of a inside each chunk of Q steps     (b, c, Q, h)
    xdt      = x dt                                                           (b, c, Q, h, p)
    xs       = xdt exp(acum_end - acum)          x decayed to its chunk's end
    S_c      = xs^T B                            chunk states: (h*p, Q) x (Q, n) per chunk
    S_prev   : S_prev_0 = initial state, S_prev_{c+1} = exp(acum_end_c) S_prev_c + S_c
    y        = exp(acum) (C S_prev^T)            state -> output: (Q, n) x (n, h*p) per chunk
             + diag(G, acum, xdt)                inside the chunk, G = C B^T (Q, Q), per head
             + D x

With ngroups = 1, B and C are shared by all heads, so the state products (86% of the FLOPs at
d_state 512) are GEMMs whose other side spans every head: (h*p) x Q x n per chunk. They run on
cuBLAS (fp32 results from bf16 operands). What is per head is the (Q, Q) part inside a chunk,
G * exp(acum_q - acum_s) on s <= q: `diag_forward` and `diag_backward` in plain torch (they build
the per-head (Q, Q) decay: the CPU form and the definition), and with use_triton three Triton
kernels that make the decay tile by tile on chip; the scan between chunks likewise
(`state_passing*`: a loop over chunks in torch, or one Triton kernel that reads each state once).

The backward is the chain rule through the lines above, in the same GEMM shapes
(see `backward`); `GroupedSSD` wraps both as an autograd function, `ssd_grouped` as
torch.library ops (what torch.compile traces around). Shapes (b batch, l length,
h heads, p head dim, n state size): x (b, l, h, p), dt (b, l, h) after softplus, A (h,) < 0,
B, C (b, l, n), D (h,) or None, initial_state (b, h, p, n) or None. Returns y (b, l, h, p) and the
final state (b, h, p, n) in fp32. Intermediates are fp32; the GEMM operands are x's dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F


# bf16/fp16 operands, fp32 products: cuBLAS writes fp32 directly (torch.bmm's out_dtype, CUDA only)
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def _matmul_f32(a, b):
    """a @ b over the last two dims, batched over the others, returned in fp32 at least: on CUDA with
    bf16/fp16 operands without rounding the fp32 accumulator to the operands' dtype first."""
    ft = torch.promote_types(a.dtype, torch.float32)
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _BMM_OUT_DTYPE:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a2 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b2 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        return torch.bmm(a2, b2, out_dtype=torch.float32).view(*batch, a.shape[-2], b.shape[-1])
    return torch.matmul(a, b).to(ft)


def _chunked(t, Q):
    """(b, l, ...) -> (b, c, Q, ...), zero-padded to a whole number of chunks (a zero dt and x
    leave the state unchanged, as the reference's padding does)."""
    b, l = t.shape[:2]
    c = -(-l // Q)
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, c * Q - l))
    return t.reshape(b, c, Q, *t.shape[2:])


def diag_forward(G, acum, xdt):
    """y[q, h] = sum_{s <= q} G[q, s] exp(acum[q, h] - acum[s, h]) xdt[s, h], per chunk.
    G (b, c, Q, Q), acum (b, c, Q, h), xdt (b, c, Q, h, p) -> (b, c, Q, h, p) fp32."""
    W = G[:, :, None] * _decay(acum)                                   # (b, c, h, Q, Q)
    return torch.einsum("bchqs,bcshp->bcqhp", W, xdt.to(G.dtype))


def diag_backward(G, acum, xdt, dy):
    """Gradients of diag_forward's output dy (b, c, Q, h, p): dxdt (b, c, Q, h, p),
    dG (b, c, Q, Q) (summed over heads), dacum (b, c, Q, h)."""
    E = _decay(acum)                                                   # (b, c, h, Q, Q)
    W = G[:, :, None] * E
    dy, xdt = dy.to(G.dtype), xdt.to(G.dtype)
    Dh = torch.einsum("bcqhp,bcshp->bchqs", dy, xdt)                   # dy_q . xdt_s per head
    dxdt = torch.einsum("bchqs,bcqhp->bcshp", W, dy)
    dG = (Dh * E).sum(2)
    M = W * Dh                                                         # d acum_q - d acum_s
    dacum = (M.sum(-1) - M.sum(-2)).transpose(-1, -2)                  # (b, c, Q, h)
    return dxdt, dG, dacum


def _decay(acum):
    """exp(acum_q - acum_s) on s <= q, else 0: (b, c, Q, h) -> (b, c, h, Q, Q) fp32."""
    a = acum.transpose(-1, -2)                                         # (b, c, h, Q)
    diff = a[..., :, None] - a[..., None, :]
    Q = a.shape[-1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return torch.exp(diff.masked_fill(~causal, -torch.inf))


def state_passing(states, a_end, initial=None):
    """The scan between chunks: states (b, c, h*p, n) fp32, each chunk's own state; a_end (b, c, h)
    the cumsum at each chunk's end; initial (b, h*p, n) or None. Returns S_prev (b, c, h*p, n), the
    state entering each chunk (S_prev_0 = initial, S_prev_{c+1} = exp(a_end_c) S_prev_c + states_c),
    and the final state (b, h*p, n)."""
    b, c, hp, n = states.shape
    decay = torch.exp(a_end).repeat_interleave(hp // a_end.shape[-1], dim=-1)[..., None]   # (b, c, h*p, 1)
    prev = states.new_zeros(b, hp, n) if initial is None else initial
    S_prev = torch.empty_like(states)
    for ci in range(c):
        S_prev[:, ci] = prev
        prev = decay[:, ci] * prev + states[:, ci]
    return S_prev, prev


def state_passing_backward(dS_local, S_prev, a_end, dfinal=None):
    """state_passing's backward. dS_local (b, c, h*p, n): the gradient of each S_prev through the
    output; dfinal (b, h*p, n) or None. Returns dstates (b, c, h*p, n) (the gradient of each chunk's
    own state, i.e. of S_prev_{c+1} in total), da_end (b, c, h), and the gradient of initial."""
    b, c, hp, n = S_prev.shape
    h = a_end.shape[-1]
    decay = torch.exp(a_end)                                           # (b, c, h)
    g = S_prev.new_zeros(b, hp, n) if dfinal is None else dfinal
    dstates, da_end = torch.empty_like(S_prev), torch.empty_like(a_end)
    for ci in reversed(range(c)):
        dstates[:, ci] = g
        da_end[:, ci] = decay[:, ci] * (g * S_prev[:, ci]).view(b, h, -1).sum(-1)
        g = dS_local[:, ci] + decay[:, ci].repeat_interleave(hp // h, dim=-1)[..., None] * g
    return dstates, da_end, g


def forward(x, dt, A, B, C, chunk_size, D=None, initial_state=None, use_triton=False):
    """y (b, l, h, p) in x's dtype, final state (b, h, p, n) fp32, and what backward needs.
    use_triton: the (Q, Q) part in the Triton kernels below (else plain torch)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    ft = torch.promote_types(x.dtype, torch.float32)                  # intermediates: fp32 at least
    xc, dtc = _chunked(x, Q), _chunked(dt.to(ft), Q)                  # (b, c, Q, h, p), (b, c, Q, h)
    Bc, Cc = _chunked(B, Q), _chunked(C, Q)                            # (b, c, Q, n)
    c = xc.shape[1]
    acum = torch.cumsum(dtc * A.to(ft), dim=2)                        # (b, c, Q, h)
    a_end = acum[:, :, -1]                                             # (b, c, h)
    xdt = xc.to(ft) * dtc[..., None]
    xs = (xdt * torch.exp(a_end[:, :, None] - acum)[..., None]).to(x.dtype)
    # chunk states, all heads in one GEMM per chunk: (h*p, Q) x (Q, n)
    states = _matmul_f32(xs.reshape(b, c, Q, h * p).transpose(-1, -2), Bc)   # (b, c, h*p, n)
    init = None if initial_state is None else initial_state.to(ft).reshape(b, h * p, n)
    S_prev, prev = (state_passing_triton if use_triton else state_passing)(states, a_end, init)
    # state -> output, all heads in one GEMM per chunk: (Q, n) x (n, h*p)
    y_off = _matmul_f32(Cc, S_prev.to(x.dtype).transpose(-1, -2)).view(b, c, Q, h, p)
    y_off = y_off * torch.exp(acum)[..., None]
    G = _matmul_f32(Cc, Bc.transpose(-1, -2))                 # (b, c, Q, Q), shared by the heads
    y = y_off + (diag_forward_triton if use_triton else diag_forward)(G, acum, xdt.to(x.dtype))
    if D is not None:
        y = y + D.to(ft)[:, None] * xc.to(ft)
    y = y.reshape(b, c * Q, h, p)[:, :l].to(x.dtype).contiguous()
    ctx = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, Q=Q, acum=acum, S_prev=S_prev, G=G,
               has_init=initial_state is not None, use_triton=use_triton)
    return y, prev.view(b, h, p, n), ctx


def backward(ctx, dy, dfinal=None):
    """Gradients of forward's (y, final state): dy (b, l, h, p), dfinal (b, h, p, n) or None.
    Returns dx, ddt, dA, dB, dC, dD (None without D), d initial_state (None without one)."""
    x, dt, A, B, C, D, Q = (ctx[k] for k in ("x", "dt", "A", "B", "C", "D", "Q"))
    acum, S_prev, G = ctx["acum"], ctx["S_prev"], ctx["G"]
    b, l, h, p = x.shape
    n = B.shape[-1]
    ft = acum.dtype
    xc, dtc, Bc, Cc = _chunked(x, Q), _chunked(dt.to(ft), Q), _chunked(B, Q), _chunked(C, Q)
    dyc = _chunked(dy, Q).to(ft)                                      # (b, c, Q, h, p)
    c = xc.shape[1]
    a_end = acum[:, :, -1]
    xdt = xc.to(ft) * dtc[..., None]
    to_end = torch.exp(a_end[:, :, None] - acum)                       # (b, c, Q, h)
    xs = (xdt * to_end[..., None]).to(x.dtype)
    dtype = x.dtype

    # state -> output: y_off = exp(acum) (C S_prev^T)
    dy_e = (dyc * torch.exp(acum)[..., None]).to(dtype).reshape(b, c, Q, h * p)
    dC = _matmul_f32(dy_e, S_prev.to(dtype))                  # (b, c, Q, n): K = h*p
    dS_local = _matmul_f32(dy_e.transpose(-1, -2), Cc)        # (b, c, h*p, n)
    # d acum from y_off = exp(acum) (C S_prev^T): y_off . dy, with y_off made again (one GEMM)
    # rather than kept from the forward (h*p values per position, per layer)
    y_off = _matmul_f32(Cc, S_prev.to(dtype).transpose(-1, -2)).view(b, c, Q, h, p)
    dacum = (y_off * torch.exp(acum)[..., None] * dyc).sum(-1)         # (b, c, Q, h)

    # the scan between chunks, backwards
    g = None if dfinal is None else dfinal.to(ft).reshape(b, h * p, n)
    scan_backward = state_passing_backward_triton if ctx["use_triton"] else state_passing_backward
    dstates, da_end, g = scan_backward(dS_local, S_prev, a_end, g)
    d_init = g.view(b, h, p, n) if ctx["has_init"] else None

    # chunk states: S = xs^T B
    dxs = _matmul_f32(Bc, dstates.to(dtype).transpose(-1, -2)).view(b, c, Q, h, p)   # K = n
    dB = _matmul_f32(xs.reshape(b, c, Q, h * p), dstates.to(dtype))                 # K = h*p
    t = (dxs * xs.to(ft)).sum(-1)                                     # (b, c, Q, h)
    dxdt = dxs * to_end[..., None]
    dacum = dacum - t
    da_end = da_end + t.sum(2)

    # inside the chunks
    diag = diag_backward_triton if ctx["use_triton"] else diag_backward
    dxdt_diag, dG, dacum_diag = diag(G, acum, xdt.to(dtype), dyc)
    dxdt = dxdt + dxdt_diag
    dacum = dacum + dacum_diag
    dC = dC + _matmul_f32(dG.to(dtype), Bc)
    dB = dB + _matmul_f32(dG.transpose(-1, -2).to(dtype), Cc)
    dacum[:, :, -1] += da_end

    # acum = cumsum(dt A): each a_t reaches every acum_q with q >= t
    da = dacum.flip(2).cumsum(2).flip(2)                               # (b, c, Q, h)
    ddt = (dxdt * xc.to(ft)).sum(-1) + da * A.to(ft)
    dA = (da * dtc).sum((0, 1, 2))
    dx = dxdt * dtc[..., None]
    dD = None
    if D is not None:
        dx = dx + D.to(ft)[:, None] * dyc
        dD = (dyc * xc.to(ft)).sum((0, 1, 2, 4))
    unchunk = lambda t: t.reshape(b, c * Q, *t.shape[3:])[:, :l].contiguous()  # noqa: E731
    return (unchunk(dx).to(x.dtype), unchunk(ddt).to(dt.dtype), dA.to(A.dtype), unchunk(dB).to(B.dtype),
            unchunk(dC).to(C.dtype), None if dD is None else dD.to(D.dtype),
            None if d_init is None else d_init)


class GroupedSSD(torch.autograd.Function):
    """forward/backward above as an autograd function: apply(x, dt, A, B, C, chunk_size, D,
    initial_state, use_triton) -> (y, final_state)."""

    @staticmethod
    def forward(fctx, x, dt, A, B, C, chunk_size, D=None, initial_state=None, use_triton=False):
        y, final, ctx = forward(x, dt, A, B, C, chunk_size, D, initial_state, use_triton)
        fctx.ctx = ctx
        fctx.init_dtype = None if initial_state is None else initial_state.dtype
        return y, final

    @staticmethod
    def backward(fctx, dy, dfinal):
        dx, ddt, dA, dB, dC, dD, d_init = backward(fctx.ctx, dy, dfinal)
        if d_init is not None:
            d_init = d_init.to(fctx.init_dtype)
        return dx, ddt, dA, dB, dC, None, dD, d_init, None


# --------------------------------------------------------------------------------------------
# The per-head (Q, Q) part in Triton: the decay is made on chip, tile by tile, never stored.
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch has no triton
    triton = None

if triton is not None:

    @triton.jit
    def _diag_fwd_kernel(G_ptr, acum_ptr, xdt_ptr, y_ptr, H, P,
                         s_G_bc, s_G_q, s_a_bc, s_a_q, s_x_bc, s_x_q, s_x_h, s_y_bc, s_y_q, s_y_h,
                         BM: tl.constexpr, BP: tl.constexpr):
        """y[q, h, :] = sum_{s <= q} G[q, s] exp(acum[q, h] - acum[s, h]) xdt[s, h, :].
        Grid (b*c, h, Q / BM): rows q of one row block, one head; loop over the row blocks s <= q."""
        bc, h, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q = m * BM + tl.arange(0, BM)
        pp = tl.arange(0, BP)
        p_ok = pp < P
        a_q = tl.load(acum_ptr + bc * s_a_bc + q * s_a_q + h)                          # (BM,)
        acc = tl.zeros((BM, BP), dtype=tl.float32)
        for s0 in range(0, (m + 1) * BM, BM):
            s = s0 + tl.arange(0, BM)
            a_s = tl.load(acum_ptr + bc * s_a_bc + s * s_a_q + h)
            G = tl.load(G_ptr + bc * s_G_bc + q[:, None] * s_G_q + s[None, :])            # (BM, BM) fp32
            causal = q[:, None] >= s[None, :]
            E = tl.exp(tl.where(causal, a_q[:, None] - a_s[None, :], float("-inf")))
            x = tl.load(xdt_ptr + bc * s_x_bc + s[:, None] * s_x_q + h * s_x_h + pp[None, :],
                        mask=p_ok[None, :], other=0.0)                                  # (BM, BP)
            acc = tl.dot((G * E).to(x.dtype), x, acc)
        tl.store(y_ptr + bc * s_y_bc + q[:, None] * s_y_q + h * s_y_h + pp[None, :], acc, mask=p_ok[None, :])

    @triton.jit
    def _diag_bwd_x_kernel(G_ptr, acum_ptr, xdt_ptr, dy_ptr, dxdt_ptr, dacum_col_ptr, dacum_row_ptr,
                           H, P, Q,
                           s_G_bc, s_G_q, s_a_bc, s_a_q, s_x_bc, s_x_q, s_x_h, s_dy_bc, s_dy_q, s_dy_h,
                           s_r_bc, s_r_h, s_r_blk,
                           BM: tl.constexpr, BP: tl.constexpr):
        """For the columns s of one row block and one head: dxdt[s] = sum_{q >= s} W[q, s] dy[q],
        -sum_q M[q, s] (into dacum_col), and M's row sums over these s (into dacum_row, one slot per
        column block: summed afterwards), with W = G * decay and M = W * (dy_q . xdt_s).
        Grid (b*c, h, Q / BM)."""
        bc, h, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        s = blk * BM + tl.arange(0, BM)
        pp = tl.arange(0, BP)
        p_ok = pp < P
        a_s = tl.load(acum_ptr + bc * s_a_bc + s * s_a_q + h)
        x_s = tl.load(xdt_ptr + bc * s_x_bc + s[:, None] * s_x_q + h * s_x_h + pp[None, :],
                      mask=p_ok[None, :], other=0.0)                                    # (BM, BP)
        dx = tl.zeros((BM, BP), dtype=tl.float32)
        col = tl.zeros((BM,), dtype=tl.float32)
        for q0 in range(blk * BM, Q, BM):
            q = q0 + tl.arange(0, BM)
            a_q = tl.load(acum_ptr + bc * s_a_bc + q * s_a_q + h)
            G = tl.load(G_ptr + bc * s_G_bc + q[:, None] * s_G_q + s[None, :])
            causal = q[:, None] >= s[None, :]
            W = G * tl.exp(tl.where(causal, a_q[:, None] - a_s[None, :], float("-inf")))    # (BM q, BM s)
            dy = tl.load(dy_ptr + bc * s_dy_bc + q[:, None] * s_dy_q + h * s_dy_h + pp[None, :],
                         mask=p_ok[None, :], other=0.0)                                 # (BM, BP)
            Dh = tl.dot(dy, tl.trans(x_s.to(dy.dtype)))                                 # (BM q, BM s)
            M = W * Dh
            dx = tl.dot(tl.trans(W.to(dy.dtype)), dy, dx)
            col += tl.sum(M, axis=0)
            tl.store(dacum_row_ptr + bc * s_r_bc + h * s_r_h + blk * s_r_blk + q, tl.sum(M, axis=1))
        tl.store(dxdt_ptr + bc * s_x_bc + s[:, None] * s_x_q + h * s_x_h + pp[None, :], dx, mask=p_ok[None, :])
        tl.store(dacum_col_ptr + bc * s_a_bc + s * s_a_q + h, -col)

    @triton.jit
    def _diag_bwd_G_kernel(acum_ptr, xdt_ptr, dy_ptr, dG_ptr, H, P,
                           s_a_bc, s_a_q, s_x_bc, s_x_q, s_x_h, s_dy_bc, s_dy_q, s_dy_h, s_G_bc, s_G_q,
                           BM: tl.constexpr, BP: tl.constexpr):
        """dG[q, s] = sum_h (dy_q . xdt_s)_h exp(acum_q - acum_s)_h on s <= q, one (BM, BM) tile.
        Grid (b*c, Q / BM rows, Q / BM columns); tiles above the diagonal are zero."""
        bc, mq, ms = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q = mq * BM + tl.arange(0, BM)
        s = ms * BM + tl.arange(0, BM)
        pp = tl.arange(0, BP)
        p_ok = pp < P
        causal = q[:, None] >= s[None, :]
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        if ms <= mq:
            for h in range(0, H):
                a_q = tl.load(acum_ptr + bc * s_a_bc + q * s_a_q + h)
                a_s = tl.load(acum_ptr + bc * s_a_bc + s * s_a_q + h)
                dy = tl.load(dy_ptr + bc * s_dy_bc + q[:, None] * s_dy_q + h * s_dy_h + pp[None, :],
                             mask=p_ok[None, :], other=0.0)
                x = tl.load(xdt_ptr + bc * s_x_bc + s[:, None] * s_x_q + h * s_x_h + pp[None, :],
                            mask=p_ok[None, :], other=0.0)
                Dh = tl.dot(dy, tl.trans(x.to(dy.dtype)))
                acc += Dh * tl.exp(tl.where(causal, a_q[:, None] - a_s[None, :], float("-inf")))
        tl.store(dG_ptr + bc * s_G_bc + q[:, None] * s_G_q + s[None, :], acc)


    @triton.jit
    def _scan_fwd_kernel(states_ptr, a_end_ptr, init_ptr, final_ptr, C, H, HPN, PN,
                         HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        """state_passing in place: states (b, c, h*p*n) become S_prev. Grid (b, h*p*n / BLOCK); a
        block lies inside one head (BLOCK divides p*n), so one decay per chunk."""
        bi, blk = tl.program_id(0), tl.program_id(1)
        o = blk * BLOCK + tl.arange(0, BLOCK)
        head = (blk * BLOCK) // PN
        if HAS_INIT:
            prev = tl.load(init_ptr + bi * HPN + o)
        else:
            prev = tl.zeros((BLOCK,), dtype=tl.float32)
        for ci in range(0, C):
            ptrs = states_ptr + (bi * C + ci) * HPN + o
            st = tl.load(ptrs)
            tl.store(ptrs, prev)
            decay = tl.exp(tl.load(a_end_ptr + (bi * C + ci) * H + head))
            prev = decay * prev + st
        tl.store(final_ptr + bi * HPN + o, prev)

    @triton.jit
    def _scan_bwd_kernel(dS_ptr, S_prev_ptr, a_end_ptr, dfinal_ptr, dinit_ptr, da_part_ptr, C, H, HPN, PN, NBLK,
                         HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
        """state_passing_backward in place: dS (b, c, h*p*n), the local gradients, become dstates; the
        sums of g * S_prev over this block go to da_part (b, c, h*p*n / BLOCK), summed per head after.
        Grid (b, h*p*n / BLOCK)."""
        bi, blk = tl.program_id(0), tl.program_id(1)
        o = blk * BLOCK + tl.arange(0, BLOCK)
        head = (blk * BLOCK) // PN
        if HAS_DFINAL:
            g = tl.load(dfinal_ptr + bi * HPN + o)
        else:
            g = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, C):
            ci = C - 1 - i
            decay = tl.exp(tl.load(a_end_ptr + (bi * C + ci) * H + head))
            S = tl.load(S_prev_ptr + (bi * C + ci) * HPN + o)
            tl.store(da_part_ptr + (bi * C + ci) * NBLK + blk, decay * tl.sum(g * S, axis=0))
            ptrs = dS_ptr + (bi * C + ci) * HPN + o
            local = tl.load(ptrs)
            tl.store(ptrs, g)
            g = local + decay * g
        tl.store(dinit_ptr + bi * HPN + o, g)


def _block(Q):
    return min(64, Q)


def diag_forward_triton(G, acum, xdt):
    """diag_forward in one Triton kernel. G (b, c, Q, Q) contiguous fp32, acum (b, c, Q, h) fp32,
    xdt (b, c, Q, h, p); Q a power of two >= 16. Returns (b, c, Q, h, p) fp32."""
    b, c, Q, h, p = xdt.shape
    BM = _block(Q)
    G, acum, xdt = G.contiguous(), acum.contiguous(), xdt.contiguous()
    y = torch.empty(b, c, Q, h, p, device=xdt.device, dtype=torch.float32)
    _diag_fwd_kernel[(b * c, h, Q // BM)](
        G, acum, xdt, y, h, p, Q * Q, Q, Q * h, h, Q * h * p, h * p, p, Q * h * p, h * p, p,
        BM=BM, BP=max(16, triton.next_power_of_2(p)))
    return y


def diag_backward_triton(G, acum, xdt, dy):
    """diag_backward in two Triton kernels (same arguments and results)."""
    b, c, Q, h, p = xdt.shape
    BM = _block(Q)
    nblk = Q // BM
    G, acum, xdt = G.contiguous(), acum.contiguous(), xdt.contiguous()
    dy = dy.to(xdt.dtype).contiguous()
    dev = xdt.device
    dxdt = torch.empty(b, c, Q, h, p, device=dev, dtype=torch.float32)
    dacum_col = torch.empty(b, c, Q, h, device=dev, dtype=torch.float32)
    dacum_row = torch.zeros(b, c, h, nblk, Q, device=dev, dtype=torch.float32)
    BP = max(16, triton.next_power_of_2(p))
    _diag_bwd_x_kernel[(b * c, h, nblk)](
        G, acum, xdt, dy, dxdt, dacum_col, dacum_row, h, p, Q,
        Q * Q, Q, Q * h, h, Q * h * p, h * p, p, Q * h * p, h * p, p, h * nblk * Q, nblk * Q, Q,
        BM=BM, BP=BP)
    dG = torch.empty(b, c, Q, Q, device=dev, dtype=torch.float32)
    _diag_bwd_G_kernel[(b * c, nblk, nblk)](
        acum, xdt, dy, dG, h, p, Q * h, h, Q * h * p, h * p, p, Q * h * p, h * p, p, Q * Q, Q,
        BM=BM, BP=BP)
    dacum = dacum_col + dacum_row.sum(3).transpose(-1, -2)
    return dxdt, dG, dacum


def _scan_block(pn):
    """The largest power of two <= 1024 that divides p*n: a block then lies inside one head."""
    return min(1024, pn & -pn)


def state_passing_triton(states, a_end, initial=None):
    """state_passing in one Triton kernel; overwrites states (b, c, h*p, n) fp32 contiguous with S_prev."""
    b, c, hp, n = states.shape
    h = a_end.shape[-1]
    pn = hp // h * n
    BLOCK = _scan_block(pn)
    a_end = a_end.contiguous()
    final = torch.empty(b, hp, n, device=states.device, dtype=states.dtype)
    _scan_fwd_kernel[(b, hp * n // BLOCK)](states, a_end, states if initial is None else initial.contiguous(),
                                          final, c, h, hp * n, pn, HAS_INIT=initial is not None, BLOCK=BLOCK)
    return states, final


def state_passing_backward_triton(dS_local, S_prev, a_end, dfinal=None):
    """state_passing_backward in one Triton kernel; overwrites dS_local (contiguous fp32) with dstates."""
    b, c, hp, n = S_prev.shape
    h = a_end.shape[-1]
    pn = hp // h * n
    BLOCK = _scan_block(pn)
    nblk = hp * n // BLOCK
    a_end = a_end.contiguous()
    d_init = torch.empty(b, hp, n, device=S_prev.device, dtype=S_prev.dtype)
    da_part = torch.empty(b, c, nblk, device=S_prev.device, dtype=torch.float32)
    _scan_bwd_kernel[(b, nblk)](dS_local, S_prev, a_end, S_prev if dfinal is None else dfinal.contiguous(), d_init,
                                da_part, c, h, hp * n, pn, nblk, HAS_DFINAL=dfinal is not None, BLOCK=BLOCK)
    return dS_local, da_part.view(b, c, h, -1).sum(-1), d_init


# --------------------------------------------------------------------------------------------
# The same as torch.library ops, so that torch.compile traces around them (as kernels.mamba2_train)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("ssmttm::ssd_grouped_fwd", mutates_args=())
def _ssd_grouped_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor, initial_state: Optional[torch.Tensor], chunk_size: int,
                     use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """forward as an op: y, the final state, then acum, S_prev and G for the backward."""
    y, final, ctx = forward(x, dt, A, B, C, chunk_size, D, initial_state, use_triton)
    return y, final, ctx["acum"], ctx["S_prev"], ctx["G"]


@_ssd_grouped_fwd.register_fake
def _(x, dt, A, B, C, D, initial_state, chunk_size, use_triton):
    b, l, h, p = x.shape
    n, Q, c = B.shape[-1], chunk_size, -(-l // chunk_size)
    ft = torch.promote_types(x.dtype, torch.float32)
    new = lambda *shape: x.new_empty(shape, dtype=ft)  # noqa: E731
    return x.new_empty(b, l, h, p), new(b, h, p, n), new(b, c, Q, h), new(b, c, h * p, n), new(b, c, Q, Q)


@torch.library.custom_op("ssmttm::ssd_grouped_bwd", mutates_args=())
def _ssd_grouped_bwd(dy: torch.Tensor, dfinal: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, initial_state: Optional[torch.Tensor],
                     acum: torch.Tensor, S_prev: torch.Tensor, G: torch.Tensor, chunk_size: int,
                     use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    """backward as an op: dx, ddt, dA, dB, dC, dD, d initial_state (empty without one)."""
    ctx = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, Q=chunk_size, acum=acum, S_prev=S_prev, G=G,
               has_init=initial_state is not None, use_triton=use_triton)
    *grads, d_init = backward(ctx, dy, dfinal)
    return (*grads, x.new_empty(0) if d_init is None else d_init.to(initial_state.dtype))


@_ssd_grouped_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, initial_state, acum, S_prev, G, chunk_size, use_triton):
    d_init = x.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C, D)) + (d_init,)


def _ssd_grouped_setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, chunk_size, use_triton = inputs
    ctx.has_init = initial_state is not None
    saved = (x, dt, A, B, C, D) + ((initial_state,) if ctx.has_init else ()) + tuple(output[2:])
    ctx.save_for_backward(*saved)
    ctx.sizes = chunk_size, use_triton


def _ssd_grouped_backward(ctx, dy, dfinal, *_):  # acum, S_prev and G are for the backward, not used
    x, dt, A, B, C, D, *rest = ctx.saved_tensors
    initial_state = rest.pop(0) if ctx.has_init else None
    acum, S_prev, G = rest
    *grads, d_init = _ssd_grouped_bwd(dy, dfinal, x, dt, A, B, C, D, initial_state, acum, S_prev, G, *ctx.sizes)
    return (*grads, d_init if ctx.has_init else None, None, None)


_ssd_grouped_fwd.register_autograd(_ssd_grouped_backward, setup_context=_ssd_grouped_setup)


def ssd_grouped(x, dt, A, B, C, chunk_size, D, initial_state=None, use_triton=False):
    """GroupedSSD as the ssmttm::ssd_grouped_* ops: (y, final_state); D is required here."""
    y, final, *_ = _ssd_grouped_fwd(x, dt, A, B, C, D, initial_state, chunk_size, use_triton)
    return y, final
