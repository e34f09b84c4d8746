"""Time ssd_grouped.ssd_grouped (cuBLAS state products + fused Triton kernels) against mamba-ssm's
mamba_chunk_scan_combined, forward and forward + backward, GPU only; then the profile's top kernels.

Issue 15's shape by default: b 16, L 2650, H 32, P 64, N 512, ngroups 1, chunk 256, bf16 x/B/C, fp32
dt (after softplus), A, D, an initial state.

    python bench_ssd_grouped.py            # times and differences against mamba-ssm
    python bench_ssd_grouped.py --profile  # also the kernels of one forward + backward
    python bench_ssd_grouped.py --check    # errors of both paths against ssd_reference in float64
    python bench_ssd_grouped.py --sweep diag    # block rows, warps and stages of the (Q, Q) kernels
    python bench_ssd_grouped.py --sweep diag --sweep-rows 16,32 --sweep-warps 1,2  # other block rows and warps
    python bench_ssd_grouped.py --sweep diag --sweep-rows 32 --sweep-warps 1 --maxnreg 128,168  # registers capped
    python bench_ssd_grouped.py --sweep states  # tiles, warps and stages of the chunk-state + scan kernels
    python bench_ssd_grouped.py --sweep copy    # rows per program and warps of the B / C row copy
    python bench_ssd_grouped.py --sweep dg      # tiles, warps and stages of dG's products (dB, dC)
    python bench_ssd_grouped.py --sweep conv    # channels, warps and positions per program of the Triton conv
    python bench_ssd_grouped.py --sweep norm    # rows per block, warps and programs per SM of the RMSNorms
    python bench_ssd_grouped.py --conv     # the training pass's conv + SiLU, per layer: causal-conv1d and Triton
    python bench_ssd_grouped.py --norm     # the training pass's RMSNorms, per layer: mamba-ssm's and gpu_kernels.py's
    python bench_ssd_grouped.py --gelu-dropout  # the feed-forward's GELU + dropout, per layer: torch's and ours
    python bench_ssd_grouped.py --sweep gelu_dropout  # rows of eight per program and warps of that kernel
    python bench_ssd_grouped.py --registers  # registers per thread of the Triton kernels (no GPU needed)
"""
import argparse
import functools
import os
import re
import subprocess
import tempfile

import torch
import torch.nn.functional as F

import data as datamod
import ssd_grouped
import ssd_reference
from bench import comma_list, cuda_time


def cuda_ms(fn, iters=20, queued=False):
    """Median ms of fn() on the GPU (CUDA events), after 3 warm-up calls; queued: bench.cuda_time's."""
    return cuda_time(fn, iters, warmup=3, queued=queued)


