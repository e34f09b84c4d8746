"""ssd_grouped (forward and hand-written backward) against autograd through
ssd_reference.ssd_chunked in float64: output, final state and every gradient."""
import os

import pytest
import torch

import ssd_grouped
import ssd_reference


def _inputs(b, l, h, p, n, seed=0, init=True, with_D=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(b, l, h, p)
    dt = torch.nn.functional.softplus(r(b, l, h) - 1.0)
    A = -torch.exp(torch.rand(h, generator=g, dtype=torch.float64) * 2.0)
    B, C = r(b, l, n) / n ** 0.5, r(b, l, n) / n ** 0.5
    D = r(h) if with_D else None
    s0 = r(b, h, p, n) * 0.3 if init else None
    return [t if t is None else t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, D, s0)]


@pytest.mark.parametrize("l,Q", [(40, 16), (37, 16), (9, 16), (64, 8)])
@pytest.mark.parametrize("init,with_D", [(True, True), (False, False), (True, False), (False, True)])
def test_grouped_ssd_equals_the_reference_with_gradients(l, Q, init, with_D):
    x, dt, A, B, C, D, s0 = _inputs(2, l, 3, 4, 5, init=init, with_D=with_D)
    y_ref, f_ref = ssd_reference.ssd_chunked(x, dt, A, B[:, :, None], C[:, :, None], Q, D=D, initial_state=s0)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    dfinal = torch.randn(f_ref.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, dt, A, B, C, D, s0) if t is not None]
    ref_grads = torch.autograd.grad((y_ref * dy).sum() + (f_ref * dfinal).sum(), inputs)
    y, f = ssd_grouped.ssd_grouped(x, dt, A, B, C, Q, D, s0)
    grads = torch.autograd.grad((y * dy).sum() + (f * dfinal).sum(), inputs)
    assert (y - y_ref).abs().max() < 1e-12 and (f - f_ref).abs().max() < 1e-12
    names = [nm for nm, t in zip("x dt A B C D s0".split(), (x, dt, A, B, C, D, s0)) if t is not None]
    for name, got, want in zip(names, grads, ref_grads):
        assert (got - want).abs().max() <= 1e-11 * max(1.0, want.abs().max().item()), name


def _bf16_inputs(b, l, h, p, n, init=True, with_D=True):
    # the training path's dtypes: x, B and C in bf16; dt, A, D and the initial state in fp32
    x, dt, A, B, C, D, s0 = (t if t is None else t.detach() for t in _inputs(b, l, h, p, n, init=init, with_D=with_D))
    fp32 = [t if t is None else t.float() for t in (dt, A, D, s0)]
    return [x.bfloat16(), fp32[0], fp32[1], B.bfloat16(), C.bfloat16(), fp32[2], fp32[3]]


