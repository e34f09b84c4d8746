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
cuBLAS (fp32 results from bf16 operands), but for the chunk states, which are made inside the
scan between chunks (the state stays on chip, chunk after chunk, never written in fp32). What is
per head is the (Q, Q) part inside a chunk, G * exp(acum_q - acum_s) on s <= q.

Two forms of the same arithmetic: `forward` / `backward` in plain torch (any device; they build the
per-head (Q, Q) decay and loop over chunks: the definition, and the CPU path), and `forward_triton`
/ `backward_triton`, where the chunk states with the scan each way, the (Q, Q) part and every
elementwise pass are Triton kernels (the decay made on chip, tile by tile; the elementwise
passes fused into the kernels' prologues and epilogues; on Hopper the chunk-state kernels and dG's
read their tiles through TMA descriptors) and the other state products cuBLAS GEMMs.
The backward is the chain rule through the lines above, in the same GEMM shapes. `ssd_grouped` is
the entry point: both as torch.library ops with autograd (what torch.compile traces around). Shapes (b batch,
l length, h heads, p head dim, n state size): x (b, l, h, p), dt (b, l, h) after softplus, A (h,) < 0,
B, C (b, l, n), D (h,) or None, initial_state (b, h, p, n) or None. Returns y (b, l, h, p) and the
final state (b, h, p, n) in fp32. Intermediates are fp32; the GEMM operands are x's dtype.
"""
import math
from typing import Optional

import torch

from ssd_reference import check_chunk_size


# bf16/fp16 operands, fp32 products: cuBLAS writes fp32 directly (torch.bmm's and torch.baddbmm's
# out_dtype, CUDA only)
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads() and "dtype" in torch.ops.aten.baddbmm.overloads()


def _matmul_f32(a, b, add=None):
    """a @ b (+ add) over the last two dims, batched over the others, returned in fp32 at least: on
    CUDA with bf16/fp16 operands without rounding the fp32 accumulator to the operands' dtype first,
    and add (fp32, the product's shape) read by the GEMM itself instead of in a pass of its own. On
    that path the GEMM accumulates into add and returns it (add is overwritten: pass a temporary),
    rather than copying it into a new tensor first."""
    ft = torch.promote_types(a.dtype, torch.float32)
    if not a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        out = torch.matmul(a.float(), b.float())   # the same products, accumulated in fp32
    elif a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _BMM_OUT_DTYPE:
        if a.shape[:-2] != b.shape[:-2]:  # (broadcast_shapes costs host time the SSD's calls do not need)
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            a, b = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
        a2, b2 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        shape = (*a.shape[:-1], b.shape[-1])
        if add is not None:
            acc = add.view(-1, *shape[-2:])
            return torch.baddbmm(acc, a2, b2, out_dtype=torch.float32, out=acc).view(shape)
        return torch.bmm(a2, b2, out_dtype=torch.float32).view(shape)
    else:
        out = torch.matmul(a, b).to(ft)
    return out if add is None else out + add


def _chunked(t, Q):
    """(b, l, ...) -> (b, c, Q, ...), zero-padded to a whole number of chunks (a zero dt and x
    leave the state unchanged, as the reference's padding does): a view when l is a whole number of
    chunks, else one copy (a concatenation with the zeros: F.pad would fill it all first)."""
    b, l = t.shape[:2]
    c = -(-l // Q)
    if c * Q == l:
        return t.reshape(b, c, Q, *t.shape[2:])
    return torch.cat([t, t.new_zeros(b, c * Q - l, *t.shape[2:])], dim=1).view(b, c, Q, *t.shape[2:])


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
    and the final state (b, h*p, n). ValueError for an a_end or initial of other shapes (one of batch 1 would be
    carried into every row)."""
    b, c, hp, n = states.shape
    if a_end.dim() != 3 or a_end.shape[:2] != (b, c) or (initial is not None and initial.shape != (b, hp, n)):
        got = None if initial is None else tuple(initial.shape)
        raise ValueError(f"state_passing: a_end {tuple(a_end.shape)}, initial {got}: want ({b}, {c}, h) and "
                         f"({b}, {hp}, {n}) for states {tuple(states.shape)}")
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


def forward(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """The torch form (any device, any float dtype). Returns y (b, l, h, p) in x's dtype, the final
    state (b, h, p, n) fp32, and what `backward` needs: acum (b, c, Q, h) fp32, S_prev (b, c, h*p, n)
    in x's dtype (the state entering each chunk, as the GEMMs take it), G = C B^T (b, c, Q, Q) fp32,
    y_off = C S_prev^T (b, c, Q, h*p) fp32 (y's state -> output part is exp(acum) y_off), kept for d acum in
    fp32: rounded to x's dtype, its products with dy no longer cancel in d acum's sums (BENCHMARKS.md, 0c),
    and xs (b, c, Q, h*p) in x's dtype, the chunk states' operand, which dB's product takes again. The final state
    and the fp32 intermediates are float64 for float64 inputs. Raises TypeError / ValueError as _check_inputs (B
    and C as forward_triton takes them)."""
    _check_inputs("forward", x, dt, A, B, C, chunk_size, D, initial_state)
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
    S_prev, final = state_passing(states, a_end, init)
    S_prev = S_prev.to(x.dtype)
    # state -> output, all heads in one GEMM per chunk: (Q, n) x (n, h*p)
    y_off = _matmul_f32(Cc, S_prev.transpose(-1, -2)).view(b, c, Q, h, p)
    G = _matmul_f32(Cc, Bc.transpose(-1, -2))                 # (b, c, Q, Q), shared by the heads
    y = y_off * torch.exp(acum)[..., None] + diag_forward(G, acum, xdt.to(x.dtype))
    if D is not None:
        y = y + D.to(ft)[:, None] * xc.to(ft)
    y = y.reshape(b, c * Q, h, p)[:, :l].to(x.dtype).contiguous()
    return y, final.view(b, h, p, n), acum, S_prev, G, y_off.view(b, c, Q, h * p), xs.reshape(b, c, Q, h * p)


def backward(dy, dfinal, x, dt, A, B, C, D, initial_state, acum, S_prev, G, y_off, xs, chunk_size):
    """The torch form of the gradients of forward's (y, final state): dy (b, l, h, p), dfinal
    (b, h, p, n) or None, then forward's inputs and saved tensors. Returns dx, ddt, dA, dB, dC, dD (None
    without D), d initial_state (None without one). ValueError for dy or dfinal of other shapes (_check_grads)."""
    Q = chunk_size
    b, l, h, p = x.shape
    n = B.shape[-1]
    _check_grads("backward", dy, dfinal, x, n)
    ft = acum.dtype
    xc, dtc, Bc, Cc = _chunked(x, Q), _chunked(dt.to(ft), Q), _chunked(B, Q), _chunked(C, Q)
    dyc = _chunked(dy, Q).to(ft)                                      # (b, c, Q, h, p)
    c = xc.shape[1]
    a_end = acum[:, :, -1]
    xdt = xc.to(ft) * dtc[..., None]
    to_end = torch.exp(a_end[:, :, None] - acum)                       # (b, c, Q, h)
    xs = xs.view(b, c, Q, h, p)
    dtype = x.dtype

    # state -> output: y's part exp(acum) (C S_prev^T)
    dy_e = (dyc * torch.exp(acum)[..., None]).to(dtype).reshape(b, c, Q, h * p)
    dC = _matmul_f32(dy_e, S_prev)                            # (b, c, Q, n): K = h*p
    dS_local = _matmul_f32(dy_e.transpose(-1, -2), Cc)        # (b, c, h*p, n)
    # d acum from y's state -> output part exp(acum) y_off: its product with dy, y_off kept from the forward
    dacum = (y_off.view(b, c, Q, h, p) * torch.exp(acum)[..., None] * dyc).sum(-1)   # (b, c, Q, h)

    # the scan between chunks, backwards
    g = None if dfinal is None else dfinal.to(ft).reshape(b, h * p, n)
    dstates, da_end, g = state_passing_backward(dS_local, S_prev.to(ft), a_end, g)
    d_init = g.view(b, h, p, n) if initial_state is not None else None

    # chunk states: S = xs^T B
    dstates = dstates.to(dtype)
    # dxs rounded to x's dtype, as the Triton form stores it (half the traffic of fp32; the errors of
    # BENCHMARKS.md, section 0c)
    dxs = _matmul_f32(Bc, dstates.transpose(-1, -2)).to(dtype).to(ft).view(b, c, Q, h, p)   # K = n
    dB = _matmul_f32(xs.reshape(b, c, Q, h * p), dstates)                 # K = h*p
    t = (dxs * xs.to(ft)).sum(-1)                                     # (b, c, Q, h)
    dxdt = dxs * to_end[..., None]
    dacum = dacum - t
    da_end = da_end + t.sum(2)

    # inside the chunks
    dxdt_diag, dG, dacum_diag = diag_backward(G, acum, xdt, dyc)   # xdt in fp32 (the kernels: x, then dt)
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
            None if d_init is None else d_init.to(initial_state.dtype))


# --------------------------------------------------------------------------------------------
# The same in Triton (use_triton): kernels that read x, dt and dy where they lie (no padded copies;
# B and C too in the state kernels, while the GEMMs take them padded to whole chunks): the prologue
# (acum; xs for the backward's dB), the chunk states with the scan each way (the state on chip), the
# (Q, Q) part with its epilogue (y; dx, ddt, d acum, dD), dy's scaling, dG, dG's products with B and
# C (which write dC and dB where they go), the last pass through acum = cumsum(dt A) and the sums of
# dA and dD over the chunks. The other state products stay cuBLAS GEMMs. One more copies B and C,
# rows of any stride, into chunks for the GEMMs.
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch has no triton
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: the kernels read every tile through pointers
    TensorDescriptor = None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a grid or a block on the host. triton.cdiv (and triton.next_power_of_2) are
    constexpr functions in Triton 3.6, about 3 µs per call from host code, which a training step
    makes hundreds of times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), on the host; see cdiv."""
    return 1 << max(n - 1, 0).bit_length()


def as_is(kernel):
    """How the Triton functions here launch their kernels by default (`launch`): the kernel itself. Inside a
    torch.library.triton_op, launch=torch.library.wrap_triton instead lets torch.compile see each launch
    (Inductor then makes it from its generated code, with less host time per launch)."""
    return kernel


if triton is not None:

    # Indexing: each program computes its tensors' base pointers once, in int64 (b * L * H * P can pass
    # 2^31), and every offset inside a tile in int32. int64 offset tiles took twice the registers,
    # which capped the heavy kernels at 2 programs per SM (255 registers per thread).

    @triton.jit
    def _rows(base, rows, stride, ok, pp, P):
        """A (len(rows), BP) tile of rows (int32, counted from base) stride elements apart, P values each
        (a head's slice of a (b*L, H, P) tensor when base points at it), zero where not ok and past P."""
        return tl.load(base + rows[:, None] * stride + pp[None, :], mask=ok[:, None] & (pp[None, :] < P), other=0.0)

    @triton.jit
    def _head_rows(t, bi, r0, L, h, P, S, SB, BM: tl.constexpr, BP: tl.constexpr, TMA: tl.constexpr):
        """Rows r0 ... r0 + BM - 1 of sequence bi of t (b, L, h, p), head h's P values each: a (BM, BP)
        tile, zero past L and past P. t: a TMA descriptor with tiles (1, BM, 1, BP) if TMA, else a
        pointer to rows S elements apart, sequences SB apart."""
        if TMA:
            tile = t.load([tl.cast(bi, tl.int32), tl.cast(r0, tl.int32), h, 0]).reshape(BM, BP)
        else:
            i = tl.arange(0, BM)
            tile = _rows(t + bi.to(tl.int64) * SB + r0 * S + h * P, i, S, r0 + i < L, tl.arange(0, BP), P)
        return tile

    @triton.jit
    def _head_vectors(acum_c, dt_c, r, q, s, h, Q: tl.constexpr):
        """Head h's acum at position r and at the positions q and s of one chunk, and its dt at s: acum_c and
        dt_c point at the chunk's (h, Q) rows of acum and dtc (b, c, h, Q)."""
        a, d = acum_c + h * Q, dt_c + h * Q
        return tl.load(a + r), tl.load(a + q), tl.load(a + s), tl.load(d + s)

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, SB_SRC, L_DST, L, N, S_SRC, S_DST,
                          BL: tl.constexpr, BN: tl.constexpr):
        """dst[b, r, :N] = src[b, r, :N] for rows r < L, 0 for L <= r < L_DST, in dst's dtype: src (b, L, N)
        with rows S_SRC and sequences SB_SRC elements apart, dst (b, L_DST, N) with rows S_DST apart. Grid
        (cdiv(L_DST, BL), b)."""
        r0 = tl.program_id(0) * BL
        bi = tl.program_id(1).to(tl.int64)
        r = tl.arange(0, BL)
        cols = tl.arange(0, BN)
        ok = (r < L - r0)[:, None] & (cols[None, :] < N)
        v = tl.load(src_ptr + bi * SB_SRC + r0 * S_SRC + r[:, None] * S_SRC + cols[None, :], mask=ok, other=0.0)
        tl.store(dst_ptr + (bi * L_DST + r0) * S_DST + r[:, None] * S_DST + cols[None, :],
                 v.to(dst_ptr.dtype.element_ty), mask=(r < L_DST - r0)[:, None] & (cols[None, :] < N))

    @triton.jit
    def _prep_kernel(x_ptr, dt_ptr, A_ptr, acum_ptr, dtc_ptr, xs_ptr, L, NC, H, P, SX, SXB,
                     Q: tl.constexpr, BP: tl.constexpr):
        """xs = x dt exp(acum_end - acum) in xs's dtype, (b, c, Q, h, p), zero past L (the chunk states'
        operand in the forward, kept for dB's in the backward), with acum = cumsum(dt A) over one chunk,
        also written to acum (b, c, h, Q), and dt to dtc (b, c, h, Q), zero past L: a head's values of a chunk
        in one row, which the (Q, Q) kernels load as a vector (from (b, L, h), each value a 32-byte sector of
        its own). x (b, L, h, p) with rows SX and sequences SXB apart, dt (b, L, h). Grid (h, b*c)."""
        h, bc = tl.program_id(0), tl.program_id(1).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        r0 = bi * L + ci * Q                                            # the chunk's first row of (b*L)
        q = tl.arange(0, Q)
        ok = q < (L - ci * Q).to(tl.int32)
        dt = tl.load(dt_ptr + r0 * H + h + q * H, mask=ok, other=0.0)
        acum = tl.cumsum(dt * tl.load(A_ptr + h), axis=0)
        tl.store(acum_ptr + (bc * H + h) * Q + q, acum)
        tl.store(dtc_ptr + (bc * H + h) * Q + q, dt)
        a_end = tl.sum(tl.where(q == Q - 1, acum, 0.0), axis=0)
        pp = tl.arange(0, BP)
        x = _rows(x_ptr + bi * SXB + ci * Q * SX + h * P, q, SX, ok, pp, P)
        xs = x.to(tl.float32) * (dt * tl.exp(a_end - acum))[:, None]
        tl.store(xs_ptr + bc * Q * H * P + h * P + q[:, None] * (H * P) + pp[None, :],
                 xs.to(xs_ptr.dtype.element_ty), mask=pp[None, :] < P)

    @triton.jit
    def _states_fwd_kernel(xs_in, acum_ptr, B_in, init_ptr, S_prev_ptr, final_ptr, L, NC, H, P, N, SB, SBB,
                           Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           HAS_INIT: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
        """The chunk states and the scan between chunks in one pass, the state on chip: for one (p, BN)
        tile of head h's state, chunk after chunk, S_prev_c = prev (written in S_prev's dtype,
        (b, c, h*p, n)), prev = exp(acum_end) prev + xs^T B over the chunk's Q positions. xs (b, c*Q,
        h, p) = x dt exp(acum_end - acum) from _prep_kernel, so that its tiles go to the product as they
        load, and B (b, L, n), or (b, c*Q, n) with zeros past L: with TMA, descriptors (_descriptor) with
        tiles (1, BK, 1, BP) and (1, BK, BN); else pointers, B's rows SB and sequences SBB apart. The
        initial state in any float dtype; the final state (b, h*p, n) in fp32 or final_out's dtype
        (forward_triton). Grid (n / BN, h, b): the n tiles of one head side by side. One loop over every
        (chunk, BK positions) step rather than a loop per chunk: the pipeliner then loads the next chunk's
        tiles while this chunk's last product runs."""
        nt, h, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pp = tl.arange(0, BP)
        ns = nt * BN + tl.arange(0, BN)
        tile_ok = (pp[:, None] < P) & (ns[None, :] < N)
        tile = (h * P + pp[:, None]) * N + ns[None, :]                   # inside one (h*p, n) state
        state = bi.to(tl.int64) * H * P * N                              # this batch's (h*p, n) state
        if HAS_INIT:  # in its own dtype (a bf16 decoding state is read as it is stored)
            acc = tl.load(init_ptr + state + tile, mask=tile_ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BP, BN), dtype=tl.float32)
        KT: tl.constexpr = Q // BK
        for i in range(0, NC * KT):
            ci, k0 = i // KT, (i % KT) * BK
            bc = bi.to(tl.int64) * NC + ci
            a_end = tl.load(acum_ptr + (bc * H + h) * Q + Q - 1)
            q = k0 + tl.arange(0, BK)
            if TMA:
                Bt = B_in.load([bi, ci * Q + k0, nt * BN]).reshape(BK, BN)
                xsT = tl.trans(xs_in.load([bi, ci * Q + k0, h, 0]).reshape(BK, BP))
            else:
                Bt = tl.load(B_in + bi.to(tl.int64) * SBB + (ci * Q + q[:, None]) * SB + ns[None, :],
                             mask=(q < L - ci * Q)[:, None] & (ns[None, :] < N), other=0.0)  # (BK, BN)
                # xs loaded as its transpose (the product's left operand) rather than transposed after
                xsT = tl.load(xs_in + (bc * Q + q[None, :]) * (H * P) + h * P + pp[:, None],
                              mask=pp[:, None] < P, other=0.0)                            # (BP, BK)
            if k0 == 0:  # the state entering chunk ci, then its decay over the chunk
                tl.store(S_prev_ptr + bc * H * P * N + tile, acc.to(S_prev_ptr.dtype.element_ty), mask=tile_ok)
                acc = tl.exp(a_end) * acc
            acc = tl.dot(xsT, Bt.to(xsT.dtype), acc, input_precision=PREC)
        # (the tile's initial state was read above, by this program alone: final may be init itself)
        tl.store(final_ptr + state + tile, acc.to(final_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _states_bwd_kernel(dye_in, C_in, S_prev_ptr, acum_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, da_part_ptr,
                           L, NC, H, P, N, SC, SCB, NNT, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, HAS_DFINAL: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr):
        """The backward of the scan and of the state -> output product's state side in one pass, the
        gradient on chip: for one (p, BN) tile of head h, chunk after chunk from the last, with g the
        gradient of the state leaving chunk c: da_part[b, c, h, tile] = exp(acum_end) sum(g S_prev_c),
        dstates_c = g (dstates' dtype, (b, c, h*p, n)), g = exp(acum_end) g + dy_e^T C over the chunk
        (dy_e (b*c*Q, h, p) = dy exp(acum), zero past L; C (b, L, n), or (b, c*Q, n) with zeros past L:
        with TMA, descriptors with tiles (BK, 1, BP) and (1, BK, BN); else pointers, C's rows SC and
        sequences SCB apart). The initial state's gradient (b, h*p, n) fp32. Grid (n / BN, h, b). One loop
        over every (chunk, BK positions) step, as _states_fwd_kernel."""
        nt, h, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pp = tl.arange(0, BP)
        ns = nt * BN + tl.arange(0, BN)
        tile_ok = (pp[:, None] < P) & (ns[None, :] < N)
        tile = (h * P + pp[:, None]) * N + ns[None, :]
        state = bi.to(tl.int64) * H * P * N
        if HAS_DFINAL:
            g = tl.load(dfinal_ptr + state + tile, mask=tile_ok, other=0.0)
        else:
            g = tl.zeros((BP, BN), dtype=tl.float32)
        KT: tl.constexpr = Q // BK
        for i in range(0, NC * KT):
            ci, k0 = NC - 1 - i // KT, (i % KT) * BK
            bc = bi.to(tl.int64) * NC + ci
            q = k0 + tl.arange(0, BK)
            if TMA:
                Ct = C_in.load([bi, ci * Q + k0, nt * BN]).reshape(BK, BN)
                dyeT = tl.trans(dye_in.load([(bc * Q + k0).to(tl.int32), h, 0]).reshape(BK, BP))
            else:
                Ct = tl.load(C_in + bi.to(tl.int64) * SCB + (ci * Q + q[:, None]) * SC + ns[None, :],
                             mask=(q < L - ci * Q)[:, None] & (ns[None, :] < N), other=0.0)   # (BK, BN)
                dyeT = tl.load(dye_in + bc * Q * H * P + h * P + q[None, :] * (H * P) + pp[:, None],
                               mask=pp[:, None] < P, other=0.0)                         # (BP, BK)
            if k0 == 0:  # the gradient leaving chunk ci: its parts, then its decay over the chunk
                decay = tl.exp(tl.load(acum_ptr + (bc * H + h) * Q + Q - 1))
                S = tl.load(S_prev_ptr + bc * H * P * N + tile, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(da_part_ptr + (bc * H + h) * NNT + nt, decay * tl.sum(tl.sum(g * S, axis=1), axis=0))
                tl.store(dstates_ptr + bc * H * P * N + tile, g.to(dstates_ptr.dtype.element_ty), mask=tile_ok)
                g = decay * g
            g = tl.dot(dyeT, Ct.to(dyeT.dtype), g, input_precision=PREC)
        tl.store(dinit_ptr + state + tile, g, mask=tile_ok)

    @triton.jit
    def _diag_fwd_kernel(G_ptr, acum_ptr, x_ptr, dtc_ptr, yoff_ptr, D_ptr, y_ptr, L, NC, H, P, SX, SXB,
                         Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, HAS_D: tl.constexpr,
                         PREC: tl.constexpr):
        """y[q, h] = exp(acum_q) y_off[q, h] + sum_{s <= q} G[q, s] exp(acum_q - acum_s) x_s dt_s + D_h x_q
        for the rows q of one row block and one head, written in y's dtype to y (b, L, h, p); acum and dt from
        acum and dtc (b, c, h, Q); x (b, L, h, p) with rows SX and sequences SXB apart. Grid (h, Q / BM, b*c),
        a chunk's heads side by side (they share G and x's rows), the row blocks with the most work first;
        loop over the row blocks s <= q."""
        h, bc = tl.program_id(0), tl.program_id(2).to(tl.int64)
        m = tl.num_programs(1) - 1 - tl.program_id(1)
        bi, ci = bc // NC, bc % NC
        r0 = bi * L + ci * Q                                            # the chunk's first row of (b*L)
        n_ok = (L - ci * Q).to(tl.int32)                                # its positions inside the sequence
        q = m * BM + tl.arange(0, BM)                                   # positions inside the chunk
        pp = tl.arange(0, BP)
        acum_c, dt_c = acum_ptr + (bc * H + h) * Q, dtc_ptr + (bc * H + h) * Q
        x_c = x_ptr + bi * SXB + ci * Q * SX + h * P
        a_q = tl.load(acum_c + q)
        # below the diagonal block the decay splits at the block's first row r: exp(a_q - a_s) = e_q e_s
        # with e_q = exp(a_q - a_r), e_s = exp(a_r - a_s), both exponents <= 0 (acum falls): e_s scales
        # x dt's rows, e_q the sum once, at the end, and G's tiles go into the product as they are
        a_r = tl.load(acum_c + m * BM)
        # y_off's tile loaded first, to be in flight during the products (at a cap of 168 registers: _diag_fwd_launch)
        yoff = tl.load(yoff_ptr + bc * Q * H * P + h * P + q[:, None] * (H * P) + pp[None, :], mask=pp[None, :] < P)
        acc = tl.zeros((BM, BP), dtype=tl.float32)
        for s0 in range(0, m * BM, BM):
            s = s0 + tl.arange(0, BM)
            ok_s = s < n_ok
            G = tl.load(G_ptr + bc * Q * Q + q[:, None] * Q + s[None, :])          # (BM, BM) x's dtype
            x = _rows(x_c, s, SX, ok_s, pp, P)
            dt_e = tl.load(dt_c + s) * tl.exp(a_r - tl.load(acum_c + s))
            xdt = (x.to(tl.float32) * dt_e[:, None]).to(x.dtype)
            acc = tl.dot(G.to(x.dtype), xdt, acc, input_precision=PREC)
        acc = tl.exp(a_q - a_r)[:, None] * acc
        # the diagonal block: the decay per (q, s), zero above the diagonal
        s = m * BM + tl.arange(0, BM)
        ok_s = s < n_ok
        a_s = tl.load(acum_c + s)
        G = tl.load(G_ptr + bc * Q * Q + q[:, None] * Q + s[None, :])
        E = tl.exp(tl.where(q[:, None] >= s[None, :], a_q[:, None] - a_s[None, :], float("-inf")))
        x = _rows(x_c, s, SX, ok_s, pp, P)
        dt = tl.load(dt_c + s)
        xdt = (x.to(tl.float32) * dt[:, None]).to(x.dtype)
        acc = tl.dot((G * E).to(x.dtype), xdt, acc, input_precision=PREC)
        acc += tl.exp(a_q)[:, None] * yoff
        ok_q = q < n_ok
        if HAS_D:  # the diagonal block's positions s are the rows q: x as loaded for its product
            acc += tl.load(D_ptr + h) * x.to(tl.float32)
        tl.store(y_ptr + r0 * H * P + h * P + q[:, None] * (H * P) + pp[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok_q[:, None] & (pp[None, :] < P))

    @triton.jit
    def _dy_kernel(dy_ptr, acum_ptr, yoff_ptr, dt_ptr, dye_ptr, dacum_ptr, dtc_ptr, L, NC, H, P,
                   Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr):
        """dy_e = dy exp(acum) in dy_e's dtype, (b, c, Q, h, p) zero past L, the d acum of the state -> output
        part, sum_p y_off dy_e, and dt (b, L, h) in the backward's layout, dtc (b, c, h, Q) zero past L (as
        _prep_kernel's); acum and dacum (b, c, h, Q). Grid (h, Q / BM, b*c); BH a power of two >= h."""
        h, m, bc = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        q = m * BM + tl.arange(0, BM)
        ok = q < (L - ci * Q).to(tl.int32)
        pp = tl.arange(0, BP)
        dy = _rows(dy_ptr + (bi * L + ci * Q) * H * P + h * P, q, H * P, ok, pp, P).to(tl.float32)
        row = (bc * H + h) * Q + q                                      # (b, c, h, Q): the head's row
        dye = dy * tl.exp(tl.load(acum_ptr + row))[:, None]
        at = (bc * Q * H + h) * P + q[:, None] * (H * P) + pp[None, :]  # (b, c, Q, h, p)
        tl.store(dye_ptr + at, dye.to(dye_ptr.dtype.element_ty), mask=pp[None, :] < P)
        yoff = tl.load(yoff_ptr + at, mask=pp[None, :] < P, other=0.0)
        tl.store(dacum_ptr + row, tl.sum(yoff * dye, axis=1))
        if h == 0:  # dt of every head for these rows: read in rows of heads, written in rows of positions (one
            # head's values 4 * h bytes apart cost a sector each when each head's program read its own)
            hh = tl.arange(0, BH)
            dt = tl.load(dt_ptr + (bi * L + ci * Q + q[:, None]) * H + hh[None, :],
                         mask=ok[:, None] & (hh < H)[None, :], other=0.0)                 # (BM, BH)
            tl.store(dtc_ptr + (bc * H + hh[None, :]) * Q + q[:, None], dt, mask=(hh < H)[None, :])

    @triton.jit
    def _diag_bwd_x_kernel(G_ptr, acum_ptr, x_in, dtc_ptr, dy_in, dxs_ptr, D_ptr,
                           dx_ptr, ddt_ptr, t_ptr, dD_ptr, L, NC, H, P, SX, SXB, SDX,
                           Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, HAS_D: tl.constexpr,
                           TMA: tl.constexpr, PREC: tl.constexpr):
        """For the positions s of one row block and one head: the (Q, Q) part's gradient of x dt,
        dxdt_s = sum_{q >= s} W[q, s] dy_q with W = G * decay, then the rest of the chain for these
        positions: with dxs (b, c, Q, h, p) in x's dtype from the chunk states, t = sum_p dxs xs,
        dxdt += dxs exp(acum_end - acum), dx = dxdt dt + D dy (x's dtype, (b, L, h, p) with rows SDX
        apart), ddt's part sum_p dxdt x, t, and dD's part sum_p dy x (all (b, c, h, Q), as acum and dtc, dt
        in that layout, are). d acum's (Q, Q) part, M's row and column sums, is _diag_bwd_G_kernel's. x (b, L,
        h, p) with rows SX and sequences SXB apart and dy (b, L, h, p): TMA descriptors with tiles (1, BM, 1,
        BP) if TMA, else pointers (_head_rows).
        Grid (h, Q / BM, b*c), as _diag_fwd_kernel's (block 0, the most work, first)."""
        h, blk, bc = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        r0 = bi * L + ci * Q                                            # the chunk's first row of (b*L)
        n_ok = (L - ci * Q).to(tl.int32)                                # its positions inside the sequence
        s = blk * BM + tl.arange(0, BM)                                 # positions inside the chunk
        ok_s = s < n_ok
        pp = tl.arange(0, BP)
        row = (bc * H + h) * Q                                          # the head's row of a (b, c, h, Q) tensor
        G_c = G_ptr + bc * Q * Q
        a_s = tl.load(acum_ptr + row + s)
        # the diagonal block, q in s's own block: the decay per (q, s), zero above the diagonal
        G = tl.load(G_c + s[:, None] * Q + s[None, :])
        W = G * tl.exp(tl.where(s[:, None] >= s[None, :], a_s[:, None] - a_s[None, :], float("-inf")))
        dy_s = _head_rows(dy_in, bi, ci * Q + blk * BM, L, h, P, H * P, L * H * P, BM, BP, TMA)  # (BM q, BP)
        dxd = tl.dot(tl.trans(W.to(dy_s.dtype)), dy_s, input_precision=PREC)
        # below it the decay splits at the block's last position r: exp(a_q - a_s) = e_q e_s with
        # e_q = exp(a_q - a_r), e_s = exp(a_r - a_s), both exponents <= 0 (acum falls): e_q scales G's
        # rows, e_s the sum once, at the end
        a_r = tl.load(acum_ptr + row + blk * BM + BM - 1)
        e_s = tl.exp(a_r - a_s)
        dxd_off = tl.zeros((BM, BP), dtype=tl.float32)
        for q0 in range((blk + 1) * BM, Q, BM):
            q = q0 + tl.arange(0, BM)
            e_q = tl.exp(tl.load(acum_ptr + row + q) - a_r)
            G = tl.load(G_c + q[:, None] * Q + s[None, :])
            dy = _head_rows(dy_in, bi, ci * Q + q0, L, h, P, H * P, L * H * P, BM, BP, TMA)
            dxd_off = tl.dot(tl.trans((G * e_q[:, None]).to(dy.dtype)), dy, dxd_off, input_precision=PREC)
        dxd += e_s[:, None] * dxd_off
        a_end = tl.load(acum_ptr + row + Q - 1)
        to_end = tl.exp(a_end - a_s)
        dxs = tl.load(dxs_ptr + (bc * Q * H + h) * P + s[:, None] * (H * P) + pp[None, :], mask=pp[None, :] < P,
                      other=0.0).to(tl.float32)
        dt_s = tl.load(dtc_ptr + row + s)
        xf = _head_rows(x_in, bi, ci * Q + blk * BM, L, h, P, SX, SXB, BM, BP, TMA).to(tl.float32)  # (BM, BP)
        t = tl.sum(dxs * xf, axis=1) * dt_s * to_end
        dxdt = dxd + dxs * to_end[:, None]
        dx = dxdt * dt_s[:, None]
        if HAS_D:
            dyf = dy_s.to(tl.float32)
            dx += tl.load(D_ptr + h) * dyf
            tl.store(dD_ptr + row + s, tl.sum(dyf * xf, axis=1))
        tl.store(dx_ptr + r0 * SDX + h * P + s[:, None] * SDX + pp[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=ok_s[:, None] & (pp[None, :] < P))
        tl.store(ddt_ptr + row + s, tl.sum(dxdt * xf, axis=1))
        tl.store(t_ptr + row + s, t)

    @triton.jit
    def _diag_bwd_G_kernel(G_ptr, acum_ptr, x_in, dtc_ptr, dy_in, dG_ptr, dacum_m_ptr, L, NC, H, P, SX, SXB,
                           Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, TMA: tl.constexpr,
                           PREC: tl.constexpr):
        """For one (BM, BM) tile (q, s) of a chunk, with D_h = (dy_q . x_s) dt_s exp(acum_q - acum_s) on
        s <= q per head: dG = sum_h D_h (b, c, Q, Q) in dG's dtype (x's: dG is only a GEMM operand),
        summed in fp32, and d acum's (Q, Q) part, M_h = G * D_h's row sums (+, at the positions q) and
        column sums (-, at the positions s), into dacum_m (b, c, h, Q / BM, Q): the row sums in the
        slot of the tile's column block, the column sums in the slot of its row block. Each (slot,
        position) belongs to one tile, the diagonal ones' to both sums of one tile; tiles above the
        diagonal are zero and write nothing to dacum_m. Grid (Q / BM rows, Q / BM columns, b*c): the
        tiles of one chunk side by side, so that the x and dy rows they share come from L2. G (b, c,
        Q, Q) fp32; x (b, L, h, p) with rows SX and sequences SXB apart and dy (b, L, h, p): TMA descriptors
        with tiles (1, BM, 1, BP) if TMA, else pointers (_head_rows); acum and dt from acum and dtc (b, c, h, Q)."""
        mq, ms, bc = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        q = mq * BM + tl.arange(0, BM)                                  # positions inside the chunk
        s = ms * BM + tl.arange(0, BM)
        acum_c, dt_c = acum_ptr + bc * H * Q, dtc_ptr + bc * H * Q       # (b, c, h, Q): head h at + h Q
        slots = dacum_m_ptr + bc * H * (Q // BM) * Q                     # head h, slot j: + (h * Q / BM + j) * Q
        causal = q[:, None] >= s[None, :]
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        # Each head's acum and dt are loaded one head ahead, so that the next head's loads are in flight while
        # this head's product runs: Triton pipelines the tiles that feed the product (num_stages), not these
        # (BENCHMARKS.md §0c). The last head loads its own again (nh).
        a_r_n, a_q_n, a_s_n, dt_n = _head_vectors(acum_c, dt_c, mq * BM, q, s, 0, Q)
        if ms < mq:  # below the diagonal the decay splits at the q block's first row, as in _diag_bwd_x_kernel
            G = tl.load(G_ptr + bc * Q * Q + q[:, None] * Q + s[None, :])
            for h in range(0, H):
                a_r, a_q, a_s, dt = a_r_n, a_q_n, a_s_n, dt_n
                nh = tl.minimum(h + 1, H - 1)
                a_r_n, a_q_n, a_s_n, dt_n = _head_vectors(acum_c, dt_c, mq * BM, q, s, nh, Q)
                e_q = tl.exp(a_q - a_r)
                e_s = tl.exp(a_r - a_s)
                x = _head_rows(x_in, bi, ci * Q + ms * BM, L, h, P, SX, SXB, BM, BP, TMA)
                dy = _head_rows(dy_in, bi, ci * Q + mq * BM, L, h, P, H * P, L * H * P, BM, BP, TMA).to(x.dtype)
                Dh = tl.dot(dy, tl.trans(x), input_precision=PREC) * e_q[:, None] * (dt * e_s)[None, :]
                acc += Dh
                M = G * Dh
                tl.store(slots + (h * (Q // BM) + ms) * Q + q, tl.sum(M, axis=1))
                tl.store(slots + (h * (Q // BM) + mq) * Q + s, -tl.sum(M, axis=0))
        elif ms == mq:
            G = tl.load(G_ptr + bc * Q * Q + q[:, None] * Q + s[None, :])
            for h in range(0, H):
                a_q, a_s, dt = a_q_n, a_s_n, dt_n
                nh = tl.minimum(h + 1, H - 1)
                a_r_n, a_q_n, a_s_n, dt_n = _head_vectors(acum_c, dt_c, mq * BM, q, s, nh, Q)
                x = _head_rows(x_in, bi, ci * Q + ms * BM, L, h, P, SX, SXB, BM, BP, TMA)
                dy = _head_rows(dy_in, bi, ci * Q + mq * BM, L, h, P, H * P, L * H * P, BM, BP, TMA).to(x.dtype)
                # x's exact values in the product and dt in fp32 after it: x dt rounded to x's dtype was
                # most of dA's error (d acum sums M's rows and columns, which cancel)
                Dh = tl.dot(dy, tl.trans(x), input_precision=PREC) * dt[None, :]
                Dh = Dh * tl.exp(tl.where(causal, a_q[:, None] - a_s[None, :], float("-inf")))
                acc += Dh
                M = G * Dh
                tl.store(slots + (h * (Q // BM) + mq) * Q + q, tl.sum(M, axis=1) - tl.sum(M, axis=0))
        tl.store(dG_ptr + bc * Q * Q + q[:, None] * Q + s[None, :], acc.to(dG_ptr.dtype.element_ty))


    @triton.jit
    def _dG_product_kernel(dG_ptr, M_ptr, add_ptr, out_ptr, L, NC, N, SM, SMB, SO,
                           TRANS: tl.constexpr, Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, PREC: tl.constexpr):
        """The (Q, Q) part's share of dC or dB, added to the state products' share and written out:
        out[r] = add[r] + sum_s A[q, s] M[s] for the rows r = q of one chunk, A = dG (b, c, Q, Q) (dC:
        M = B) or, with TRANS, dG^T (dB: M = C). dG is zero above the diagonal, so s runs over s <= q
        (over s >= q with TRANS). M (b, L, N) with rows SM and sequences SMB apart, read where it lies (zero
        past L);
        add (b, c*Q, N) fp32; out (b, L, N) with rows SO apart, in its dtype, rows past L not written.
        Grid (cdiv(N, BN), Q / BM, b*c)."""
        bc = tl.program_id(2).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        m = tl.program_id(1)
        q = m * BM + tl.arange(0, BM)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = (L - ci * Q).to(tl.int32)                                # the chunk's positions inside the sequence
        acc = tl.load(add_ptr + (bc * Q + q[:, None]) * N + n[None, :], mask=n[None, :] < N, other=0.0)
        M_c = M_ptr + bi * SMB + ci * Q * SM
        dG_c = dG_ptr + bc * Q * Q
        k_lo, k_hi = (m * BM, Q) if TRANS else (0, (m + 1) * BM)
        for k0 in range(k_lo, k_hi, BK):
            k = k0 + tl.arange(0, BK)
            if TRANS:
                a = tl.load(dG_c + k[None, :] * Q + q[:, None])            # dG[k, q]
            else:
                a = tl.load(dG_c + q[:, None] * Q + k[None, :])
            Mk = tl.load(M_c + k[:, None] * SM + n[None, :], mask=(k < n_ok)[:, None] & (n[None, :] < N), other=0.0)
            acc = tl.dot(a, Mk.to(a.dtype), acc, input_precision=PREC)
        tl.store(out_ptr + (bi * L + ci * Q + q[:, None]) * SO + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(q < n_ok)[:, None] & (n[None, :] < N))

    @triton.jit
    def _dacum_kernel(dacum_ptr, t_ptr, m_ptr, da_part_ptr, ddt_part_ptr, dD_part_ptr, A_ptr, dt_ptr, ddt_ptr,
                      sums_ptr, L, NC, H, NNT, Q: tl.constexpr, NB: tl.constexpr, BH: tl.constexpr,
                      BNT: tl.constexpr, HAS_D: tl.constexpr):
        """d acum in total for one chunk of BH heads: the state -> output part (dacum), -t, M's row sums
        less its column sums in NB slots (m, (b, c, h, NB, Q)), and at the chunk's last position the
        scan's part (da_part (b, c, h, NNT), summed) and sum_q t. Then through acum = cumsum(dt A):
        da_t = sum_{q >= t} dacum_q, ddt = ddt_part + da A written to ddt (b, L, h) in its dtype, and
        this chunk's parts of dA, sum_t da_t dt_t, and of dD, sum_q dD_part (with HAS_D), to sums
        (b*c, 2, h). dacum, t, ddt_part and dD_part (b, c, h, Q), dt (b, L, h), all fp32 but ddt. Grid
        (cdiv(h, BH), b*c): a chunk's heads in one program, so that every load and store reads whole rows: a
        head's Q positions of the (b, c, h, Q) tensors, a position's heads of dt and ddt."""
        hb, bc = tl.program_id(0), tl.program_id(1).to(tl.int64)
        bi, ci = bc // NC, bc % NC
        q = tl.arange(0, Q)
        hh = hb * BH + tl.arange(0, BH)
        ok_h = (hh < H)[None, :]
        at = (bc * H + hh[None, :]) * Q + q[:, None]                    # (Q, BH) of a (b, c, h, Q) tensor
        t = tl.load(t_ptr + at, mask=ok_h, other=0.0)
        d = tl.load(dacum_ptr + at, mask=ok_h, other=0.0) - t
        for j in tl.static_range(NB):
            d += tl.load(m_ptr + ((bc * H + hh[None, :]) * NB + j) * Q + q[:, None], mask=ok_h, other=0.0)
        k = tl.arange(0, BNT)
        da_part = tl.load(da_part_ptr + (bc * H + hh[:, None]) * NNT + k[None, :],
                          mask=(hh < H)[:, None] & (k[None, :] < NNT), other=0.0)        # (BH, BNT)
        tail = tl.sum(t, axis=0) + tl.sum(da_part, axis=1)
        d += tl.where(q[:, None] == Q - 1, tail[None, :], 0.0)
        da = tl.cumsum(d, axis=0, reverse=True)
        ok = (q < (L - ci * Q).to(tl.int32))[:, None] & ok_h
        rows = (bi * L + ci * Q) * H + q[:, None] * H + hh[None, :]    # (Q, BH) of a (b, L, h) tensor
        dt = tl.load(dt_ptr + rows, mask=ok, other=0.0)
        ddt = tl.load(ddt_part_ptr + at, mask=ok_h, other=0.0) + da * tl.load(A_ptr + hh, mask=hh < H)[None, :]
        tl.store(ddt_ptr + rows, ddt.to(ddt_ptr.dtype.element_ty), mask=ok)
        tl.store(sums_ptr + bc * 2 * H + hh, tl.sum(da * dt, axis=0), mask=hh < H)
        if HAS_D:
            dD = tl.sum(tl.load(dD_part_ptr + at, mask=ok_h, other=0.0), axis=0)
            tl.store(sums_ptr + bc * 2 * H + H + hh, dD, mask=hh < H)

    @triton.jit
    def _chunk_sums_kernel(sums_ptr, dA_ptr, dD_ptr, R, H, BR: tl.constexpr, BH: tl.constexpr, HAS_D: tl.constexpr):
        """dA = sum_r sums[r, 0] and, with HAS_D, dD = sum_r sums[r, 1], summed in fp32 over the R = b*c chunks'
        parts (sums (R, 2, h), _dacum_kernel's) and written in dA's and dD's dtypes. Grid (cdiv(h, BH),)."""
        hh = tl.program_id(0) * BH + tl.arange(0, BH)
        acc_a = tl.zeros((BH,), dtype=tl.float32)
        acc_d = tl.zeros((BH,), dtype=tl.float32)
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            at = sums_ptr + r[:, None] * 2 * H + hh[None, :]
            ok = (r < R)[:, None] & (hh < H)[None, :]
            acc_a += tl.sum(tl.load(at, mask=ok, other=0.0), axis=0)
            if HAS_D:
                acc_d += tl.sum(tl.load(at + H, mask=ok, other=0.0), axis=0)
        tl.store(dA_ptr + hh, acc_a.to(dA_ptr.dtype.element_ty), mask=hh < H)
        if HAS_D:
            tl.store(dD_ptr + hh, acc_d.to(dD_ptr.dtype.element_ty), mask=hh < H)


def _rows_of(t):
    """t (b, l, ...) as the kernels read it: rows of the trailing dims' values, dense, each row_stride
    apart, and each sequence's rows seq_stride from the last's (as x, B and C viewed in the conv's
    output, whose sequences may have rows past l: padded_rows), else a contiguous copy. Returns (t,
    row_stride, seq_stride)."""
    inner, stride = t.shape[2:], 1
    dense = True
    for size, st in zip(reversed(inner), reversed(t.stride()[2:])):
        dense = dense and (size == 1 or st == stride)
        stride *= size
    apart = (t.shape[1] == 1 or t.stride(1) >= stride) and (t.shape[0] == 1 or t.stride(0) >= t.shape[1] * t.stride(1))
    if not (dense and apart):
        t = t.contiguous()
    return t, t.stride(1), t.stride(0)


def _dense_rows(t):
    """Whether t (b, l, ...) is as the kernels write an output: rows of dense values (any row stride), each
    sequence's rows right after the last's."""
    return _rows_of(t)[0] is t and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))


def _descriptor(t, block):
    """A TMA tensor descriptor (Triton's TensorDescriptor) over t with its shape and strides, loading
    tiles of shape `block`, zeros past t's edges. TMA wants the base and every stride but the last
    (which must be 1) on 16 bytes; where t's are not, t is first copied into a buffer whose last
    dimension is padded to 16 bytes. For GPUs with TMA (_has_tma): before Hopper, Triton turns
    descriptor loads into plain ones that spill registers (bench_ssd_grouped.py --registers), and the
    kernels take pointers instead."""
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
        padded = t.new_empty(*t.shape[:-1], -(-t.shape[-1] * size // 16) * 16 // size)
        t = padded[..., :t.shape[-1]].copy_(t)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


def _tiles(tma, t, block):
    """t as a kernel with TMA takes it, a descriptor with tiles `block` (_descriptor), else t itself."""
    return _descriptor(t, block) if tma else t


def _copy_rows(src, dst, rows, launch):
    """The first `rows` rows of src (b, l, n) into dst (b, l', n), zeros past them, cast to dst's dtype: one
    Triton pass; src with rows of n dense values, any row and sequence strides (_rows_of), dst with its
    sequences' rows one after another (_dense_rows)."""
    (src, s_src, sb_src), s_dst = _rows_of(src), dst.stride(1)
    if not _dense_rows(dst):
        raise ValueError(f"_copy_rows: dst {tuple(dst.shape)} with strides {dst.stride()} does not have dense rows")
    b, l_dst, n = dst.shape
    bn = next_power_of_2(n)
    bl = max(1, 4096 // bn)
    launch(_copy_rows_kernel)[(cdiv(l_dst, bl), b)](src, dst, sb_src, l_dst, rows, n, s_src, s_dst,
                                                    BL=bl, BN=bn, num_warps=4)
    return dst


def _chunked_rows(t, l, Q, launch):
    """_chunked for B or C (b, l, n), whose rows may lie apart (the conv's output), or (b, c*Q, n) with
    zeros past l (padded_rows): a view when t's rows are a whole number of chunks, else one Triton pass
    into (b, c, Q, n) with zeros past l (a strided torch.cat ran at a tenth of the memory's speed)."""
    b, rows, n = t.shape
    c = -(-l // Q)
    if c * Q == rows:
        return _chunked(t, Q)
    return _copy_rows(t, t.new_empty(b, c * Q, n), l, launch).view(b, c, Q, n)


def padded_rows(l, chunk_size):
    """The rows B and C (b, rows, n) may have for the Triton forms: l rounded up to whole chunks. B and
    C given so, zero past l (views of a conv output written with those rows: gpu_kernels.causal_conv_silu's
    rows), are split into chunks as views; with l rows, the chunks are a copy when l is not a whole
    number of chunks."""
    return -(-l // chunk_size) * chunk_size


def _check_BC(B, C, b, l, Q, name):
    """Raises ValueError unless B and C are both (b, l, n) or both (b, padded_rows(l, Q), n)."""
    if B.shape != C.shape or B.dim() != 3 or B.shape[:2] not in ((b, l), (b, padded_rows(l, Q))):
        raise ValueError(f"{name}: B {tuple(B.shape)} and C {tuple(C.shape)} must both be ({b}, {l}, n) or "
                         f"({b}, {padded_rows(l, Q)}, n), zero past row {l}")


def _check_inputs(name, x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """TypeError for a chunk_size that is not an integer, ValueError for one below 1, and ValueError naming the
    first tensor whose shape does not fit x's (b, l, h, p): dt (b, l, h), A and D (h,), B and C (_check_BC),
    initial_state (b, h, p, n). A shape that would broadcast is refused too: the torch form would broadcast it
    silently, the kernels would read past it."""
    check_chunk_size(chunk_size, name)
    if x.dim() != 4:
        raise ValueError(f"{name}: x {tuple(x.shape)}: want (b, l, h, p)")
    b, l, h, p = x.shape
    _check_BC(B, C, b, l, chunk_size, name)
    n = B.shape[-1]
    for arg, t, shape in (("dt", dt, (b, l, h)), ("A", A, (h,)), ("D", D, (h,)),
                          ("initial_state", initial_state, (b, h, p, n))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} {tuple(t.shape)}: want {shape} for x {tuple(x.shape)} (b, l, h, p)")


def _check_grads(name, dy, dfinal, x, n):
    """ValueError unless dy has x's shape (b, l, h, p) and dfinal (None or) the final state's (b, h, p, n): a dy
    of batch 1 would broadcast against every row's (the torch form would return every row's gradient from row
    0's dy), the kernels would read past it."""
    b, l, h, p = x.shape
    for arg, t, shape in (("dy", dy, (b, l, h, p)), ("dfinal", dfinal, (b, h, p, n))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} {tuple(t.shape)}: want {shape} for x {tuple(x.shape)} (b, l, h, p)")


def _launch(x, chunk_size):
    """The shapes the kernels share: (b, l, h, p, c, Q, BM, BP, PREC). Block rows BM 64 and each
    kernel's warps and stages: the fastest of `bench_ssd_grouped.py --sweep` on an H200 (the (Q, Q)
    kernels but _diag_bwd_x: _diag_fwd_launch, _diag_bwd_G_launch)."""
    b, l, h, p = x.shape
    Q = chunk_size
    check_chunk_size(Q, "ssd_grouped with use_triton")
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"ssd_grouped with use_triton: chunk_size {Q} is not a power of two >= 16")
    prec = "ieee" if x.dtype == torch.float32 else "tf32"   # fp32 tests exact; bf16/fp16 ignore it
    return b, l, h, p, -(-l // Q), Q, min(64, Q), max(16, next_power_of_2(p)), prec


def _states_launch(n, Q, backward, tma):
    """_states_fwd_kernel's (backward False) or _states_bwd_kernel's launch: dict(BN state columns, BK
    positions per product, TMA, num_warps, num_stages, and maxnreg where capped), the fastest of
    `bench_ssd_grouped.py --sweep states` on an H200 for each way of loading the tiles; the forward's with
    TMA capped at 128 registers per thread, so that four programs fit on an SM instead of three, which
    also measured faster (BENCHMARKS.md §0c)."""
    cap = {}
    if tma and not backward:
        bn, bk, warps, stages, cap = 128, 32, 4, 4, dict(maxnreg=128)
    elif tma:
        bn, bk, warps, stages = 128, 64, 4, 3
    else:
        bn, bk, warps, stages = (128, 64, 4, 3) if backward else (128, 128, 4, 1)
    return dict(BN=min(bn, max(16, next_power_of_2(n))), BK=min(bk, Q), TMA=tma, num_warps=warps,
                num_stages=stages, **cap)


def _diag_fwd_launch(Q):
    """_diag_fwd_kernel's launch: dict(BM block rows, num_warps, num_stages, maxnreg), the fastest of
    `bench_ssd_grouped.py --sweep diag` on an H200 (x through pointers: BENCHMARKS.md §0c). Registers capped
    at 168 per thread, so that three programs fit on an SM with y_off's tile held from the start (175
    uncapped: two)."""
    return dict(BM=min(64, Q), num_warps=4, num_stages=1, maxnreg=168)


def _diag_bwd_G_launch(Q):
    """_diag_bwd_G_kernel's launch: dict(BM, num_warps, num_stages), the fastest of `bench_ssd_grouped.py
    --sweep diag` on an H200: (32, 32) tiles, each one warp's, so that M's column sums are summed inside
    a warp rather than exchanged across the warps of a tile once per head (BENCHMARKS.md §0c). Its BM
    also sets the slots of d acum's (Q, Q) part: Q / BM."""
    return dict(BM=min(32, Q), num_warps=1, num_stages=3)


def _tma(tma, device, launch):
    """Whether the kernels that can load through TMA descriptors do: tma, or by default where the GPU has it
    (_has_tma), except when launched through wrap_triton (launch): torch's tracing of such a launch records
    no descriptor, and without it cannot tell which arguments a kernel writes."""
    return (_has_tma(device) and launch is as_is) if tma is None else tma


def _has_tma(device):
    """Whether the chunk-state kernels, dx's and dG's load their tiles through TMA descriptors: on CUDA GPUs
    from Hopper (sm_90) on, with Triton 3.4 or later (its TensorDescriptor)."""
    return TensorDescriptor is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def forward_triton(x, dt, A, B, C, chunk_size, D=None, initial_state=None, tma=None, launch=as_is, final_out=None):
    """forward with the elementwise work in Triton (CUDA, or TRITON_INTERPRET=1): same arguments and
    results, but acum (b, c, h, Q): a head's cumulative decays of a chunk in one row, as the kernels load
    them (for backward_triton); chunk_size a power of two >= 16. B and C (b, l, n), or (b, padded_rows(l,
    chunk_size), n) with zeros past l, so that their chunks are views (x, B and C may be views of one
    buffer, each with its own row and sequence strides). tma: the chunk-state kernel loads its tiles
    through TMA descriptors, else through pointers (default: _tma; the interpreter runs either). launch:
    how each kernel is launched (as_is). initial_state is read in its own dtype (fp32 or bf16: a decoding
    state as it is stored). final_out: a contiguous (b, h, p, n) tensor of any float dtype that the
    final state is written into, rounded once, and returned as the final state; it may be
    initial_state itself (each tile of the state is read before it is written, by one program), so
    that a prefill continues a state in place without fp32 copies of it. Raises ValueError for a
    final_out of another shape or not contiguous, B and C of other shapes, or another input whose shape
    does not fit x's, TypeError for a chunk_size that is not an integer (_check_inputs)."""
    _check_inputs("forward_triton", x, dt, A, B, C, chunk_size, D, initial_state)  # before _launch unpacks x's shape
    b, l, h, p, c, Q, BM, BP, prec = _launch(x, chunk_size)
    n = B.shape[-1]
    hp, dev = h * p, x.device
    if final_out is not None and (final_out.shape != (b, h, p, n) or not final_out.is_contiguous()):
        raise ValueError(f"forward_triton: final_out {tuple(final_out.shape)} must be a contiguous {(b, h, p, n)}")
    (x, sx, sxb), (B, sb, sbb), dt, A = _rows_of(x), _rows_of(B), dt.float().contiguous(), A.float().contiguous()
    # acum and dt as (b, c, h, Q), a head's chunk in one row: the (Q, Q) kernels load a head's values as vectors,
    # which from (b, c, Q, h) took a 32-byte sector per value (BENCHMARKS.md §0c, sixty-second session)
    acum, dtc = (torch.empty(b, c, h, Q, device=dev, dtype=torch.float32) for _ in range(2))
    xs = torch.empty(b, c * Q, h, p, device=dev, dtype=x.dtype)
    launch(_prep_kernel)[(h, b * c)](x, dt, A, acum, dtc, xs, l, c, h, p, sx, sxb, Q=Q, BP=BP, num_warps=8)
    # the chunk states and the scan between chunks, the state on chip
    S_prev = torch.empty(b, c, hp, n, device=dev, dtype=x.dtype)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32) if final_out is None else final_out
    init = None if initial_state is None else initial_state.contiguous()
    tma = _tma(tma, dev, launch)
    st = _states_launch(n, Q, backward=False, tma=tma)
    launch(_states_fwd_kernel)[(cdiv(n, st["BN"]), h, b)](
        _tiles(tma, xs, (1, st["BK"], 1, BP)), acum, _tiles(tma, B, (1, st["BK"], st["BN"])),
        final if init is None else init, S_prev, final, l, c, h, p, n, sb, sbb, Q=Q, BP=BP, HAS_INIT=init is not None,
        PREC=prec, **st)
    Bc, Cc = _chunked_rows(B, l, Q, launch), _chunked_rows(C, l, Q, launch)  # (b, c, Q, n)
    y_off = _matmul_f32(Cc, S_prev.transpose(-1, -2))                 # (b, c, Q, h*p) fp32
    G = _matmul_f32(Cc, Bc.transpose(-1, -2))                         # (b, c, Q, Q) fp32, for the backward
    y = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    fl = _diag_fwd_launch(Q)
    # the (Q, Q) kernel reads G in x's dtype, half the bytes of the tiles that every head's program loads again:
    # its products below the diagonal block round G to that anyway, and on the diagonal block G * decay is
    # rounded once more (y's error unchanged: BENCHMARKS.md). The backward's d acum needs G in fp32.
    launch(_diag_fwd_kernel)[(h, Q // fl["BM"], b * c)](
        G.to(x.dtype), acum, x, dtc, y_off, acum if D is None else D.float().contiguous(), y, l, c, h, p, sx, sxb, Q=Q,
        BP=BP, HAS_D=D is not None, PREC=prec, **fl)
    return y, final, acum, S_prev, G, y_off, xs.view(b, c, Q, hp)


def backward_triton(dy, dfinal, x, dt, A, B, C, D, initial_state, acum, S_prev, G, y_off, xs, chunk_size, dx_out=None,
                    dB_out=None, dC_out=None, tma=None, launch=as_is):
    """backward with the elementwise work in Triton: same arguments (acum forward_triton's, (b, c, h, Q)) and
    results (B and C as forward_triton takes them). dx_out: where to
    write dx instead of a new tensor, (b, l, h, p) in x's dtype with rows of h*p values (as x may be:
    the x columns of the conv's gradient, so that dx is not copied there); it is the dx returned.
    dB_out, dC_out: the same for dB and dC, (b, l, n) with rows of n values, in any dtype (the result
    is cast as it is written). tma: as forward_triton's, for the chunk states' backward, dx's kernel
    and dG's. launch: as forward_triton's."""
    b, l, h, p, c, Q, BM, BP, prec = _launch(x, chunk_size)
    _check_BC(B, C, b, l, Q, "backward_triton")
    n = B.shape[-1]
    _check_grads("backward_triton", dy, dfinal, x, n)
    for name, out, shape, dtype in (("dx_out", dx_out, (b, l, h, p), x.dtype), ("dB_out", dB_out, (b, l, n), None),
                                    ("dC_out", dC_out, (b, l, n), None)):
        if out is not None and (out.shape != shape or not _dense_rows(out) or dtype not in (None, out.dtype)):
            want = f"{shape}" if dtype is None else f"{shape} {dtype}"
            raise ValueError(f"backward_triton: {name} must be {want} with rows of {math.prod(shape[2:])} values; "
                             f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")
    hp, dev, f32 = h * p, x.device, torch.float32
    (x, sx, sxb), (B, sb, sbb), (C, sc, scb) = _rows_of(x), _rows_of(B), _rows_of(C)
    dt32, A32 = dt.float().contiguous(), A.float().contiguous()
    dy = dy.to(x.dtype).contiguous()
    Bc = _chunked_rows(B, l, Q, launch)                               # (b, c, Q, n), dxs's operand
    small = lambda: torch.empty(b, c, h, Q, device=dev, dtype=f32)  # noqa: E731  (forward_triton's acum's layout)
    # state -> output: y_off = C S_prev^T (fp32, kept by the forward); y's part is exp(acum) y_off. dt in acum's
    # layout too (dtc), for the (Q, Q) kernels
    dy_e, dacum, dtc = torch.empty(b, c, Q, hp, device=dev, dtype=x.dtype), small(), small()
    launch(_dy_kernel)[(h, Q // BM, b * c)](dy, acum, y_off, dt32, dy_e, dacum, dtc, l, c, h, p, Q=Q, BM=BM, BP=BP,
                                            BH=next_power_of_2(h))
    dC = _matmul_f32(dy_e, S_prev)                                    # (b, c, Q, n): K = h*p
    # the scan between chunks backwards, with the state side of the state -> output product
    tma = _tma(tma, dev, launch)
    st = _states_launch(n, Q, backward=True, tma=tma)
    nnt = cdiv(n, st["BN"])
    dstates = torch.empty(b, c, hp, n, device=dev, dtype=x.dtype)
    d_init = torch.empty(b, hp, n, device=dev, dtype=f32)
    da_part = torch.empty(b, c, h, nnt, device=dev, dtype=f32)
    dfin = None if dfinal is None else dfinal.float().contiguous()
    launch(_states_bwd_kernel)[(nnt, h, b)](
        _tiles(tma, dy_e.view(b * c * Q, h, p), (st["BK"], 1, BP)), _tiles(tma, C, (1, st["BK"], st["BN"])), S_prev,
        acum, d_init if dfin is None else dfin, dstates, d_init, da_part, l, c, h, p, n, sc, scb, nnt, Q=Q, BP=BP,
        HAS_DFINAL=dfin is not None, PREC=prec, **st)
    del dy_e
    # chunk states: S = xs^T B (xs kept by the forward: a pass over x and xs less, for xs's memory)
    dxs = torch.matmul(Bc, dstates.transpose(-1, -2))                # (b, c, Q, h*p) in x's dtype: K = n
    dB = _matmul_f32(xs, dstates)                                     # (b, c, Q, n): K = h*p
    del dstates
    # inside the chunks, and the rest of the chain per position
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype) if dx_out is None else dx_out
    ddt, t, dD_part = small(), small(), small()
    D32 = acum if D is None else D.float().contiguous()
    # x and dy through TMA where the GPU has it (_diag_fwd reads x through pointers: BENCHMARKS.md §0c)
    rows = (1, BM, 1, BP)
    x_t, dy_t = _tiles(tma, x, rows), _tiles(tma, dy, rows)
    launch(_diag_bwd_x_kernel)[(h, Q // BM, b * c)](
        G, acum, x_t, dtc, dy_t, dxs, D32, dx, ddt, t, dD_part, l, c, h, p, sx, sxb, dx.stride(1), Q=Q, BM=BM, BP=BP,
        HAS_D=D is not None, TMA=tma, PREC=prec, num_stages=1)
    del dxs
    dG = torch.empty(b, c, Q, Q, device=dev, dtype=x.dtype)
    gl = _diag_bwd_G_launch(Q)
    nb = Q // gl["BM"]
    dacum_m = torch.empty(b, c, h, nb, Q, device=dev, dtype=f32)    # d acum's (Q, Q) part: every slot written
    if gl["BM"] != BM:  # its own tiles, over the tensors the descriptors above hold (x copied at most once)
        x_t, dy_t = (_tiles(tma, t.base if tma else t, (1, gl["BM"], 1, BP)) for t in (x_t, dy_t))
    launch(_diag_bwd_G_kernel)[(nb, nb, b * c)](
        G, acum, x_t, dtc, dy_t, dG, dacum_m, l, c, h, p, sx, sxb, Q=Q, BP=BP, TMA=tma, PREC=prec, **gl)
    # d acum in total, then through acum = cumsum(dt A): ddt and dA
    ddt_out = torch.empty(b, l, h, device=dev, dtype=dt.dtype)
    sums = torch.empty(b * c, 2, h, device=dev, dtype=f32)         # each chunk's parts of dA and dD
    bh = min(32, next_power_of_2(h))
    launch(_dacum_kernel)[(cdiv(h, bh), b * c)](dacum, t, dacum_m, da_part, ddt, dD_part, A32, dt32, ddt_out, sums,
                                                l, c, h, nnt, Q=Q, NB=nb, BH=bh, BNT=next_power_of_2(nnt),
                                                HAS_D=D is not None, num_warps=8)
    # dC += dG B and dB += dG^T C, each written unchunked and cast to where it goes by the same kernel
    dB_out = B.new_empty(b, l, n) if dB_out is None else dB_out
    dC_out = C.new_empty(b, l, n) if dC_out is None else dC_out
    bn, bk = min(128, max(16, next_power_of_2(n))), min(64, Q)
    for out, M, sm, smb, add, trans in ((dC_out, B, sb, sbb, dC, False), (dB_out, C, sc, scb, dB, True)):
        launch(_dG_product_kernel)[(cdiv(n, bn), Q // BM, b * c)](
            dG, M, add, out, l, c, n, sm, smb, out.stride(1), TRANS=trans, Q=Q, BM=BM, BN=bn, BK=bk, PREC=prec,
            num_warps=4, num_stages=3)
    dB, dC = dB_out, dC_out
    # dA and dD: the chunks' parts summed in one small kernel, not two torch reductions (BENCHMARKS.md §0c)
    dA = torch.empty(h, device=dev, dtype=A.dtype)
    dD = None if D is None else torch.empty(h, device=dev, dtype=D.dtype)
    launch(_chunk_sums_kernel)[(cdiv(h, bh),)](sums, dA, dA if dD is None else dD, b * c, h, BR=64, BH=bh,
                                               HAS_D=D is not None, num_warps=4)
    return (dx, ddt_out, dA, dB, dC, dD,
            None if initial_state is None else d_init.view(b, h, p, n).to(initial_state.dtype))


# --------------------------------------------------------------------------------------------
# Both as torch.library ops with autograd, so that torch.compile traces around them (as
# kernels.mamba2_train)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("ssmttm::ssd_grouped_fwd", mutates_args=())
def _ssd_grouped_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], chunk_size: int,
                     use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    """forward as an op: y, the final state, then acum (forward's or forward_triton's layout), S_prev, G, y_off
    and xs for the backward."""
    return (forward_triton if use_triton else forward)(x, dt, A, B, C, chunk_size, D, initial_state)


@_ssd_grouped_fwd.register_fake
def _(x, dt, A, B, C, D, initial_state, chunk_size, use_triton):
    b, l, h, p = x.shape
    n, Q, c = B.shape[-1], chunk_size, -(-l // chunk_size)
    ft = torch.promote_types(x.dtype, torch.float32)
    new = lambda *shape: x.new_empty(shape, dtype=ft)  # noqa: E731
    acum = new(b, c, h, Q) if use_triton else new(b, c, Q, h)
    return (x.new_empty(b, l, h, p), new(b, h, p, n), acum, x.new_empty(b, c, h * p, n), new(b, c, Q, Q),
            new(b, c, Q, h * p), x.new_empty(b, c, Q, h * p))


@torch.library.custom_op("ssmttm::ssd_grouped_bwd", mutates_args=())
def _ssd_grouped_bwd(dy: torch.Tensor, dfinal: Optional[torch.Tensor], x: torch.Tensor, dt: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], acum: torch.Tensor, S_prev: torch.Tensor,
                     G: torch.Tensor, y_off: torch.Tensor, xs: torch.Tensor, chunk_size: int, use_triton: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    """backward as an op: dx, ddt, dA, dB, dC, dD and d initial_state (empty for a missing D or state)."""
    grads = (backward_triton if use_triton else backward)(dy, dfinal, x, dt, A, B, C, D, initial_state, acum,
                                                           S_prev, G, y_off, xs, chunk_size)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_ssd_grouped_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, initial_state, acum, S_prev, G, y_off, xs, chunk_size, use_triton):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    return tuple(like(t) for t in (x, dt, A, B, C, D, initial_state))


def _ssd_grouped_setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, chunk_size, use_triton = inputs
    ctx.has_D, ctx.has_init = D is not None, initial_state is not None
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, *output[2:])
    ctx.sizes = chunk_size, use_triton
    ctx.set_materialize_grads(False)  # None for an output without a gradient, not a tensor of zeros


def _ssd_grouped_backward(ctx, dy, dfinal, *_):  # acum, S_prev, G, y_off and xs are for the backward, not used
    x, dt, A, B, C, D, initial_state, acum, S_prev, G, y_off, xs = ctx.saved_tensors
    if dy is None:  # only the final state has a gradient
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, d_init = _ssd_grouped_bwd(dy, dfinal, x, dt, A, B, C, D, initial_state, acum,
                                                       S_prev, G, y_off, xs, *ctx.sizes)
    return dx, ddt, dA, dB, dC, dD if ctx.has_D else None, d_init if ctx.has_init else None, None, None


_ssd_grouped_fwd.register_autograd(_ssd_grouped_backward, setup_context=_ssd_grouped_setup)


def ssd_grouped(x, dt, A, B, C, chunk_size, D=None, initial_state=None, use_triton=False):
    """The grouped SSD with its hand-written backward, as the ssmttm::ssd_grouped_* ops.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) < 0, B and C (b, l, n) (ngroups = 1), D (h,)
    or None, initial_state (b, h, p, n) or None. Returns y (b, l, h, p) in x's dtype and the final
    state (b, h, p, n) fp32 (float64 for float64 inputs); differentiable in every tensor argument. use_triton:
    the fused Triton kernels (CUDA, or the CPU with TRITON_INTERPRET=1; chunk_size a power of two >= 16), else the
    torch form (any device and dtype, the definition the kernels are tested against). TypeError for a
    chunk_size that is not an integer, ValueError for one below 1 and for a tensor whose shape does not fit
    x's (_check_inputs)."""
    _check_inputs("ssd_grouped", x, dt, A, B, C, chunk_size, D, initial_state)
    y, final, *_ = _ssd_grouped_fwd(x, dt, A, B, C, D, initial_state, chunk_size, use_triton)
    return y, final
