"""Time ssd_triton.ssd_forward against mamba-ssm's mamba_chunk_scan_combined (forward only), GPU only.

Issue 15's shape by default: b 16, L 2650, H 32, P 64, N 512, ngroups 1, chunk 256, bf16 x/B/C,
fp32 dt/A/D, with an initial state. Prints each path's median ms (CUDA events), the forward's model
TFLOP/s, and the largest difference of y and of the final state between the two paths (and
against ssd_reference in float64 on the first batch row with --check).

    python bench_ssd_triton.py                 # default tiles
    python bench_ssd_triton.py --sweep         # grid of heads_per_tile, block_m, block_n, num_warps
    python bench_ssd_triton.py --check         # also compare with the float64 reference

Forward model FLOPs per position (causal halves counted once): Q*N (C B^T) + Q*H*P (diagonal
blocks) + 2*N*H*P (chunk states) + 2*N*H*P (state -> output).
"""
import argparse
import itertools

import torch

import ssd_reference
import ssd_triton


def cuda_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def inputs(b, l, h, p, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = r(b, l, h, p).to(dtype)
    dt = torch.nn.functional.softplus(r(b, l, h) - 3.0)                  # ~ mamba's dt init range
    A = -torch.exp(torch.rand(h, device="cuda", generator=g) * 2.77)    # -[1, 16]
    B = (r(b, l, 1, n) / n ** 0.5).to(dtype)
    C = (r(b, l, 1, n) / n ** 0.5).to(dtype)
    D = r(h)
    s0 = r(b, h, p, n) * 0.1
    return x, dt, A, B, C, D, s0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=2650)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    b, l, h, p, n, Q = a.batch, a.length, a.heads, a.headdim, a.dstate, a.chunk
    x, dt, A, B, C, D, s0 = inputs(b, l, h, p, n, torch.bfloat16)
    flops = b * l * (Q * n + Q * h * p + 4 * n * h * p)
    print(f"b {b} L {l} H {h} P {p} N {n} chunk {Q}: forward model GFLOP {flops / 1e9:.1f}")

    results = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        ref = lambda: mamba_chunk_scan_combined(x, dt, A, B, C, Q, D=D, initial_states=s0,  # noqa: E731
                                                return_final_states=True)
        ms = cuda_ms(ref)
        results["mamba-ssm"] = ref()
        print(f"mamba_chunk_scan_combined fwd: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")
    except ImportError:
        print("mamba-ssm not installed: no baseline")

    configs = [dict()]
    if a.sweep:
        configs = [dict(heads_per_tile=ht, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                   for ht, bm, bn, nw, ns in itertools.product((1, 2, 4), (32, 64), (32, 64), (4, 8), (2, 3))]
    for cfg in configs:
        fn = lambda: ssd_triton.ssd_forward(x, dt, A, B, C, Q, D=D, initial_state=s0, **cfg)  # noqa: E731
        try:
            ms = cuda_ms(fn)
        except Exception as e:  # out of resources for some tiles
            print(f"ssd_triton {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        y, fs = fn()
        line = f"ssd_triton {cfg or 'default'}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s"
        if "mamba-ssm" in results:
            y_m, fs_m = results["mamba-ssm"]
            line += (f"; vs mamba-ssm max|dy| {(y.float() - y_m.float()).abs().max().item():.3e}"
                     f" max|dstate| {(fs - fs_m.float()).abs().max().item():.3e}")
        print(line)

    if a.check:  # float64 reference on the first batch row (memory: the reference's (Q, Q) per head)
        d = lambda t: t[:1].double()  # noqa: E731
        y_r, fs_r = ssd_reference.ssd_chunked(d(x), d(dt), A.double(), d(B), d(C), Q, D=D.double(),
                                              initial_state=d(s0))
        for name, (y, fs) in [("ssd_triton", ssd_triton.ssd_forward(x, dt, A, B, C, Q, D=D, initial_state=s0))]\
                + list(results.items()):
            print(f"{name} vs float64 reference: max|dy| {(y[:1].double() - y_r).abs().max().item():.3e}"
                  f" (max|y| {y_r.abs().max().item():.3g}), max|dstate| "
                  f"{(fs[:1].double() - fs_r).abs().max().item():.3e} (max|state| {fs_r.abs().max().item():.3g})")


if __name__ == "__main__":
    main()