def inputs(b, l, h, p, n, dtype, seed=0):
    """x (b, l, h, p), dt (b, l, h) fp32 after softplus, A (h,), B and C (b, l, n) in dtype (ngroups 1),
    D (h,) and an initial state (b, h, p, n) fp32, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = r(b, l, h, p).to(dtype)
    dt = torch.nn.functional.softplus(r(b, l, h) - 3.0)                  # ~ mamba's dt init range
    A = -torch.exp(torch.rand(h, device="cuda", generator=g) * 2.77)    # -[1, 16]
    B = (r(b, l, n) / n ** 0.5).to(dtype)
    C = (r(b, l, n) / n ** 0.5).to(dtype)
    D = r(h)
    s0 = r(b, h, p, n) * 0.1
    return x, dt, A, B, C, D, s0


def main():
    ap = datamod.ArgumentParser(prog="bench_ssd_grouped.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=datamod.positive_int, default=16)
    ap.add_argument("--length", type=datamod.positive_int, default=2650)
    ap.add_argument("--dstate", type=datamod.positive_int, default=512)
    ap.add_argument("--chunk", type=datamod.positive_int, default=256, help="a power of two, at least 16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", choices=("diag", "states", "copy", "dg", "conv", "norm", "gelu_dropout"),
                    help="launch shapes of the (Q, Q) kernels, of the chunk-state + scan kernels, of the B / C row "
                    "copy, of dG's products, of the Triton conv, of the RMSNorms or of the GELU + dropout")
    ap.add_argument("--seeds", type=datamod.positive_int, default=1, help="--check: this many input sets")
    ap.add_argument("--sweep-rows", type=comma_list(datamod.positive_int), default="32,64,128",
                    help="--sweep diag: block rows BM to try")
    ap.add_argument("--sweep-warps", type=comma_list(datamod.positive_int), default="4,8",
                    help="--sweep diag: warps per program to try (below 4, Triton's products leave Hopper's "
                    "warpgroup instructions and a warp holds more of a tile)")
    ap.add_argument("--maxnreg", type=comma_list(datamod.positive_int), help="--sweep: cap the registers per "
                    "thread at this (Triton's maxnreg), so that more programs fit on an SM; several, comma-separated: "
                    "the sweep once per cap")
    ap.add_argument("--conv", action="store_true", help="time the conv + SiLU of the training pass instead")
    ap.add_argument("--norm", action="store_true", help="time the RMSNorms of the training pass instead")
    ap.add_argument("--gelu-dropout", action="store_true", help="time the feed-forward's GELU + dropout instead")
    ap.add_argument("--registers", action="store_true", help="compile the Triton kernels for sm_90 and sm_80 "
                    "here (Triton's own ptxas, no GPU) and print their registers, spill stack and programs per SM")
    a = ap.parse_args()
    if a.chunk < 16 or a.chunk & (a.chunk - 1):
        ap.error(f"argument --chunk: expected a power of two of at least 16, not {a.chunk}")
    if a.registers:
        return registers(a.length, a.dstate, a.chunk)
    if not torch.cuda.is_available():
        datamod.fail("bench_ssd_grouped.py: needs a CUDA GPU (--registers alone runs without one)")
    if a.conv:
        return conv(a.batch, a.length, a.dstate)
    if a.norm:
        return norm(a.batch, a.length)
    if a.gelu_dropout:
        return gelu_dropout(a.batch, a.length)
    if a.check:
        return check(a.length, a.dstate, a.chunk, seeds=a.seeds)
    if a.sweep:
        fn = {"diag": sweep, "states": sweep_states, "copy": sweep_copy, "dg": sweep_dg, "conv": sweep_conv,
              "norm": sweep_norm, "gelu_dropout": sweep_gelu_dropout}[a.sweep]
        extra = dict(rows=a.sweep_rows, warps=a.sweep_warps) if a.sweep == "diag" else {}
        for cap in a.maxnreg or [None]:
            if a.maxnreg:
                print(f"maxnreg {cap}:", flush=True)
            fn(a.batch, a.length, a.dstate, a.chunk, maxnreg=cap, **extra)
        return
    b, l, h, p, n, Q = a.batch, a.length, 32, 64, a.dstate, a.chunk
    x, dt, A, B, C, D, s0 = inputs(b, l, h, p, n, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    g = torch.Generator(device="cuda").manual_seed(1)
    dy = torch.randn(b, l, h, p, device="cuda", generator=g).to(torch.bfloat16)
    dfinal = torch.randn(b, h, p, n, device="cuda", generator=g) * 0.1
    fwd_flops = b * l * (Q * n + Q * h * p + 4 * n * h * p)
    print(f"b {b} L {l} H {h} P {p} N {n} chunk {Q}")

    def mamba(x, dt, A, B, C, D, s0):
        return _mamba(x, dt, A, B, C, Q, D, s0)

    def grouped(x, dt, A, B, C, D, s0):
        return ssd_grouped.ssd_grouped(x, dt, A, B, C, Q, D, s0, use_triton=True)

    results = {}
    for name, fn in (("grouped", grouped), ("mamba-ssm", mamba)):
        try:
            with torch.no_grad():
                ms_f = cuda_ms(lambda: fn(*leaves))

            def fwd_bwd():  # the gradients given as they come, so that no extra pass is timed
                y, f = fn(*leaves)
                return torch.autograd.grad((y, f), leaves, (dy, dfinal))
            ms_fb = cuda_ms(fwd_bwd, iters=10)
            torch.cuda.reset_peak_memory_stats()
            y, f = fn(*leaves)
            grads = torch.autograd.grad((y, f), leaves, (dy, dfinal))
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
        except Exception as e:  # report, keep going
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        # kept on the host, so that the next path's peak counts its own tensors only
        results[name] = (y.detach().cpu(), f.detach().cpu(), [g.cpu() for g in grads])
        del y, f, grads
        print(f"{name}: forward {ms_f:.3f} ms ({fwd_flops / ms_f / 1e9:.0f} TFLOP/s), forward + backward "
              f"{ms_fb:.3f} ms ({3 * fwd_flops / ms_fb / 1e9:.0f} TFLOP/s), peak {peak:.1f} GiB")
    if len(results) == 2:
        (y0, f0, g0), (y1, f1, g1) = results["mamba-ssm"], results["grouped"]
        rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731
        print(f"grouped vs mamba-ssm, relative: y {rel(y1, y0):.2e}, final state {rel(f1, f0):.2e}, " +
              ", ".join(f"d{nm} {rel(a, r):.2e}" for nm, a, r in zip("x dt A B C D s0".split(), g1, g0)))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y, f = grouped(*leaves)
            torch.autograd.grad((y, f), leaves, (dy, dfinal))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=80))


def _mamba(x, dt, A, B, C, Q, D, s0):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined(x, dt, A, B[:, :, None], C[:, :, None], Q, D=D, initial_states=s0,
                                     return_final_states=True)


def errors(l, n, Q, b=2, h=32, p=64, pad=300, seed=0):
    """Each path against ssd_chunked in float64 on the same bf16 inputs (batch row 1 left-padded:
    x and dt zero on its first `pad` positions): {path: {name: max|got - want| / max|want|}} for the
    output, the final state and every gradient."""
    x, dt, A, B, C, D, s0 = inputs(b, l, h, p, n, torch.bfloat16, seed=seed)
    x[1, :pad] = 0
    dt[1, :pad] = 0
    g = torch.Generator(device="cuda").manual_seed(1 + 1000 * seed)  # seed 0: the inputs of earlier runs
    dy = torch.randn(b, l, h, p, device="cuda", generator=g, dtype=torch.float64)
    dfinal = torch.randn(b, h, p, n, device="cuda", generator=g, dtype=torch.float64) * 0.1
    leaves64 = [t.detach().double().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    x6, dt6, A6, B6, C6, D6, s06 = leaves64
    y, f = ssd_reference.ssd_chunked(x6, dt6, A6, B6[:, :, None], C6[:, :, None], Q, D=D6, initial_state=s06)
    want = [y, f] + list(torch.autograd.grad((y * dy).sum() + (f * dfinal).sum(), leaves64))
    names = ["y", "final"] + ["d" + k for k in "x dt A B C D s0".split()]
    paths = (("grouped", lambda *t: ssd_grouped.ssd_grouped(*t[:5], Q, t[5], t[6], use_triton=True)),
             ("grouped, torch form", lambda *t: ssd_grouped.ssd_grouped(*t[:5], Q, t[5], t[6])),
             ("mamba-ssm", lambda *t: _mamba(*t[:5], Q, t[5], t[6])))
    result = {}
    for name, fn in paths:
        leaves = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
        y, f = fn(*leaves)
        got = [y, f] + list(torch.autograd.grad((y.double() * dy).sum() + (f.double() * dfinal).sum(), leaves))
        result[name] = {nm: ((a.double() - r).abs().max() / r.abs().max()).item() for nm, a, r in zip(names, got, want)}
    return result


def check(l, n, Q, b=2, pad=300, seeds=1):
    """errors() as a table, for each of `seeds` input sets; with more than one, then each path's
    error over mamba-ssm's, the median over the seeds."""
    ratios = {}
    for seed in range(seeds):
        result = errors(l, n, Q, b=b, pad=pad, seed=seed)
        names = list(next(iter(result.values())))
        print(f"seed {seed}: errors against float64, b {b} L {l} N {n} chunk {Q}, row 1 padded on {pad} positions: "
              "max|d| / max|ref|")
        print("| path | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for name, errs in result.items():
            print(f"| {name} | " + " | ".join(f"{errs[k]:.2e}" for k in names) + " |")
            ratios.setdefault(name, []).append([errs[k] / result["mamba-ssm"][k] for k in names])
    if seeds > 1:
        print(f"median over {seeds} seeds of the error over mamba-ssm's:")
        for name, rows in ratios.items():
            med = torch.tensor(rows).median(dim=0).values
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in med.tolist()) + " |")