def test_ssd_grouped_op_fake_matches_bf16_inputs_in_whole_chunks():
    # a length that is a whole number of chunks (32 at chunk 16: no padding, c = l / Q exactly) and bf16
    # operands: the torch form's outputs have the shapes and dtypes its fake gives (what torch.compile traces
    # with): y in x's dtype, S_prev and xs in x's dtype, acum, G and y_off fp32 with c = 2 chunks
    x, dt, A, B, C, D, s0 = _bf16_inputs(2, 32, 3, 4, 5)
    out = ssd_grouped.forward(x, dt, A, B, C, 16, D, s0)
    want = [((2, 32, 3, 4), torch.bfloat16), ((2, 3, 4, 5), torch.float32), ((2, 2, 16, 3), torch.float32),
            ((2, 2, 12, 5), torch.bfloat16), ((2, 2, 16, 16), torch.float32), ((2, 2, 16, 12), torch.float32),
            ((2, 2, 16, 12), torch.bfloat16)]
    assert [(tuple(t.shape), t.dtype) for t in out] == want
    y, f = ssd_grouped.ssd_grouped(x, dt, A, B, C, 16, D, s0)
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    torch.library.opcheck(ssd_grouped._ssd_grouped_fwd, (x, dt, A, B, C, D, s0, 16, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_form_gemm_operands_are_in_xs_dtype(monkeypatch):
    # the module's contract: intermediates fp32, the GEMM operands in x's dtype (bf16 here), as the Triton
    # form's: S_prev (y_off's and dC's products), dstates (dxs' and dB's), xs, dy_e, dG, B and C
    seen = []
    matmul = ssd_grouped._matmul_f32

    def spy(a, b, add=None):
        seen.append((a.dtype, b.dtype))
        return matmul(a, b, add)
    monkeypatch.setattr(ssd_grouped, "_matmul_f32", spy)
    x, dt, A, B, C, D, s0 = (t.requires_grad_() for t in _bf16_inputs(1, 40, 2, 4, 6))
    y, f = ssd_grouped.ssd_grouped(x, dt, A, B, C, 16, D, s0)
    torch.autograd.grad(y.float().square().sum() + f.sum(), (x, dt, A, B, C, D, s0))
    assert len(seen) == 3 + 6  # the forward's three products, the backward's six
    assert all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen


def test_torch_form_rounds_dstates_and_dxs_to_xs_dtype_as_the_kernels_store_them():
    # bf16, one chunk, dy = 0: only the final state's gradient reaches x, through the chunk state S = xs^T B,
    # so dx = round(B dstates^T) exp(acum_end - acum) dt with dstates = dfinal rounded to x's dtype (the GEMM
    # operand) and dxs rounded to x's dtype (as the Triton form stores it); dB = xs dstates
    b, l, h, p, n, Q = 1, 16, 2, 8, 8, 16
    x, dt, A, B, C, _, _ = _bf16_inputs(b, l, h, p, n, init=False, with_D=False)
    dfinal = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(7))
    y, final, acum, S_prev, G, y_off, xs = ssd_grouped.forward(x, dt, A, B, C, Q)
    dx, ddt, dA, dB, dC, dD, d_init = ssd_grouped.backward(torch.zeros_like(y), dfinal, x, dt, A, B, C, None, None,
                                                             acum, S_prev, G, y_off, xs, Q)
    dstates = dfinal.reshape(b, 1, h * p, n).bfloat16().float()                       # (b, c, h*p, n)
    dxs = torch.matmul(B.float().view(b, 1, Q, n), dstates.transpose(-1, -2)).bfloat16().float()
    to_end = torch.exp(acum[:, :, -1:] - acum)                                       # (b, c, Q, h)
    want_dx = (dxs.view(b, 1, Q, h, p) * to_end[..., None] * dt.view(b, 1, Q, h)[..., None]).view(b, l, h, p)
    assert torch.equal(dx, want_dx.bfloat16())
    want_dB = torch.matmul(xs.float(), dstates).view(b, l, n)
    assert torch.equal(dB, want_dB.bfloat16())
    assert not dC.any() and dD is None and d_init is None


def test_torch_form_rounds_x_dt_of_ys_chunk_part_to_xs_dtype():
    # bf16, one chunk, no initial state and no D: y is the (Q, Q) part alone, sum_s G[q, s] exp(acum_q -
    # acum_s) x_s dt_s, whose operand x dt the torch form rounds to x's dtype as the Triton kernel does
    b, l, h, p, n, Q = 2, 16, 3, 8, 8, 16
    x, dt, A, B, C, _, _ = _bf16_inputs(b, l, h, p, n, init=False, with_D=False)
    y, final, acum, S_prev, G, y_off, xs = ssd_grouped.forward(x, dt, A, B, C, Q)
    assert not S_prev.any()
    xdt = (x.float() * dt[..., None]).bfloat16().view(b, 1, Q, h, p)
    want = ssd_grouped.diag_forward(G, acum, xdt).view(b, l, h, p).bfloat16()
    assert torch.equal(y, want)


@pytest.mark.parametrize("used", ["y", "final"])
def test_grouped_ssd_with_one_output_unused(used):
    # only y is used (the final state's gradient is None in autograd, the scan starts from zero), or
    # only the final state (y's gradient is None: the op takes it as zeros)
    x, dt, A, B, C, D, s0 = _inputs(1, 30, 2, 4, 6)
    ref = ssd_reference.ssd_chunked(x, dt, A, B[:, :, None], C[:, :, None], 8, D=D, initial_state=s0)
    out = ssd_grouped.ssd_grouped(x, dt, A, B, C, 8, D, s0)
    k = 0 if used == "y" else 1
    inputs = (x, dt, A, B, C, D, s0)
    grads = torch.autograd.grad(out[k].square().sum(), inputs, allow_unused=True)
    for got, want in zip(grads, torch.autograd.grad(ref[k].square().sum(), inputs, allow_unused=True)):
        if want is None:  # D does not reach the final state
            assert got is None or not got.any()
        else:
            assert (got - want).abs().max() <= 1e-11 * max(1.0, want.abs().max().item())


def test_grouped_ssd_da_in_bf16_is_within_its_bound():
    # bf16 inputs (the training path's): dA sums d acum, whose (Q, Q) part is row sums minus column
    # sums that mostly cancel, so the rounding of x dt in that product used to dominate it (4.9e-3
    # on these inputs; 5.7e-4 with x dt in fp32). Errors against float64, max|d| / max|ref|.
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    l, h, p, n, Q = 1024, 4, 64, 128, 256
    x, dt = r(1, l, h, p).bfloat16(), torch.nn.functional.softplus(r(1, l, h) - 3.0)
    A = -torch.exp(torch.rand(h, generator=g) * 2.77)
    B, C = (r(1, l, n) / n ** 0.5).bfloat16(), (r(1, l, n) / n ** 0.5).bfloat16()
    D, s0, dy = r(h), r(1, h, p, n) * 0.1, r(1, l, h, p).bfloat16()
    leaves = [t.double().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    y, _ = ssd_reference.ssd_chunked(leaves[0], leaves[1], leaves[2], leaves[3][:, :, None], leaves[4][:, :, None], Q,
                                     D=leaves[5], initial_state=leaves[6])
    want = torch.autograd.grad((y * dy.double()).sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    y, _ = ssd_grouped.ssd_grouped(*leaves[:5], Q, leaves[5], leaves[6])
    got = torch.autograd.grad((y.float() * dy.float()).sum(), leaves)
    err = {name: ((a.double() - w).abs().max() / w.abs().max()).item()
           for name, a, w in zip("dx ddt dA dB dC dD ds0".split(), got, want)}
    assert err["dA"] < 1.5e-3 and err["ddt"] < 2.2e-3, err
    assert max(err.values()) < 5e-3, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and mamba-ssm")
def test_gpu_grouped_errors_are_no_worse_than_mamba_ssms():
    # the shape (b 2, L 2650, 32 heads, d_state 512, chunk 256, bf16, row 1 left-padded,
    # with D and an initial state): the Triton form's error against float64, per output and
    # gradient, against mamba-ssm's on the same inputs (bench_ssd_grouped.py --check prints them).
    # Equal or better, except dA: 1.39e-3 against 1.28e-3 on an H200 (BENCHMARKS.md, section 0c)
    pytest.importorskip("mamba_ssm")
    import bench_ssd_grouped
    errs = bench_ssd_grouped.errors(2650, 512, 256)
    ours, theirs = errs["grouped"], errs["mamba-ssm"]
    print("\n" + "\n".join(f"{path}: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()) for path, e in errs.items()))
    for name in ours:
        assert ours[name] <= (1.2 if name == "dA" else 1.02) * theirs[name], (name, errs)


# ------------------------------------------------------------------------------------------------
# The Triton kernels of the (Q, Q) part: on a GPU, or on the CPU with TRITON_INTERPRET=1 (slow)
try:
    import triton
except ImportError:
    triton = None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(triton is None or not (INTERPRET or torch.cuda.is_available()),
                                  reason="Triton on a GPU, or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_descriptors = pytest.mark.skipif(getattr(ssd_grouped, "TensorDescriptor", None) is None,
                                       reason="Triton 3.4 or later (TensorDescriptor)")


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@needs_triton
@pytest.mark.parametrize("b,l,h,p,Q,n,init,with_D,dfinal,strided", [
    (2, 70, 3, 16, 32, 20, True, True, True, True),
    (2, 64, 3, 16, 16, 20, False, False, True, False),
    (2, 20, 3, 16, 32, 20, True, True, False, False),
    (2, 40, 3, 16, 16, 144, True, False, True, True),
    (2, 300, 3, 16, 256, 20, True, True, True, False),
    (5, 221, 2, 16, 16, 8, True, True, True, False),    # 70 chunks: more than _chunk_sums_kernel's 64 rows a pass
    (1, 20, 40, 16, 16, 8, True, True, True, False),    # 40 heads: more than one head block of the d acum kernels
    (2, 37, 1, 16, 16, 8, True, True, True, False),     # 1 head: _dy_kernel's head-0 program alone writes dt's copy
    (2, 40, 3, 24, 16, 8, True, True, True, False)])    # a head dim below its power of two (masked columns)
def test_grouped_ssd_in_triton_equals_the_reference_with_gradients(b, l, h, p, Q, n, init, with_D, dfinal, strided):
    # fp32 inputs (exact products: input_precision "ieee"), 1 to 4 chunks, lengths not a multiple of the
    # chunk, chunks of one row block and of four (Q 256: the (Q, Q) kernels' blocks below the diagonal,
    # where the decay is split), the state in one tile of columns (n 20, masked) or two (n 144: the
    # second masked), with and without initial state, D and a final-state gradient; x, B and C read in
    # place from wider tensors (as from the conv's output) or contiguous; grids of several blocks of
    # chunks and of heads
    x, dt, A, B, C, D, s0 = _inputs(b, l, h, p, n, init=init, with_D=with_D)
    y_ref, f_ref = ssd_reference.ssd_chunked(x, dt, A, B[:, :, None], C[:, :, None], Q, D=D, initial_state=s0)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    df = torch.randn(f_ref.shape, generator=g, dtype=torch.float64)
    df = df if dfinal else torch.zeros_like(df)
    inputs = [t for t in (x, dt, A, B, C, D, s0) if t is not None]
    want = torch.autograd.grad((y_ref * dy).sum() + (f_ref * df).sum(), inputs)
    f32 = [None if t is None else t.detach().float().to(DEVICE).requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    xin, Bin, Cin = f32[0], f32[3], f32[4]
    if strided:  # rows of h*p + 7 values, of which x is the first h*p; B and C side by side in rows of 2n + 5
        b, _, h, p = xin.shape
        xin = torch.cat([xin.flatten(2), torch.zeros(b, l, 7, device=DEVICE)], -1)[..., :h * p].unflatten(-1, (h, p))
        BC = torch.cat([Bin, Cin, torch.zeros(b, l, 5, device=DEVICE)], -1)
        Bin, Cin = BC[..., :n], BC[..., n:2 * n]
        assert xin.stride(1) == h * p + 7 and Bin.stride(1) == Cin.stride(1) == 2 * n + 5
    y, f = ssd_grouped.ssd_grouped(xin, f32[1], f32[2], Bin, Cin, Q, f32[5], f32[6], use_triton=True)
    loss = (y * dy.float().to(DEVICE)).sum() + ((f * df.float().to(DEVICE)).sum() if dfinal else 0)
    got = torch.autograd.grad(loss, [t for t in f32 if t is not None])
    # In chunks of 256 acum spans hundreds, and a GPU's exp (exp2 of a rounded product) is off by about
    # |x| 2^-24: y 1.1e-5 off on an H200 (the torch form 2.2e-6). dA sums d acum over a chunk, whose row,
    # column and state parts cancel: 7.7e-5 (H200), 4.6e-5 (the torch form on the CPU 7.6e-5).
    tol = 3e-5 if Q > 64 else 1e-5
    assert _rel(y.detach().cpu(), y_ref.detach()) < tol and _rel(f.detach().cpu(), f_ref.detach()) < tol
    names = [nm for nm, t in zip("x dt A B C D s0".split(), (x, dt, A, B, C, D, s0)) if t is not None]
    for name, a, r in zip(names, got, want):
        assert _rel(a.cpu(), r) < (2e-4 if name == "A" and Q > 64 else max(tol, 2e-5)), name


@needs_triton
@needs_descriptors
@pytest.mark.parametrize("strided", [False, True])
def test_kernels_through_tma_equal_their_pointer_loads(strided):
    # the two ways the chunk-state kernels, dx's and dG's load their tiles (TMA descriptors from Hopper on,
    # pointers before it) give the same states, outputs and gradients; strided: x, B and C as columns of one
    # wider buffer whose rows (55 floats) TMA cannot read in place (_descriptor copies them)
    x, dt, A, B, C, D, s0 = (t.detach().float().to(DEVICE) for t in _inputs(2, 300, 3, 16, 20))
    if strided:
        buffer = torch.cat([x.flatten(2), B, C, torch.zeros(2, 300, 7, device=DEVICE)], -1)
        x, B, C = buffer[..., :48].unflatten(-1, (3, 16)), buffer[..., 48:68], buffer[..., 68:88]
    g = torch.Generator().manual_seed(3)
    dy, dfinal = torch.randn(x.shape, generator=g).to(DEVICE), torch.randn(s0.shape, generator=g).to(DEVICE)
    out = {}
    for tma in (False, True):
        y, final, *saved = ssd_grouped.forward_triton(x, dt, A, B, C, 256, D, s0, tma=tma)
        grads = ssd_grouped.backward_triton(dy, dfinal, x, dt, A, B, C, D, s0, *saved, 256, tma=tma)
        out[tma] = [y, final, *saved, *grads]
    for got, want in zip(out[True], out[False]):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@needs_triton
@pytest.mark.parametrize("tma", [False, pytest.param(True, marks=needs_descriptors)])
def test_grouped_ssd_takes_x_b_and_c_from_a_buffer_padded_to_whole_chunks(tma):
    # x, B and C as views of one buffer whose sequences have rows up to whole chunks (the training op's conv
    # output: 70 -> 96 rows at chunk 32), B and C given with those rows, zeros past 70 (their chunks then
    # views, no copy), x's rows past 70 NaN (never read): every output of forward_triton and backward_triton
    # equals the contiguous inputs' (within cuBLAS's choice of kernel for other strides on a GPU)
    b, l, h, p, n, Q = 2, 70, 3, 16, 20, 32
    x, dt, A, B, C, D, s0 = (t.detach().float().to(DEVICE) for t in _inputs(b, l, h, p, n))
    rows = ssd_grouped.padded_rows(l, Q)
    assert rows == 96 and ssd_grouped.padded_rows(64, 32) == 64
    buffer = torch.zeros(b, rows, h * p + 2 * n + 4, device=DEVICE)
    buffer[:, :l, :h * p], buffer[:, :l, h * p:h * p + n], buffer[:, :l, h * p + n:h * p + 2 * n] = x.flatten(2), B, C
    buffer[:, l:, :h * p] = float("nan")
    xv, Bv, Cv = (buffer[:, :l, :h * p].unflatten(-1, (h, p)), buffer[..., h * p:h * p + n],
                  buffer[..., h * p + n:h * p + 2 * n])
    g = torch.Generator().manual_seed(5)
    dy, dfinal = torch.randn(x.shape, generator=g).to(DEVICE), torch.randn(s0.shape, generator=g).to(DEVICE)
    out = []
    for xi, Bi, Ci in ((x, B, C), (xv, Bv, Cv)):
        y, final, *saved = ssd_grouped.forward_triton(xi, dt, A, Bi, Ci, Q, D, s0, tma=tma)
        grads = ssd_grouped.backward_triton(dy, dfinal, xi, dt, A, Bi, Ci, D, s0, *saved, Q, tma=tma)
        out.append([y, final, *saved, *grads])
    for got, want in zip(out[1], out[0]):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-6 * want.abs().max()
    with pytest.raises(ValueError, match=r"B \(2, 80, 20\) and C \(2, 80, 20\) must both be \(2, 70, n\) or "
                                         r"\(2, 96, n\)"):
        ssd_grouped.forward_triton(x, dt, A, buffer[:, :80, :n], buffer[:, :80, n:2 * n], Q, D, s0)
    with pytest.raises(ValueError, match="backward_triton: B"):
        ssd_grouped.backward_triton(dy, dfinal, x, dt, A, Bv, C, D, s0, *saved, Q)


@needs_triton
@pytest.mark.parametrize("tma", [False, pytest.param(True, marks=needs_descriptors)])
def test_dg_kernel_writes_every_slot_of_d_acums_sums(tma):
    # _diag_bwd_G_kernel: dG = sum_h D_h and, per head, M_h = G * D_h's row sums less its column sums,
    # spread over Q / BM slots that backward_triton allocates uninitialised; here they start as NaN, so
    # a slot no tile writes shows. D_h[q, s] = (dy_q . x_s) dt_s exp(acum_q - acum_s) for s <= q.
    b, l, h, p, Q, BM = 2, 37, 3, 16, 32, 16
    c, nb = -(-l // Q), Q // BM
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, h, p, generator=g)
    dt = torch.rand(b, l, h, generator=g) * 0.5
    G = torch.randn(b, c, Q, Q, generator=g)
    acum = torch.cumsum(torch.nn.functional.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h) * -0.7, dim=2)
    dG = torch.empty(b, c, Q, Q, device=DEVICE)
    slots = torch.full((b, c, h, nb, Q), float("nan"), device=DEVICE)
    rows = (1, BM, 1, p)
    # acum and dt as the kernels take them: (b, c, h, Q), dt zero past l
    dt_rows = torch.nn.functional.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h).transpose(2, 3).contiguous()
    xd, dyd, dtd, Gd, ad = (t.to(DEVICE) for t in (x, dy, dt_rows, G, acum.transpose(2, 3).contiguous()))
    ssd_grouped._diag_bwd_G_kernel[(nb, nb, b * c)](Gd, ad, ssd_grouped._tiles(tma, xd, rows), dtd,
                                                    ssd_grouped._tiles(tma, dyd, rows), dG, slots, l, c, h, p,
                                                    h * p, l * h * p, Q=Q, BM=BM, BP=p, TMA=tma, PREC="ieee")
    pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, c * Q - l))  # noqa: E731
    xc, dyc, dtc = (pad(t).double().view(b, c, Q, *t.shape[2:]) for t in (x, dy, dt))
    decay = (acum.double()[:, :, :, None, :] - acum.double()[:, :, None, :, :]).exp()      # (b, c, q, s, h)
    Dh = torch.einsum("bcqhp,bcshp->bcqsh", dyc, xc) * dtc[:, :, None] * decay * torch.ones(Q, Q).tril()[..., None]
    M = G.double()[..., None] * Dh
    assert torch.allclose(dG.cpu().double(), Dh.sum(-1), atol=1e-4, rtol=1e-4)
    got = slots.cpu().double().sum(3)                                                     # (b, c, h, Q)
    assert torch.isfinite(got).all()
    want = (M.sum(3) - M.sum(2)).permute(0, 1, 3, 2)                                    # rows less columns
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
@needs_descriptors
def test_descriptor_copies_only_what_tma_cannot_read():
    # TMA reads rows whose base and strides are multiples of 16 bytes in place; others through a copy
    # into rows padded to 16 bytes: same shape and values
    buffer = torch.randn(2, 40, 3 * 16 + 2 * 24 + 8, device=DEVICE)
    for t, in_place in ((buffer[..., 48:72], True), (buffer[..., :48].unflatten(-1, (3, 16)), True),
                        (buffer[..., 1:25], False), (torch.randn(2, 40, 45, device=DEVICE)[..., :8], False),
                        (buffer[:, ::3, :8], True),
                        (buffer[..., :8].transpose(1, 2), False)):
        desc = ssd_grouped._descriptor(t, [1] * (t.dim() - 1) + [8])
        assert (desc.base.data_ptr() == t.data_ptr()) == in_place and torch.equal(desc.base, t)
        assert desc.base.stride(-1) == 1 and all(s * 4 % 16 == 0 for s in desc.base.stride()[:-1])
        assert desc.base.data_ptr() % 16 == 0 and list(desc.shape) == list(t.shape)


@needs_triton
def test_grouped_backward_writes_dx_into_a_wider_buffer():
    # the training op passes the x columns of the conv's gradient as dx_out: dx lands there bit for
    # bit as in a tensor of its own, and the buffer's other columns stay as they were
    x, dt, A, B, C, D, _ = _inputs(2, 40, 3, 16, 8, init=False, dtype=torch.float32)
    x, dt, A, B, C, D = (t.detach().to(DEVICE) for t in (x, dt, A, B, C, D))
    y, _, *saved = ssd_grouped.forward_triton(x, dt, A, B, C, 16, D)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (dy, None, x, dt, A, B, C, D, None, *saved, 16)
    want = ssd_grouped.backward_triton(*args)
    buffer = torch.full((2, 40, 3 * 16 + 5), 7.0, device=DEVICE)
    dx_out = buffer[..., :3 * 16].unflatten(-1, (3, 16))
    got = ssd_grouped.backward_triton(*args, dx_out=dx_out)
    assert got[0] is dx_out and torch.equal(dx_out, want[0]) and bool((buffer[..., 48:] == 7.0).all())
    for g, w in zip(got[1:6], want[1:6]):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="dx_out must be"):
        ssd_grouped.backward_triton(*args, dx_out=torch.empty(2, 40, 16, 3, device=DEVICE).transpose(2, 3))
    # rows that share memory (an expanded tensor: strides 0 pass "sequences one after another", 0 == 40 * 0)
    # would have every row written over the last
    with pytest.raises(ValueError, match="dx_out must be"):
        ssd_grouped.backward_triton(*args, dx_out=torch.empty(1, 1, 3, 16, device=DEVICE).expand(2, 40, 3, 16))
    with pytest.raises(ValueError, match="dB_out must be"):
        ssd_grouped.backward_triton(*args, dB_out=torch.empty(1, 1, 8, device=DEVICE).expand(2, 40, 8))
    # dB and dC likewise, into the B and C columns of a wider buffer (the conv's gradient), and cast
    # as they are written (fp64 here: the same values)
    buffer = torch.full((2, 40, 3 + 2 * 8 + 2), 7.0, device=DEVICE, dtype=torch.float64)
    dB_out, dC_out = buffer[..., 3:11], buffer[..., 11:19]
    got = ssd_grouped.backward_triton(*args, dB_out=dB_out, dC_out=dC_out)
    assert got[3] is dB_out and got[4] is dC_out
    assert torch.equal(dB_out, want[3].double()) and torch.equal(dC_out, want[4].double())
    assert bool((buffer[..., :3] == 7.0).all()) and bool((buffer[..., 19:] == 7.0).all())
    with pytest.raises(ValueError, match="dC_out must be"):
        ssd_grouped.backward_triton(*args, dC_out=buffer[:, :39, 11:19])


@needs_triton
def test_grouped_ssd_in_triton_reads_and_writes_nothing_past_l():
    # x, B and C as views of a buffer whose sequences go on past l (the conv's output with padded rows),
    # dt and dy followed in memory by more values, dx_out by more rows: all of it NaN (a sentinel for
    # dx_out). A kernel that read one of those values would make a NaN (NaN times a zero mask is NaN), one
    # that wrote there would change the sentinel: every output equals the contiguous inputs' and the
    # sentinel stays. l 37 in chunks of 16: the last chunk has 5 of its 16 rows in the sequence.
    b, l, h, p, n, Q = 2, 37, 3, 16, 8, 16
    x, dt, A, B, C, D, s0 = (t.detach().float().to(DEVICE) for t in _inputs(b, l, h, p, n))
    g = torch.Generator().manual_seed(6)
    dy, dfinal = torch.randn(x.shape, generator=g).to(DEVICE), torch.randn(s0.shape, generator=g).to(DEVICE)
    buffer = torch.full((b, l + 11, h * p + 2 * n + 4), float("nan"), device=DEVICE)
    buffer[:, :l, :h * p], buffer[:, :l, h * p:h * p + n], buffer[:, :l, h * p + n:h * p + 2 * n] = x.flatten(2), B, C
    xv = buffer[:, :l, :h * p].unflatten(-1, (h, p))
    Bv, Cv = buffer[:, :l, h * p:h * p + n], buffer[:, :l, h * p + n:h * p + 2 * n]

    def followed_by_nan(t):  # t's values, contiguous, in storage whose next 64 rows are NaN
        store = torch.full((t.numel() + 64 * t[0, 0].numel(),), float("nan"), device=DEVICE)
        store[:t.numel()] = t.flatten()
        return store[:t.numel()].view(t.shape)
    out = []
    for xi, dti, Bi, Ci, dyi in ((x, dt, B, C, dy), (xv, followed_by_nan(dt), Bv, Cv, followed_by_nan(dy))):
        y, final, *saved = ssd_grouped.forward_triton(xi, dti, A, Bi, Ci, Q, D, s0)
        dx_store = torch.full((b * l + 16, h * p), 7.0, device=DEVICE)  # 16 sentinel rows after the last sequence
        dx_out = dx_store[:b * l].view(b, l, h, p)
        grads = ssd_grouped.backward_triton(dyi, dfinal, xi, dti, A, Bi, Ci, D, s0, *saved, Q, dx_out=dx_out)
        assert bool((dx_store[b * l:] == 7.0).all()), "dx written past the last sequence"
        out.append([y, final, *grads])
    for name, got, want in zip("y final dx ddt dA dB dC dD ds0".split(), out[1], out[0]):
        assert bool(torch.isfinite(got).all()), name
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name


@needs_triton
def test_triton_forms_multiply_fp32_operands_exactly():
    # fp32 inputs take input_precision "ieee" in every tl.dot: the fp32 tests' tolerances assume exact
    # products (tf32 is ~1e-3 off on a GPU). Triton's interpreter ignores input_precision, so on the CPU no
    # number would show it: the launches are recorded through the launch hook instead.
    seen = []

    def launch(kernel):
        name = getattr(kernel, "fn", kernel).__name__

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append((name, kwargs.get("PREC")))
                    return kernel[grid](*args, **kwargs)
                return run
        return Grid()
    x, dt, A, B, C, D, s0 = (t.detach().float().to(DEVICE) for t in _inputs(1, 20, 2, 16, 8))
    y, final, *saved = ssd_grouped.forward_triton(x, dt, A, B, C, 16, D, s0, launch=launch)
    ssd_grouped.backward_triton(torch.ones_like(y), None, x, dt, A, B, C, D, s0, *saved, 16, launch=launch)
    with_dot = {"_states_fwd_kernel", "_diag_fwd_kernel", "_states_bwd_kernel", "_diag_bwd_x_kernel",
                "_diag_bwd_G_kernel", "_dG_product_kernel"}
    assert with_dot <= {name for name, _ in seen}, seen
    assert all(prec == "ieee" for name, prec in seen if name in with_dot), seen


@needs_triton
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l,Q", [(37, 64), (70, 32)])
def test_grouped_forward_continues_a_state_in_place(state_dtype, l, Q):
    # a prefill from a decoding state: forward_triton reads the initial state in its own dtype and
    # writes the final state over it (final_out), rounded once to that dtype; one chunk (l 37 in a
    # chunk of 64, as a prefill shorter than a chunk) and three (l 70 in chunks of 32). The same y
    # and final state as from an fp32 copy of the state into a new fp32 final state, bit for bit
    # (Triton's interpreter rounds fp32 to bf16 toward zero, a GPU to the nearest: there, one ulp).
    x, dt, A, B, C, D, s0 = [t.detach().float().to(DEVICE) for t in _inputs(2, l, 3, 16, 20)]
    state = s0.to(state_dtype)
    y_copy, f_copy = ssd_grouped.forward_triton(x, dt, A, B, C, Q, D, state.float())[:2]
    assert f_copy.dtype == torch.float32
    y, final = ssd_grouped.forward_triton(x, dt, A, B, C, Q, D, state, final_out=state)[:2]
    assert final is state and state.dtype == state_dtype
    assert torch.equal(y, y_copy)
    if INTERPRET and state_dtype == torch.bfloat16:
        assert bool(((state.float() - f_copy).abs() <= torch.finfo(state_dtype).eps * f_copy.abs()).all())
    else:
        assert torch.equal(state, f_copy.to(state_dtype))
    with pytest.raises(ValueError, match="final_out"):
        ssd_grouped.forward_triton(x, dt, A, B, C, Q, D, state, final_out=state.transpose(-1, -2))
    # the right shape in the (b, h, n, p) layout: the kernel writes with contiguous offsets, so refused
    transposed = torch.empty(2, 3, 20, 16, device=DEVICE).transpose(-1, -2)
    with pytest.raises(ValueError, match="final_out"):
        ssd_grouped.forward_triton(x, dt, A, B, C, Q, D, state, final_out=transposed)


@needs_triton
@pytest.mark.parametrize("l", [40, 37, 48])
def test_grouped_chunks_of_strided_rows_equal_the_padded_copy(l):
    # B and C come as columns of the conv's output; the Triton path pads them into chunks in one pass
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, l, 3 + 5 + 4, generator=g).to(DEVICE)
    B = buffer[..., 3:8]
    got = ssd_grouped._chunked_rows(B, l, 16, ssd_grouped.as_is)
    assert torch.equal(got, ssd_grouped._chunked(B.contiguous(), 16))
    assert got.shape == (2, 3, 16, 5) and bool((got.reshape(2, 48, 5)[:, l:] == 0).all())
    # the rows of another sequence's layout (a padded buffer's sequences, any distance apart) copy the same
    spaced = torch.randn(2, 50, 12, generator=g).to(DEVICE)[:, :l, 3:8]
    spaced.copy_(B)
    assert torch.equal(ssd_grouped._chunked_rows(spaced, l, 16, ssd_grouped.as_is), got)