def _conv_inputs(b, l, n, h=32, p=64):
    """The conv's inputs as the training op has them: xBC (h p + 2 n channels) as the columns of zxbcdt (rows
    2 h p + 2 n + h apart), bf16; fp32 weight (channels, 4) and bias; dout (b, l, channels) bf16; dx_out, the
    same columns of a tensor like zxbcdt; and seq_idx with the first 100 positions left padding."""
    ch = h * p + 2 * n
    g = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(b, l, 2 * h * p + 2 * n + h, device="cuda", generator=g).to(torch.bfloat16)
    xBC, dx_out = zxbcdt[..., h * p:h * p + ch], torch.empty_like(zxbcdt)[..., h * p:h * p + ch]
    weight, bias = torch.randn(ch, 4, device="cuda", generator=g) / 2, torch.randn(ch, device="cuda", generator=g)
    dout = torch.randn(b, l, ch, device="cuda", generator=g).to(torch.bfloat16)
    pad = (torch.arange(l, device="cuda") >= 100).to(torch.int32).expand(b, l).contiguous()
    return xBC, weight, bias, dout, dx_out, pad


def conv(b, l, n, h=32, p=64):
    """The training pass's causal conv + SiLU per layer, forward and backward, without seq_idx and with left
    padding: causal-conv1d's kernels (what kernels.mamba2_train runs) against kernels.causal_conv_silu and
    its backward (Triton), with how far the Triton results are from causal-conv1d's (relative norm)."""
    import gpu_kernels as kernels
    xBC, weight, bias, dout, dx_out, pad = _conv_inputs(b, l, n, h, p)
    rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731

    def causal_conv1d_backward(seq_idx, dx):
        return (dx,) + tuple(kernels._causal_conv_backward(dout, xBC, weight, bias, seq_idx, dx_out=dx))

    paths = (("causal-conv1d", kernels._causal_conv, causal_conv1d_backward),
             ("Triton", kernels.causal_conv_silu,
              lambda seq_idx, dx: kernels.causal_conv_silu_backward(dout, xBC, weight, bias, seq_idx, dx_out=dx)))
    print(f"b {b} L {l} channels {xBC.shape[-1]} width 4; ms per call (median of 20, CUDA events): one call at a "
          "time, and queued behind a GPU sleep (the GPU's time alone, as in a training step, where the host's "
          "launches run ahead)")
    print("| seq_idx | conv | forward | backward | forward + backward | queued: forward | backward "
          "| forward + backward |\n|---|---|---|---|---|---|---|---|")
    for seq_name, seq_idx in (("none", None), ("left padding", pad)):
        outs = {}
        for name, fwd, bwd in paths:
            f1, fq = (cuda_ms(lambda: fwd(xBC, weight, bias, seq_idx), queued=q) for q in (False, True))
            b1, bq = (cuda_ms(lambda: bwd(seq_idx, dx_out), queued=q) for q in (False, True))
            print(f"| {seq_name} | {name} | {f1:.3f} | {b1:.3f} | {f1 + b1:.3f} | {fq:.3f} | {bq:.3f} "
                  f"| {fq + bq:.3f} |", flush=True)
            outs[name] = (fwd(xBC, weight, bias, seq_idx),) + tuple(t.clone() for t in bwd(seq_idx, dx_out.clone()))
        print("Triton against causal-conv1d, relative: " + ", ".join(
            f"{k} {rel(a, r):.2e}" for k, a, r in zip(("out", "dx", "dweight", "dbias"), outs["Triton"],
                                                      outs["causal-conv1d"])), flush=True)


def norm(b, l, d_model=1024, d_inner=2048, width=5152):
    """The training pass's RMSNorms per layer, forward and backward, (b l) rows: a block's residual add + norm
    (h bf16 on an fp32 residual, d_model wide; the backward with the residual stream's own gradient) and
    Mamba-2's gated norm (y bf16, z the first d_inner columns of a zxbcdt-wide bf16 tensor, dz written into
    another's; the backward writes the output again, as mamba2_train's). mamba-ssm's Triton kernels (what
    mamba-ssm's paths run) against kernels.rms_norm_fwd / rms_norm_bwd, with the largest difference of any
    output or gradient relative to the largest value of mamba-ssm's. Then the add + norm with h's dropout
    (rate 0.3, as FastLM trains): torch's dropout before the op against the op's own (its mask drawn from a
    seed, kept for the backward instead of a one-byte mask); the masks differ, so no difference is shown."""
    import gpu_kernels as kernels
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_bwd, _layer_norm_fwd
    M, eps = b * l, 1e-5
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    h = r(M, d_model).requires_grad_()
    res = r(M, d_model, dtype=torch.float32).requires_grad_()
    w = (1 + r(d_model, dtype=torch.float32) / 8).requires_grad_()
    d_normed, d_sum = r(M, d_model), r(M, d_model, dtype=torch.float32)
    y, zx, w_g, dout = r(M, d_inner), r(M, width), 1 + r(d_inner, dtype=torch.float32) / 8, r(M, d_inner)
    z, dz = zx[:, :d_inner], torch.empty_like(zx)[:, :d_inner]
    normed = torch.empty(M, d_inner, device="cuda", dtype=torch.bfloat16)

    def add_norm(fn):
        def run():
            h.grad = res.grad = w.grad = None
            out = fn()
            torch.autograd.backward(out, (d_normed, d_sum))
            return out + (h.grad, res.grad, w.grad)
        return run

    def mamba_gated():
        out, _, rstd = _layer_norm_fwd(y, w_g, None, eps, z, group_size=d_inner, norm_before_gate=False,
                                       is_rms_norm=True)
        dy, dw, *_ = _layer_norm_bwd(dout, y, w_g, None, eps, None, rstd, z, group_size=d_inner,
                                     norm_before_gate=False, is_rms_norm=True, recompute_output=True, dz=dz, out=normed)
        return out, dy, dz.clone(), dw, normed.clone()

    def triton_gated():
        out, _, rstd = kernels.rms_norm_fwd(y, w_g, eps, z=z)
        dy, _, _, dw = kernels.rms_norm_bwd(dout, y, w_g, rstd, z=z, dz_out=dz, out=normed)
        return out, dy, dz.clone(), dw, normed.clone()

    cases = {"add + norm": (add_norm(lambda: layer_norm_fn(h, w, None, residual=res, eps=eps, prenorm=True,
                                                           residual_in_fp32=True, is_rms_norm=True)),
                            add_norm(lambda: kernels._add_rms_norm_fwd(h, res, w, eps, 0.0)[:2])),
             "gated norm": (mamba_gated, triton_gated),
             "add + dropout + norm (torch's dropout, then the op)": (
                 add_norm(lambda: kernels.add_rms_norm(F.dropout(h, 0.3), res, w, eps)),
                 add_norm(lambda: kernels.add_rms_norm(h, res, w, eps, 0.3, True)))}
    print(f"{M} rows; add + norm {d_model} wide, gated norm {d_inner}; ms per forward + backward (median of 20)")
    print("| norm | mamba-ssm | gpu_kernels.py | largest difference, relative |\n|---|---|---|---|")
    for name, (theirs, ours) in cases.items():
        diff = "masks differ" if "dropout" in name else "{:.2e}".format(max(
            (a.float() - t.float()).abs().max().item() / t.float().abs().max().item()
            for a, t in zip(ours(), theirs())))
        print(f"| {name} | {cuda_ms(theirs):.3f} | {cuda_ms(ours):.3f} | {diff} |", flush=True)


def _gelu_dropout_inputs(b, l, d_ff):
    """fc1's output a ((b l), d_ff) bf16, requiring grad, and the gradient dy of the dropout's output."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(b * l, d_ff, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    return a, torch.randn(b * l, d_ff, device="cuda", generator=g).to(torch.bfloat16)


def _forward_backward(a, dy, fn):
    def run():
        a.grad = None
        torch.autograd.backward(fn(a), dy)
    return run


def gelu_dropout(b, l, d_ff=2048, p=0.3, rounds=3):
    """The feed-forward's GELU + dropout per layer, forward + backward on (b l) rows of fc1's bf16 output:
    torch's eager ops (GELU, dropout, their backwards: four kernels, a one-byte mask kept) against
    kernels.gelu_dropout (one kernel each way, the mask drawn again from a seed), in interleaved rounds,
    the GPU's time alone (cuda_time's queued: not the custom op's Python dispatch between launches);
    then each forward alone; then the kernel's kept share and the largest difference of a kept value from
    float64 gelu(a) / (1 - p), relative to max(|value|, 1), beside torch's fp32 GELU rounded to bf16."""
    import torch.nn.functional as F
    import gpu_kernels as kernels
    a, dy = _gelu_dropout_inputs(b, l, d_ff)
    plain = _forward_backward(a, dy, lambda t: F.dropout(F.gelu(t), p, True))
    fused = _forward_backward(a, dy, lambda t: kernels.gelu_dropout(t, p, True))
    bytes_plain, bytes_fused = a.numel() * 20, a.numel() * 10  # bytes per element moved, both ways together
    print(f"{a.shape[0]} rows x {d_ff}, p {p}; ms per forward + backward (median of 20, GPU time), and the bytes "
          "that moves")
    for i in range(rounds):
        tp, tf = cuda_ms(plain, queued=True), cuda_ms(fused, queued=True)
        print(f"round {i}: torch {tp:.3f} ms ({bytes_plain / tp / 1e9:.2f} TB/s), kernels {tf:.3f} ms "
              f"({bytes_fused / tf / 1e9:.2f} TB/s)", flush=True)
    x = a.detach()
    print(f"forward alone: torch {cuda_ms(lambda: F.dropout(F.gelu(x), p, True), queued=True):.3f} ms, "
          f"kernels {cuda_ms(lambda: kernels.gelu_dropout(x, p, True), queued=True):.3f} ms")
    y = kernels.gelu_dropout(x, p, True)
    kept = y != 0
    ref = F.gelu(x.double())[kept] / (1 - p)
    err = lambda got: ((got.double() - ref).abs() / ref.abs().clamp_min(1)).max().item()  # noqa: E731
    print(f"kept {kept.float().mean().item():.5f} (1 - p = {1 - p}); largest difference of a kept value: "
          f"kernels {err(y[kept]):.2e}, torch's GELU {err((F.gelu(x.float())[kept] / (1 - p)).bfloat16()):.2e}")