@pytest.mark.parametrize("variant", ["prefix_simba", "cross_simba"])
def test_lm_with_the_grouped_training_path_equals_the_plain_model(variant):
    # FastOptions(train="grouped") on a CPU (ssd_grouped's torch form): loss and every gradient of the
    # LM equal the plain model's in float64, left-padded texts included; a prefill then continues
    # from the same state
    import fast
    import ssmttm
    from test_ssmttm import random_text, tiny_model
    plain, grouped = tiny_model(variant, 4), tiny_model(variant, 4)
    options = fast.FastOptions(train="grouped", chunk_size=16)
    for m in grouped.modules():  # what fast.accelerate does, without its CUDA check
        if isinstance(m, ssmttm.Mamba2):
            m.__class__, m.options = fast.FastMamba2, options
    text, mask = random_text()
    codes = torch.randint(0, 1024, (2, 4, 37), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (plain, grouped):
        model.train()
        _, loss = model(codes, text, mask)
        loss.backward()
        losses.append(loss)
    assert abs(losses[0].item() - losses[1].item()) < 1e-12
    for (name, a), b in zip(plain.named_parameters(), grouped.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-10 * max(1.0, a.grad.abs().max().item()), name
    plain.eval(), grouped.eval()
    with torch.no_grad():  # the prefill through ssd_grouped, then the plain steps: the same greedy tokens
        runs = [m.generate(text, mask, 12, top_k=1) for m in (plain, grouped)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("init", [True, False])
def test_ssd_grouped_ops_equal_the_reference_and_pass_opcheck(init):
    # the torch.library form (what torch.compile traces around): the reference's values and
    # gradients in float64, and torch.library.opcheck (schema, fake shapes, autograd registration)
    x, dt, A, B, C, D, s0 = _inputs(2, 37, 3, 4, 5, init=init)
    y_ref, f_ref = ssd_reference.ssd_chunked(x, dt, A, B[:, :, None], C[:, :, None], 16, D=D, initial_state=s0)
    y, f = ssd_grouped.ssd_grouped(x, dt, A, B, C, 16, D, s0)
    assert (y - y_ref).abs().max() < 1e-12 and (f - f_ref).abs().max() < 1e-12
    inputs = [t for t in (x, dt, A, B, C, D, s0) if t is not None]
    loss = lambda y, f: y.square().sum() + f.sum()  # noqa: E731
    for got, want in zip(torch.autograd.grad(loss(y, f), inputs), torch.autograd.grad(loss(y_ref, f_ref), inputs)):
        assert (got - want).abs().max() <= 1e-11 * max(1.0, want.abs().max().item())
    torch.library.opcheck(ssd_grouped._ssd_grouped_fwd, (x, dt, A, B, C, D, s0, 16, False))


def test_ssd_grouped_op_compiles_in_one_graph():
    x, dt, A, B, C, D, _ = _inputs(1, 20, 2, 4, 5, init=False, dtype=torch.float32)
    fn = lambda *t: ssd_grouped.ssd_grouped(*t[:5], 8, t[5])[0].square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(fn(x, dt, A, B, C, D), (x, B))
    got = torch.autograd.grad(compiled(x, dt, A, B, C, D), (x, B))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_triton
def test_triton_forward_keeps_acum_in_rows_of_heads_and_its_fake_says_so():
    # forward_triton keeps acum as (b, c, h, Q), a head's chunk in one row: what the (Q, Q) kernels load as
    # vectors (in (b, c, Q, h) each value was a 32-byte sector of its own). Its values are the torch form's, and
    # the op's fake, what torch.compile traces with, gives that shape and layout.
    x, dt, A, B, C, D, s0 = (t.detach().float().to(DEVICE) for t in _inputs(2, 37, 3, 4, 5))
    acum = ssd_grouped.forward_triton(x, dt, A, B, C, 16, D, s0)[2]
    want = ssd_grouped.forward(*(t.cpu() for t in (x, dt, A, B, C)), 16, D.cpu(), s0.cpu())[2]   # (b, c, Q, h)
    assert acum.shape == (2, 3, 3, 16) and acum.is_contiguous()
    assert torch.allclose(acum.cpu(), want.transpose(2, 3), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(ssd_grouped._ssd_grouped_fwd, (x, dt, A, B, C, D, s0, 16, True),
                          test_utils=("test_faketensor",))


# Docstring claims made true (audit h22): ssd_grouped, forward and forward_triton refuse shapes that do not fit x
@pytest.mark.parametrize("arg,bad", [("A", lambda t: t[:1]), ("D", lambda t: t[:1]), ("dt", lambda t: t[..., :1]),
                                     ("initial_state", lambda t: t[:1]), ("C", lambda t: t[..., :-1])])
def test_grouped_ssd_refuses_inputs_that_do_not_fit_x(arg, bad):
    # the torch form broadcast A, D and dt of one head silently; the kernels would read past them
    x, dt, A, B, C, D, s0 = (t.detach().float() for t in _inputs(2, 8, 3, 4, 5))
    args = dict(x=x, dt=dt, A=A, B=B, C=C, chunk_size=4, D=D, initial_state=s0)
    args[arg] = bad(args[arg])
    for name, fn, Q in (("ssd_grouped", ssd_grouped.ssd_grouped, 4), ("forward", ssd_grouped.forward, 4),
                        ("forward_triton", ssd_grouped.forward_triton, 16)):
        match = f"{name}: B .* and C .* must both be" if arg == "C" else f"{name}: {arg} "
        with pytest.raises(ValueError, match=match):
            fn(**{**args, "chunk_size": Q})


@pytest.mark.parametrize("chunk_size,error", [(0, ValueError), (4.0, TypeError), (True, TypeError)])
def test_grouped_ssd_refuses_a_chunk_size_that_is_not_a_positive_integer(chunk_size, error):
    x, dt, A, B, C, D, s0 = (t.detach() for t in _inputs(2, 8, 3, 4, 5))
    for name, fn in (("ssd_grouped", ssd_grouped.ssd_grouped), ("forward", ssd_grouped.forward)):
        with pytest.raises(error, match=f"{name}: chunk_size"):
            fn(x, dt, A, B, C, chunk_size, D, s0)
    with pytest.raises(TypeError, match="chunk_size 16.0"):
        ssd_grouped.forward_triton(x.float(), dt.float(), A.float(), B.float(), C.float(), 16.0)


@pytest.mark.parametrize("chunk_size", [0, -4, 4.0, True, "4", None])
def test_grouped_ssd_checks_chunk_size_with_the_references_rule(chunk_size):
    # one rule, ssd_reference.check_chunk_size, where ssd_grouped kept a copy of its lines: each entry point
    # refuses what ssd_chunked refuses, with its error, under the entry point's name
    x, dt, A, B, C, D, s0 = (t.detach() for t in _inputs(2, 8, 3, 4, 5))
    assert ssd_grouped.check_chunk_size is ssd_reference.check_chunk_size
    with pytest.raises((TypeError, ValueError)) as ref:
        ssd_reference.ssd_chunked(x, dt, A, B[:, :, None], C[:, :, None], chunk_size, D=D, initial_state=s0)
    for name, call in (("ssd_grouped", lambda: ssd_grouped.ssd_grouped(x, dt, A, B, C, chunk_size, D, s0)),
                       ("forward", lambda: ssd_grouped.forward(x, dt, A, B, C, chunk_size, D, s0)),
                       ("forward_triton", lambda: ssd_grouped.forward_triton(x, dt, A, B, C, chunk_size, D, s0)),
                       ("ssd_grouped with use_triton",
                        lambda: ssd_grouped.backward_triton(None, None, x, *[None] * 11, chunk_size))):
        with pytest.raises(ref.type) as e:
            call()
        assert str(e.value) == f"{name}: {ref.value}"


def test_backward_and_state_passing_refuse_shapes_that_would_broadcast():
    # a dy of batch 1 was broadcast against every row (each row's gradients from row 0's dy); an initial
    # state of batch 1 was carried into every row
    x, dt, A, B, C, D, s0 = (t.detach() for t in _inputs(2, 6, 3, 4, 5))
    y, final, *saved = ssd_grouped.forward(x, dt, A, B, C, 4, D, s0)
    args = (x, dt, A, B, C, D, s0, *saved, 4)
    for dy, dfinal, message in [(torch.ones(1, 6, 3, 4), None, "dy (1, 6, 3, 4): want (2, 6, 3, 4)"),
                                (torch.ones(6, 3, 4), None, "dy (6, 3, 4): want (2, 6, 3, 4)"),
                                (torch.ones_like(y), torch.ones(1, 3, 4, 5), "dfinal (1, 3, 4, 5): want (2, 3, 4, 5)")]:
        with pytest.raises(ValueError) as e:
            ssd_grouped.backward(dy, dfinal, *args)
        assert str(e.value) == f"backward: {message} for x (2, 6, 3, 4) (b, l, h, p)"
    # valid gradients: the autograd ones of the reference
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    xr, dtr, Ar, Br, Cr, Dr, sr = inputs
    y_ref, f_ref = ssd_reference.ssd_chunked(xr, dtr, Ar, Br[:, :, None], Cr[:, :, None], 4, D=Dr, initial_state=sr)
    dy, dfinal = torch.ones_like(y), torch.ones_like(final)
    want = torch.autograd.grad((y_ref * dy).sum() + (f_ref * dfinal).sum(), inputs)
    for got, ref in zip(ssd_grouped.backward(dy, dfinal, *args), want):
        assert (got - ref).abs().max() <= 1e-11 * max(1.0, ref.abs().max().item())
    states, a_end = torch.randn(2, 3, 12, 5, dtype=torch.float64), -torch.rand(2, 3, 3, dtype=torch.float64)
    for a, init in ((a_end[:1], None), (a_end, torch.ones(1, 12, 5, dtype=torch.float64))):
        with pytest.raises(ValueError) as e:
            ssd_grouped.state_passing(states, a, init)
        got = None if init is None else tuple(init.shape)
        assert str(e.value) == (f"state_passing: a_end {tuple(a.shape)}, initial {got}: want (2, 3, h) and (2, 12, 5) "
                                "for states (2, 3, 12, 5)")
    S_prev, last = ssd_grouped.state_passing(states, a_end)
    assert torch.equal(S_prev[:, 0], torch.zeros(2, 12, 5, dtype=torch.float64))
    decay = torch.exp(a_end).repeat_interleave(4, dim=-1)[..., None]
    assert torch.equal(S_prev[:, 1], states[:, 0])
    assert torch.equal(S_prev[:, 2], decay[:, 1] * states[:, 0] + states[:, 1])
    assert torch.equal(last, decay[:, 2] * S_prev[:, 2] + states[:, 2])