def sweep_gelu_dropout(b, l, n, Q, d_ff=2048, p=0.3, maxnreg=None):
    """ms of kernels.gelu_dropout forward + backward per launch shape (rows of eight elements per program,
    warps), on gelu_dropout()'s inputs. The mask depends on the seed and the row alone, not on the shape."""
    import itertools
    import gpu_kernels as kernels
    a, dy = _gelu_dropout_inputs(b, l, d_ff)
    extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
    run = _forward_backward(a, dy, lambda t: kernels.gelu_dropout(t, p, True))
    for rows, warps in itertools.product((64, 128, 256, 512, 1024), (2, 4, 8)):
        kernels._GELU_DROPOUT = dict(BQ=rows, num_warps=warps, **extra)
        print(f"rows {rows} warps {warps}: {cuda_ms(run, queued=True):.3f} ms", flush=True)


def sweep_conv(b, l, n, Q, h=32, p=64, maxnreg=None):
    """ms of the Triton conv's forward and backward kernels per launch shape (channels per program, warps,
    positions per segment, the next rows' loads issued early or not), without seq_idx and with left padding
    (training's case with a text mask), as kernels.causal_conv_silu(_backward) launch them."""
    import itertools
    import gpu_kernels as kernels
    xBC, weight, bias, dout, dx_out, pad = _conv_inputs(b, l, n, h, p)
    ch = xBC.shape[-1]
    out = torch.empty(b, l, ch, device="cuda", dtype=xBC.dtype)
    for bc, warps, seg, prefetch in itertools.product((64, 128, 256), (1, 2, 4), (64, 128, 256), (False, True)):
        if bc < 32 * warps:
            continue
        kw = dict(BC=bc, num_warps=warps, PREFETCH=prefetch, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        segs = -(-l // seg)
        grid = (-(-ch // bc), segs, b)
        parts = torch.empty(b * segs, 5 * ch, device="cuda")
        calls = {}
        for name, seq in (("", None), (" padded", pad)):
            calls["fwd" + name] = functools.partial(
                kernels._conv_fwd_kernel[grid], xBC, xBC.stride(0), xBC.stride(1), weight, bias,
                xBC if seq is None else seq, out, out.stride(0), out.stride(1), l, l, ch, seg, HAS_SEQ=seq is not None,
                **kw)
            calls["bwd" + name] = functools.partial(
                kernels._conv_bwd_kernel[grid], xBC, xBC.stride(0), xBC.stride(1), weight, bias,
                xBC if seq is None else seq, dout, dout.stride(0), dout.stride(1), dx_out, dx_out.stride(0),
                dx_out.stride(1), parts, l, ch, seg, HAS_SEQ=seq is not None, **kw)
        print(f"BC {bc} warps {warps} SEG {seg} prefetch {int(prefetch)}: {_time_calls(calls)} ms", flush=True)


def sweep_norm(b, l, n, Q, d_model=1024, d_inner=2048, width=5152, maxnreg=None):
    """ms of kernels.rms_norm_fwd and rms_norm_bwd per launch shape (elements per row block, warps, and for
    the backward programs per SM), on the training pass's two norms, as norm() calls them: the blocks' add +
    norm (d_model wide, fp32 sum) and Mamba-2's gated norm (d_inner wide, z and dz in zxbcdt-wide tensors)."""
    import itertools
    import gpu_kernels as kernels
    M, eps = b * l, 1e-5
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    h, res, w = r(M, d_model), r(M, d_model, dtype=torch.float32), 1 + r(d_model, dtype=torch.float32) / 8
    dn, dsum = r(M, d_model), r(M, d_model, dtype=torch.float32)
    y, zx, w_g, dout = r(M, d_inner), r(M, width), 1 + r(d_inner, dtype=torch.float32) / 8, r(M, d_inner)
    z, dz = zx[:, :d_inner], torch.empty_like(zx)[:, :d_inner]
    normed = torch.empty(M, d_inner, device="cuda", dtype=torch.bfloat16)
    summed, rstd = kernels.rms_norm_fwd(h, w, eps, residual=res)[1:]
    rstd_g = kernels.rms_norm_fwd(y, w_g, eps, z=z)[2]
    extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
    for elems, warps in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
        kernels._NORM_FWD = dict(ELEMS=elems, num_warps=warps, **extra)
        calls = {"add fwd": lambda: kernels.rms_norm_fwd(h, w, eps, residual=res),
                 "gated fwd": lambda: kernels.rms_norm_fwd(y, w_g, eps, z=z)}
        print(f"forward ELEMS {elems} warps {warps}: {_time_calls(calls)} ms", flush=True)
    for elems, warps, per_sm in itertools.product((1024, 2048, 4096), (4, 8, 16), (1, 2, 3, 4, 8)):
        kernels._NORM_BWD = dict(ELEMS=elems, num_warps=warps, PER_SM=per_sm, **extra)
        calls = {"add bwd": lambda: kernels.rms_norm_bwd(dn, summed, w, rstd, dsum=dsum, dx_dtype=torch.bfloat16,
                                                         dx32=True),
                 "gated bwd": lambda: kernels.rms_norm_bwd(dout, y, w_g, rstd_g, z=z, dz_out=dz, out=normed)}
        print(f"backward ELEMS {elems} warps {warps} PER_SM {per_sm}: {_time_calls(calls)} ms", flush=True)


def _time_calls(calls):
    """"name ms, ..." for {name: fn}; a launch shape that does not fit (shared memory, registers) is
    reported as failed, and the sweep goes on."""
    times = []
    for name, fn in calls.items():
        try:
            times.append(f"{name} {cuda_ms(fn):.3f}")
        except Exception as e:  # out of shared memory or registers: report, keep going
            times.append(f"{name} failed ({type(e).__name__})")
    return ", ".join(times)


# The kernels as forward_triton and backward_triton launch them (_launches: the TMA descriptors' tiles, and
# (kernel, constexprs, num_warps, num_stages) per kernel).
# Pointer arguments are bf16 where the training op passes bf16 (x, B, C, dy and what is made from them), else
# fp32.
_BF16_ARGS = {"x_ptr", "x_in", "dy_in", "B_in", "C_in", "dye_in", "dy_ptr", "y_ptr", "dx_ptr", "dye_ptr",
              "xs_ptr", "xs_in", "S_prev_ptr", "dstates_ptr", "dG_ptr", "src_ptr", "dst_ptr", "dxs_ptr", "M_ptr",
              "out_ptr"}


def _launches(n, Q, tma):
    sg = ssd_grouped
    diag = dict(Q=Q, BM=min(64, Q), BP=64, PREC="tf32")
    st_f, st_b = (sg._states_launch(n, Q, backward, tma) for backward in (False, True))
    fl, gl = sg._diag_fwd_launch(Q), sg._diag_bwd_G_launch(Q)
    nums = lambda st: dict(BN=st["BN"], BK=st["BK"], TMA=st["TMA"])  # noqa: E731
    # with TMA, the descriptors' tiles as forward_triton and backward_triton make them (_descriptor)
    # (x_in's and dy_in's: (1, BM, 1, 64) with each kernel's BM)
    descs = {"xs_in": (1, st_f["BK"], 1, 64),
             "B_in": (1, st_f["BK"], st_f["BN"]),
             "dye_in": (st_b["BK"], 1, 64), "C_in": (1, st_b["BK"], st_b["BN"])} if tma else {}
    opts = lambda launch: {k: launch[k] for k in ("num_warps", "num_stages", "maxnreg") if k in launch}  # noqa: E731
    plain = lambda warps, stages: dict(num_warps=warps, num_stages=stages)  # noqa: E731
    return descs, [
        (sg._prep_kernel, dict(Q=Q, BP=64), plain(8, 3)),
        (sg._states_fwd_kernel, dict(Q=Q, BP=64, **nums(st_f), HAS_INIT=False, PREC="tf32"), opts(st_f)),
        (sg._diag_fwd_kernel, dict(diag, HAS_D=True, BM=fl["BM"]), opts(fl)),
        (sg._dy_kernel, dict(Q=Q, BM=diag["BM"], BP=64, BH=32), plain(4, 3)),
        (sg._states_bwd_kernel, dict(Q=Q, BP=64, **nums(st_b), HAS_DFINAL=False, PREC="tf32"), opts(st_b)),
        (sg._diag_bwd_x_kernel, dict(diag, HAS_D=True, TMA=tma), plain(4, 1)),
        (sg._diag_bwd_G_kernel, dict(diag, TMA=tma, BM=gl["BM"]), opts(gl)),
        (sg._dG_product_kernel, dict(TRANS=True, Q=Q, BM=diag["BM"], BN=128, BK=64, PREC="tf32"), plain(4, 3)),
        (sg._dacum_kernel, dict(Q=Q, NB=Q // gl["BM"], BH=32, BNT=4, HAS_D=True), plain(8, 3)),
        (sg._chunk_sums_kernel, dict(BR=64, BH=32, HAS_D=True), plain(4, 3)),
        (sg._copy_rows_kernel, dict(BL=8, BN=512), plain(4, 3))]


def registers(l, n, Q):
    """Per Triton kernel of the grouped SSD, compiled for sm_90 and sm_80 on this machine: registers per
    thread, the stack that spilled registers take (bytes per thread), shared memory, and how many programs
    fit on one SM by registers (65536 per SM), shared memory (227 / 163 KB) and warps (64). The integer
    arguments get the JIT's divisibility-by-16 marks as at issue 15's shape (x, B, C as columns of the
    conv's output)."""
    if ssd_grouped.triton is None:
        datamod.fail("bench_ssd_grouped.py --registers: needs Triton (pip install triton; no GPU needed)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    rows = -(-l // Q) * Q  # the conv's output, padded to whole chunks: x, B and C's sequences rows * 3072 apart
    values = dict(L=l, NC=-(-l // Q), H=32, P=64, N=n, SX=3072, SDX=3072, SB=3072, SC=3072, NNT=4,
                  SXB=rows * 3072, SBB=rows * 3072, SCB=rows * 3072, SMB=rows * 3072,
                  SB_SRC=l * 3072, L_DST=rows, R=16 * -(-l // Q), S_SRC=3072, S_DST=n, SM=3072, SO=3072)
    print("| kernel | arch | warps | registers | spill stack B | shared KB | programs per SM |")
    print("|---|---|---|---|---|---|---|")
    for arch, smem in ((90, 227 * 1024), (80, 163 * 1024)):
        descs, launches = _launches(n, Q, tma=arch >= 90)
        for fn, consts, options in launches:
            if arch >= 90 and "x_in" in fn.arg_names:
                descs = dict(descs, x_in=(1, consts["BM"], 1, 64), dy_in=(1, consts["BM"], 1, 64))
            bf16 = _BF16_ARGS | ({"G_ptr"} if fn is ssd_grouped._diag_fwd_kernel else set())  # G in x's dtype
            sig = {a: "constexpr" if a in consts else "i32" if a in values else
                   f"tensordesc<bf16[{','.join(map(str, descs[a]))}]>" if a in descs else
                   "*bf16" if a in bf16 else "*fp32" for a in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                     if a not in consts and a not in descs and (a not in values or values[a] % 16 == 0)}
            c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)
            warps = options["num_warps"]
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(c.asm["cubin"])
                f.flush()
                usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                                       text=True).stdout
            regs, stack = (int(re.search(k + r":(\d+)", usage).group(1)) for k in ("REG", "STACK"))
            per_warp = -(-regs * 32 // 256) * 256                  # registers are given to warps in 256s
            fit = min(65536 // (per_warp * warps), smem // max(c.metadata.shared, 1), 64 // warps)
            kb = c.metadata.shared / 1024
            print(f"| {fn.__name__} | sm_{arch} | {warps} | {regs} | {stack} | {kb:.0f} | {fit} |", flush=True)


def sweep(b, l, n, Q, h=32, p=64, maxnreg=None, rows=(32, 64, 128), warps=(4, 8)):
    """ms of _diag_fwd_kernel, _diag_bwd_x_kernel and _diag_bwd_G_kernel per launch shape (block rows in
    rows, warps per program in warps, 1-3 stages), the last two with their tiles loaded through TMA
    descriptors (Hopper on) and through pointers."""
    import itertools
    x, dt, A, B, C, D, s0 = inputs(b, l, h, p, n, torch.bfloat16)
    c = -(-l // Q)
    g = torch.Generator(device="cuda").manual_seed(2)
    G = torch.randn(b, c, Q, Q, device="cuda", generator=g)
    G_x = G.to(x.dtype)  # the forward's kernel reads G in x's dtype (forward_triton)
    acum = torch.cumsum(dt.new_zeros(b, c, h, Q) - 0.01, dim=3)       # (b, c, h, Q), as forward_triton's
    dtc = torch.nn.functional.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h).transpose(2, 3).contiguous()
    yoff = torch.randn(b, c, Q, h * p, device="cuda", generator=g)
    dxs = yoff.to(torch.bfloat16)
    dy = torch.randn(b, l, h, p, device="cuda", generator=g).to(torch.bfloat16)
    y = torch.empty_like(x)
    small = lambda: torch.empty(b, c, h, Q, device="cuda")  # noqa: E731
    sg = ssd_grouped
    tmas = (True, False) if sg._has_tma(x.device) else (False,)
    for tma, bm, n_warps, stages in itertools.product(tmas, rows, warps, (1, 2, 3)):
        kw = dict(Q=Q, BM=bm, BP=p, PREC="tf32", num_warps=n_warps, num_stages=stages,
                  **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        nb = Q // bm
        row = torch.zeros(b, c, h, nb, Q, device="cuda")
        dG = torch.empty(b, c, Q, Q, device="cuda")
        x_in, dy_in = sg._tiles(tma, x, (1, bm, 1, p)), sg._tiles(tma, dy, (1, bm, 1, p))
        ddt, t, dD = small(), small(), small()  # made here, so that no allocation is timed
        calls = {
            "bwd_G": lambda: sg._diag_bwd_G_kernel[(nb, nb, b * c)](G, acum, x_in, dtc, dy_in, dG, row, l, c, h, p,
                                                                     h * p, l * h * p, TMA=tma, **kw),
            "bwd_x": lambda: sg._diag_bwd_x_kernel[(h, nb, b * c)](G, acum, x_in, dtc, dy_in, dxs, D, y, ddt, t, dD,
                                                                    l, c, h, p, h * p, l * h * p, h * p, HAS_D=True,
                                                                    TMA=tma,
                                                                    **kw)}
        if not tma:
            calls["fwd"] = lambda: sg._diag_fwd_kernel[(h, nb, b * c)](G_x, acum, x, dtc, yoff, D, y, l, c, h, p, h * p,
                                                                         l * h * p, HAS_D=True, **kw)
        print(f"TMA {tma} BM {bm} warps {n_warps} stages {stages}: {_time_calls(calls)} ms", flush=True)


def sweep_states(b, l, n, Q, h=32, p=64, maxnreg=None):
    """ms of _states_fwd_kernel and _states_bwd_kernel per tile (BN state columns, BK positions), warps
    and stages, with their tiles loaded through TMA descriptors (Hopper on) and through pointers."""
    import itertools
    x, dt, A, B, C, D, s0 = inputs(b, l, h, p, n, torch.bfloat16)
    c = -(-l // Q)
    g = torch.Generator(device="cuda").manual_seed(2)
    acum = torch.cumsum(dt.new_zeros(b, c, h, Q) - 0.01, dim=3)       # (b, c, h, Q), as forward_triton's
    xs = torch.randn(b, c * Q, h, p, device="cuda", generator=g).to(torch.bfloat16)
    S_prev = torch.empty(b, c, h * p, n, device="cuda", dtype=torch.bfloat16)
    dstates = torch.empty_like(S_prev)
    dy_e = torch.randn(b, c, Q, h * p, device="cuda", generator=g).to(torch.bfloat16)
    final, d_init = torch.empty(b, h * p, n, device="cuda"), torch.empty(b, h * p, n, device="cuda")
    sg = ssd_grouped
    tmas = (True, False) if sg._has_tma(x.device) else (False,)
    for tma, bn, bk, warps, stages in itertools.product(tmas, (64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4)):
        kw = dict(Q=Q, BP=p, BN=bn, BK=bk, TMA=tma, PREC="tf32", num_warps=warps, num_stages=stages,
                  **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        nnt = -(-n // bn)
        da_part = torch.empty(b, c, h, nnt, device="cuda")
        xs_in, B_in, dye_in, C_in = xs, B, dy_e, C
        if tma:
            xs_in, B_in = sg._descriptor(xs, (1, bk, 1, p)), sg._descriptor(B, (1, bk, bn))
            dye_in, C_in = sg._descriptor(dy_e.view(b * c * Q, h, p), (bk, 1, p)), sg._descriptor(C, (1, bk, bn))
        calls = {
            "fwd": lambda: sg._states_fwd_kernel[(nnt, h, b)](xs_in, acum, B_in, s0, S_prev, final, l, c, h, p, n, n,
                                                               l * n, HAS_INIT=True, **kw),
            "bwd": lambda: sg._states_bwd_kernel[(nnt, h, b)](dye_in, C_in, S_prev, acum, s0, dstates, d_init,
                                                               da_part, l, c, h, p, n, n, l * n, nnt, HAS_DFINAL=True,
                                                               **kw)}
        print(f"TMA {tma} BN {bn} BK {bk} warps {warps} stages {stages}: {_time_calls(calls)} ms", flush=True)


def sweep_copy(b, l, n, Q, h=32, p=64, maxnreg=None):
    """ms of _copy_rows_kernel per rows per program and warps, as _chunked_rows runs it for B and C when l is
    not a whole number of chunks: bf16 (b, l, n), dense and as the columns of the conv's output (rows
    h p + 2 n apart), into (b, c*Q, n) with zeros past l; with the GB/s of the bytes it must move."""
    import itertools
    c = -(-l // Q)
    dst = torch.empty(b, c * Q, n, device="cuda", dtype=torch.bfloat16)
    wide = torch.randn(b, l, h * p + 2 * n, device="cuda").to(torch.bfloat16)
    srcs = {"dense": torch.randn(b, l, n, device="cuda").to(torch.bfloat16),
            "columns": wide[..., h * p:h * p + n]}                       # where B lies in the conv's output
    gb = b * (l + c * Q) * n * 2 / 1e9
    bn = ssd_grouped.next_power_of_2(n)
    for (name, src), bl, warps in itertools.product(srcs.items(), (2, 4, 8, 16, 32), (1, 2, 4, 8)):
        kw = dict(BL=bl, BN=bn, num_warps=warps, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        ms = cuda_ms(lambda: ssd_grouped._copy_rows_kernel[(-(-c * Q // bl), b)](src, dst, src.stride(0), c * Q,
                                                                                l, n, src.stride(1), n, **kw))
        print(f"{name} BL {bl} warps {warps}: {ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s", flush=True)


def sweep_dg(b, l, n, Q, h=32, p=64, maxnreg=None):
    """ms of _dG_product_kernel per launch shape (block rows, BN columns, BK positions per product, warps,
    stages), as backward_triton runs it for dB (TRANS): into the B columns of the conv's gradient."""
    import itertools
    c = -(-l // Q)
    g = torch.Generator(device="cuda").manual_seed(2)
    dG = torch.randn(b, c, Q, Q, device="cuda", generator=g).tril().to(torch.bfloat16)
    C = torch.randn(b, l, n, device="cuda", generator=g).to(torch.bfloat16)
    add = torch.randn(b, c, Q, n, device="cuda", generator=g)
    wide = torch.empty(b, l, 2 * h * p + 2 * n + h, device="cuda", dtype=torch.bfloat16)
    out = wide[..., 2 * h * p:2 * h * p + n]
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (2, 3, 4)):
        kw = dict(num_warps=warps, num_stages=stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
        calls = {"dB": lambda: ssd_grouped._dG_product_kernel[(-(-n // bn), Q // bm, b * c)](
            dG, C, add, out, l, c, n, n, l * n, out.stride(1), TRANS=True, Q=Q, BM=bm, BN=bn, BK=bk, PREC="tf32", **kw)}
        print(f"BM {bm} BN {bn} BK {bk} warps {warps} stages {stages}: {_time_calls(calls)} ms", flush=True)


if __name__ == "__main__":
    datamod.run_command(main, "bench_ssd_grouped.py", resumes=False)
