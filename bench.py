"""Speed and memory of ssmttm, side by side, with a table at the end.

    python bench.py                  # train, layer, decode and stage2 on the GPU (paper shape, bf16)
    python bench.py --only train     # one section (or several, comma-separated): the list below
    python bench.py --only train --rotate 12   # the variants built in one process, their steps in turn
    python bench.py --quick          # CPU smoke run on tiny shapes (checks the script, not the speed)

Sections:
  train     training step (forward, backward, clip, fused AdamW) at the paper's shape: 24 blocks,
            d_model 1024, d_state 512, 30 s = 2584 frames + a 64-token text prefix, bf16 autocast
  profile   the top CUDA kernels of a few such training steps (torch.profiler), and their time by kind
  gemms     each nn.Linear product of a training step alone (forward, input and weight gradients):
            ms and TFLOP/s, and their sum over the step, against the profile's GEMM time
  layer     one Mamba-2 layer, fused kernels vs the ssd_reference path, forward + backward
  decode    stage-1 decoding, 1 prompt + guidance (2 rows): ms per frame at positions 100, 1000, 2500,
            and seconds for 10 s and 25 s of coarse tokens (top-k 250, temperature 1.2, guidance 3)
  decode-batch    many prompts at once (--prompts): ms per frame against the memory floor, and
            clip-seconds per second of generate()
  decode-kernels  each kernel of a decoding frame alone (--kernel-rows), µs and bytes per µs
  decode-profile  the kernels of a graphed decoding frame and their share of its critical path
  stage2    seconds for 100 denoising steps of the stage-2 model on 25 s
  pipeline  the whole path at the paper's size: data.py -> train.py (stages 1 and 2) -> generate.py,
            4 prompts x 25 s, two-stage; Flan-T5-base and DAC 44.1 kHz of the real shapes with random
            weights stand in for the pretrained ones (no download on the GPU machine)
  ddp       train.py on 2 GPUs (torchrun, NCCL) against 1 (ddp-1gpu, ddp-2gpu, ddp-2gpu+resume: a part;
            ddp-1gpu+2gpu --rounds N: both without the resume, N times in turn; --compile 0, 1 or graphs;
            --ddp-grad-accum K: K micro-batches a step, the processes meeting once a step)
  cpu       tokens/s of `python train.py --layers 6` on the synthetic data, on this CPU

Model FLOPs (for MFU) count what the model needs, not what a kernel happens to do:
  6 x (parameters of every matrix) x (positions it is applied to)           forward + backward
  + self-attention 6 L^2 d / layer (causal half), cross-attention 12 L Lt d / layer
  + SSD 3 x L (Q N + Q H P + 4 N H P) / layer  (intra-chunk causal half, chunk states, state->output),
    Q the kernels' chunk length (FastOptions.chunk_size, the rows' "chunk": 256, issue 15's count)
MFU divides by the H200's dense bf16 peak, 989 TFLOP/s (datasheet).
"""
import argparse
import functools
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import data as datamod
import fast
import gpu_kernels as kernels
import ssmttm
import stage2
import train as trainmod
from fast import FastOptions
from ssmttm import LAYOUTS, Mamba2, ModelConfig, TextToMusicLM

PEAK_BF16 = 989e12
HERE = os.path.dirname(os.path.abspath(__file__))
N_TEXT = 64


def cuda_time(fn, iters, warmup, queued=False):
    """Median milliseconds of fn() over iters runs (of an even count, the upper middle one), timed
    with CUDA events after warmup runs. queued: each run's launches wait behind a 20 ms GPU sleep, so
    the time is the GPU's alone, without the gaps the CPU leaves between launches (a custom op's Python
    dispatch, which a training step hides behind its other kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(40_000_000)  # GPU clock cycles
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_busy_ms(fn):
    """(busy, span): milliseconds in which at least one kernel or copy ran on the GPU during one fn()
    (torch.profiler; work on several streams at once counted once), and from the first one's start to the
    last one's end. Busy well under fn's time means fn waits on the host's launches (an eager step at
    small batch on a slow CPU): its time then measures the host as much as the code. span - busy is the
    GPU idle between kernels; fn's time - span, its wait for the first kernel and whatever the profiler's
    intervals leave out."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return interval_union(spans) / 1e3, interval_span(spans) / 1e3


def host_loop_s():
    """Seconds this host's Python takes for a fixed loop (the sum of i * i for i below 10**7). A step
    that waits on the host scales with it, and the lent machines' CPUs differ by up to 3x."""
    start = time.perf_counter()
    sum(i * i for i in range(10 ** 7))
    return time.perf_counter() - start


def interval_union(spans):
    """The total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def timeline_shares(kernels):
    """Each kernel's share of a GPU timeline, kernels (key, start, end) in any order: how far it moves
    the latest end so far, in start order (its time on the critical path of a chain of launches, where
    programmatic dependent launch starts a kernel before the one it waits for ends, so that durations
    overlap), and the idle gap before it. Returns {key: [count, extension, gap, duration]}."""
    shares, frontier = {}, None
    for key, start, end in sorted(kernels, key=lambda k: k[1]):
        frontier = start if frontier is None else frontier
        share = shares.setdefault(key, [0, 0.0, 0.0, 0.0])
        share[0] += 1
        share[1] += max(0.0, end - max(frontier, start))
        share[2] += max(0.0, start - frontier)
        share[3] += end - start
        frontier = max(frontier, end)
    return shares


def interval_span(spans):
    """From the earliest start to the latest end of (start, end) intervals; 0 for none."""
    return max(stop for _, stop in spans) - min(start for start, _ in spans) if spans else 0.0


class GPUClockLog:
    """A context manager: the SM clock (MHz) and the board's power draw (W) of a CUDA device, sampled by
    nvidia-smi every interval_ms while the block runs; afterwards .sm_mhz and .power_w are the medians, NaN
    where nvidia-smi is missing or reported nothing. A run of training steps holds an H200 at its power cap,
    where it lowers its clock (BENCHMARKS.md §0c, thirty-third session): machines, and a timed step against a
    profiled one after a pause, differ by that."""

    def __init__(self, device=None, interval_ms=100):
        uuid = torch.cuda.get_device_properties(device).uuid if torch.cuda.is_available() else None
        self.command = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                        "-lms", str(interval_ms)] + ([] if uuid is None else ["-i", f"GPU-{uuid}"])
        self.sm_mhz = self.power_w = float("nan")

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi here
            self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.sm_mhz, self.power_w = clock_medians(out)
        return False


def clock_medians(text):
    """(median SM MHz, median W) of nvidia-smi's "clocks.sm, power.draw" lines (csv, no header, no units);
    lines that are not two numbers ("[N/A]", a cut-off last line) are skipped; NaN for none."""
    samples = []
    for line in text.splitlines():
        try:
            mhz, watts = (float(v) for v in line.split(","))
        except ValueError:
            continue
        samples.append((mhz, watts))
    if not samples:
        return float("nan"), float("nan")
    return statistics.median(m for m, _ in samples), statistics.median(w for _, w in samples)


def wall_time(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def frames_of(seconds):
    """The frames of `seconds` of audio as DAC encodes it, in whole hops (10 s: 862, as issue 17's table)."""
    return math.ceil(seconds * ssmttm.FRAME_RATE)


def model_flops(model, L_audio, L_text, chunk):
    """Training FLOPs of one sequence (forward + backward), as described in the module docstring; chunk: the
    SSD's chunk length Q (FastOptions.chunk_size, not the plain model's cfg.chunk_size)."""
    cfg = model.cfg
    L = L_audio + (L_text if cfg.prefix else 0)  # positions the blocks run over
    flops = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            n = L_text if name.startswith("text_proj") or name.endswith("kv_proj") else (
                L_audio if name == "head" else L)
            flops += 6 * m.in_features * m.out_features * n
    d = cfg.d_model
    for kind in LAYOUTS[cfg.variant]:
        if kind == "self_attn":
            flops += 6 * L * L * d * cfg.n_layers
        elif kind == "cross_attn":
            flops += 12 * L * L_text * d * cfg.n_layers
        elif kind == "mamba":
            Q, N, HP = chunk, cfg.d_state, cfg.expand * d
            flops += 3 * L * (Q * N + Q * HP + 4 * N * HP) * cfg.n_layers
    return flops


def batch_inputs(batch, n_frames, n_codebooks, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1024, (batch, n_codebooks, n_frames), device=device, generator=g)
    text = torch.randn(batch, N_TEXT, 768, device=device, generator=g)
    lengths = torch.randint(N_TEXT // 3, N_TEXT + 1, (batch,), device=device, generator=g)
    mask = torch.arange(N_TEXT, device=device)[None] < lengths[:, None]
    return codes, text, mask


def train_model(variant, n_layers, device, options):
    """The paper-shape LM (tiny on a CPU) for training, on the kernels of `options` on CUDA."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, n_layers=n_layers,
                      **({} if device == "cuda" else dict(d_model=64, d_state=16, headdim=16, d_ff=128)))
    model = TextToMusicLM(cfg).to(device)
    return fast.accelerate(model, options) if device == "cuda" else model


# bench.py --compile: eager, torch.compile, torch.compile with CUDA graphs (train.py --compile --cuda-graphs)
COMPILE_MODES = {"0": None, "1": "default", "graphs": "reduce-overhead"}


def compiled(model, compile):
    """model as train.py runs it for `compile` (a key of COMPILE_MODES): itself, or train.compile_model's
    (static shapes). Dynamo's cache is emptied first: it is kept per function, not per model, so the
    configurations measured before would count against its recompile limit (8; past it Dynamo runs the
    forward eagerly) and make it recompile with symbolic shapes, which train.py never does."""
    if COMPILE_MODES[compile] is None:
        return model
    torch._dynamo.reset()
    return trainmod.compile_model(model, cuda_graphs=compile == "graphs")


def train_step(model, opt, fwd, inputs, device):
    """One training step of bench.py's rows, as a function: the forward through fwd (the model or its
    compiled form) under bf16 autocast on CUDA, backward, clip to 1, the optimizer's step, gradients to None."""
    codes, text, mask = inputs

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = fwd(codes, text, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(variant, batch, n_frames, n_layers, options, compile="0", steps=8, device="cuda"):
    """A training step's ms, tokens/s, TFLOP/s, MFU and peak memory (allocated and reserved), the GPU's
    median SM clock and power during the timed steps (GPUClockLog), its busy and span ms in one more step
    (gpu_busy_ms) and the host's speed just before (host_loop_s); compile: a key of COMPILE_MODES."""
    options = fast.for_cuda_graphs(options) if compile == "graphs" else options
    model = train_model(variant, n_layers, device, options)
    opt = model.configure_optimizers(1e-4, 0.02, (0.9, 0.999), device)
    fwd = compiled(model, compile)
    step = train_step(model, opt, fwd, batch_inputs(batch, n_frames, 1, device), device)
    host = host_loop_s()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # warm-up (and compilation) outside the clock's log
            step()
        torch.cuda.synchronize()
        with GPUClockLog() as clock:
            ms = cuda_time(step, steps, warmup=0)
        # allocated: the tensors' peak; reserved: the allocator's, what the card must hold (but the context)
        peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        busy, span = gpu_busy_ms(step)
    else:
        ms, busy, span = wall_time(step, 2, 1), float("nan"), float("nan")
        peak = reserved = float("nan")
        clock = GPUClockLog()
    flops = model_flops(model, n_frames, N_TEXT, options.chunk_size) * batch
    del model, opt, fwd, step
    return {**train_columns(variant, batch, n_frames, compile, options, ms, flops), "peak GiB": peak,
            "reserved GiB": reserved, "SM MHz": clock.sm_mhz, "power W": clock.power_w, "GPU busy ms": busy,
            "GPU span ms": span, "host loop s": host}


def train_columns(variant, batch, n_frames, compile, options, ms, flops):
    """The columns of every train row: the configuration, ms per step, and the tokens/s, TFLOP/s and MFU
    that follow from it (flops: the model FLOPs of one step)."""
    return {"section": "train", "variant": variant, "batch": batch, "compile": compile, "chunk": options.chunk_size,
            "mamba2": options.train, "triton op": "auto" if options.triton_op is None else int(options.triton_op),
            "add+norm": int(options.fused_add_norm),
            "gelu+dropout": int(options.fused_gelu_dropout), "residual dropout": int(options.fused_residual_dropout),
            "ms/step": ms, "audio tok/s": batch * n_frames / ms * 1e3, "TFLOP/s": flops / ms / 1e9,
            "MFU %": 100 * flops / ms / 1e-3 / PEAK_BF16}


def rotation(names, rounds):
    """The order of a rotated run: one of each name per round, the order reversed every other round, so
    that each follows each other equally often (a step runs at the clock and power the step before it left)."""
    return [name for r in range(rounds) for name in (names if r % 2 == 0 else names[::-1])]


def bench_train_rotated(configs, batch, n_frames, n_layers, compile="0", rounds=12, device="cuda"):
    """bench_train's step for several configurations (variant, FastOptions) built in one process and timed
    one step of each in turn (rotation) for `rounds` rounds: per configuration the median ms per step (and
    the rates from it), the fastest and the slowest step. Every configuration then sees the same host and
    the same GPU clock and power history, which rows timed one after another (each one's steps back to
    back) do not: batch-4 eager steps, bound by the host, moved by up to 30% from one process to the next
    on one machine, and a batch-16 step runs at the clock that the steps before it left under the power cap
    (BENCHMARKS.md §0c, sixtieth session). Each step is timed from a synchronized GPU to its end, with CUDA
    events on CUDA. Returns the rows, in the order of configs."""
    if COMPILE_MODES[compile] is not None:
        torch._dynamo.reset()  # as compiled(), once: the models compiled here are all timed together
    if compile == "graphs":
        configs = [(variant, fast.for_cuda_graphs(options)) for variant, options in configs]
    runs = []
    for variant, options in configs:
        model = train_model(variant, n_layers, device, options)
        opt = model.configure_optimizers(1e-4, 0.02, (0.9, 0.999), device)
        fwd = model if COMPILE_MODES[compile] is None else trainmod.compile_model(model, compile == "graphs")
        step = train_step(model, opt, fwd, batch_inputs(batch, n_frames, 1, device), device)
        for _ in range(3 if device == "cuda" else 1):  # warm-up (and compilation)
            step()
        runs.append((step, model_flops(model, n_frames, N_TEXT, options.chunk_size) * batch))
    times = [[] for _ in runs]
    for i in rotation(list(range(len(runs))), rounds):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[i][0]()
            end.record()
            torch.cuda.synchronize()
            times[i].append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            runs[i][0]()
            times[i].append((time.perf_counter() - t) * 1e3)
    rows = [{**train_columns(variant, batch, n_frames, compile, options, statistics.median(ts), flops),
             "rotated rounds": rounds, "ms min": min(ts), "ms max": max(ts)}
            for (variant, options), (_, flops), ts in zip(configs, runs, times)]
    del runs
    return rows


def rotated_configs(variants, options):
    """The configurations a rotated run times, (variant, FastOptions): each variant with each options; a
    variant without Mamba-2 layers once per distinct fused_add_norm, fused_gelu_dropout and
    fused_residual_dropout, the only fields its steps read."""
    seen, configs = set(), []
    for variant in variants:
        for o in options:
            fused = (o.fused_add_norm, o.fused_gelu_dropout, o.fused_residual_dropout)
            key = (variant, o if "mamba" in LAYOUTS[variant] else fused)
            if key not in seen:
                seen.add(key)
                configs.append((variant, o))
    return configs


# Kinds of training kernels by the patterns of their names (case-insensitive), first match wins:
# cuBLAS's GEMMs, cuDNN's attention, ssd_grouped.py's and mamba-ssm's SSD kernels, the conv, the norms
KERNEL_KINDS = (
    ("GEMMs", ("nvjet", "gemm", "cublas")),  # not "cutlass": PyTorch's memory-efficient attention is fmha_cutlass*
    ("attention", ("sdpa", "flash", "fmha", "cudnn")),
    ("SSD", ("_prep_kernel", "_states_", "_diag_", "_dy_kernel", "_dg_product", "_dacum", "_chunk_sums", "_copy_rows",
             "_dt_softplus", "_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum")),
    ("conv + SiLU", ("_conv_", "causal_conv1d")),
    ("norms", ("rms_norm", "layer_norm")),
    ("GELU + dropout", ("gelu",)),
    ("optimizer", ("multi_tensor_apply",)),
)


def kernel_kinds(times):
    """GPU time by kind: times {kernel name: ms} -> {kind: ms} for each kind of KERNEL_KINDS that has a
    kernel, in that order, then "the rest"."""
    kinds = {}
    for name, ms in times.items():
        low = name.lower()
        kind = next((k for k, patterns in KERNEL_KINDS if any(p in low for p in patterns)), "the rest")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {k: kinds[k] for k in [k for k, _ in KERNEL_KINDS] + ["the rest"] if k in kinds}


def batched_gemm_ms(ops):
    """GPU ms of the batched products among ops [(op name, input shapes, self GPU ms)] (a profile grouped
    by input shape): aten::bmm and aten::baddbmm over more than one matrix, the grouped SSD's state
    products (ssd_grouped._matmul_f32). cuBLAS names their kernels as it names the linear layers' (nvjet),
    so kernel_kinds counts them among the GEMMs; a bmm of one matrix (an einsum's weight gradient) is a
    linear layer's."""
    return sum(ms for name, shapes, ms in ops
               if name in ("aten::bmm", "aten::baddbmm") and shapes and len(shapes[0]) == 3 and shapes[0][0] > 1)


def split_ssd_gemms(kinds, ssd_gemm_ms):
    """kernel_kinds' table with ssd_gemm_ms (batched_gemm_ms) moved from "GEMMs" to a row of its own,
    "SSD GEMMs", after "SSD": the linear layers' GEMMs apart from the SSD's (nothing moved at 0 ms)."""
    if not ssd_gemm_ms:
        return dict(kinds)
    if ssd_gemm_ms > kinds.get("GEMMs", 0.0) + 1e-9:
        raise ValueError(f"split_ssd_gemms: {ssd_gemm_ms} ms of batched GEMMs exceed the GEMMs' {kinds.get('GEMMs')}")
    out = {}
    for kind, ms in kinds.items():
        out[kind] = ms - ssd_gemm_ms if kind == "GEMMs" else ms
        if kind == "SSD":
            out["SSD GEMMs"] = ssd_gemm_ms
    if "SSD GEMMs" not in out:
        out["SSD GEMMs"] = ssd_gemm_ms
    return out


def profile_train(variant, batch, n_frames, n_layers, compile, options, rows=25):
    """Top CUDA kernels of a few training steps (torch.profiler), printed as a table; compile: a key of
    COMPILE_MODES."""
    from torch.profiler import ProfilerActivity, profile
    model = train_model(variant, n_layers, "cuda", fast.for_cuda_graphs(options) if compile == "graphs" else options)
    opt = model.configure_optimizers(1e-4, 0.02, (0.9, 0.999), "cuda")
    fwd = compiled(model, compile)
    codes, text, mask = batch_inputs(batch, n_frames, 1, "cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(codes, text, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"\n### profile {variant} batch {batch} compile {compile} {options} (2 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    kinds = kernel_kinds({e.key: e.device_time_total / 2e3 for e in prof.key_averages() if e.device_time_total > 0})
    # Kernel names such as vectorized_elementwise_kernel<...> do not say which tensors they touched:
    # one more step with the ops that launched them and their input shapes
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    print("\n### the same by op and input shapes (1 step; ops and their kernels both listed)")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_cuda_time_total", row_limit=2 * rows, max_name_column_width=50,
                         max_shapes_column_width=80))
    # the kinds of the 2 steps above, the SSD's batched products (from this step's ops) apart from the GEMMs
    kinds = split_ssd_gemms(kinds, batched_gemm_ms([(e.key, e.input_shapes, e.self_device_time_total / 1e3)
                                                    for e in by_shape]))
    print("\n| kind of kernel | GPU ms per step |\n|---|---|")
    for kind, ms in [*kinds.items(), ("all", sum(kinds.values()))]:
        print(f"| {kind} | {ms:.1f} |")


def linear_products(variant, batch, n_frames, n_layers=24):
    """Every nn.Linear product of the paper-shape LM's forward at batch x n_frames (N_TEXT text tokens):
    [(module name, M rows, K inputs, N outputs)] in call order, found by running the plain model's forward
    on fake tensors (shapes only: no memory, no arithmetic). The fast model computes the same products
    (in_proj's and out_proj's inside the Mamba-2 op, some widths padded: bench_gemms)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    seen = []
    with FakeTensorMode():
        model = TextToMusicLM(ModelConfig(variant=variant, n_layers=n_layers))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, inputs, out, name=name: seen.append(
                    (name, math.prod(inputs[0].shape[:-1]), m.in_features, m.out_features)))
        model(torch.zeros(batch, 1, n_frames, dtype=torch.long), torch.zeros(batch, N_TEXT, 768),
              torch.ones(batch, N_TEXT, dtype=torch.bool))
    return seen


def bench_gemms(variant, batch, n_frames, n_layers=24, iters=20, device="cuda"):
    """Each product of linear_products alone, bf16 on CUDA, in F.linear's three layouts: forward x w^T,
    input gradient dy w, weight gradient dy^T x (autograd's). One row per product of block 0 and per
    product outside the blocks: ms of each and TFLOP/s; "step ms" sums the three over the model's calls
    of that product (every block's), for the profile's GEMM time ("GEMMs", kernel_kinds). On a CPU:
    fp32, wall-clock times (bench.py --quick checks the script, not the speed)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = (lambda fn: cuda_time(fn, iters, warmup=3)) if device == "cuda" else (lambda fn: wall_time(fn, 2, 1))
    products = linear_products(variant, batch, n_frames, n_layers)
    calls = {}
    for name, M, K, N in products:
        key = (name.split(".", 2)[2] if name.startswith("blocks.") else name, M, K, N)
        calls[key] = calls.get(key, 0) + 1
    g = torch.Generator(device).manual_seed(0)
    for (name, M, K, N), count in calls.items():
        # widths off a multiple of 8 or 64 also padded to one, as the fast model pads them (in_proj's output
        # to 64 in the Mamba-2 op, gpu_kernels._padded_width; the head's 1025 logits to 8, fast.aligned_linear)
        for width in dict.fromkeys([N, -(-N // 8) * 8, -(-N // 64) * 64]):
            x, w, dy = (torch.randn(r, c, device=device, generator=g, dtype=dtype)
                        for r, c in ((M, K), (width, K), (M, width)))
            ms = {kind: timer(functools.partial(torch.mm, a, b))
                  for kind, a, b in (("forward", x, w.t()), ("input grad", dy, w), ("weight grad", dy.t(), x))}
            tflop = 2 * M * K * N / 1e12  # the product's own FLOPs, not the padding's
            emit({"section": "gemms", "variant": variant, "product": name, "M": M, "K": K, "N": width,
                  "calls": count, **{f"{k} ms": v for k, v in ms.items()},
                  **{f"{k} TFLOP/s": tflop / v * 1e3 for k, v in ms.items()}, "step ms": count * sum(ms.values())})


def bench_layer(batch, L, options, d_state=512, device="cuda"):
    """One Mamba-2 layer, forward + backward: on the kernels of `options`, or (None) the plain layer."""
    torch.manual_seed(0)
    d = 1024 if device == "cuda" else 64
    layer = Mamba2(d, d_state=d_state if device == "cuda" else 16, headdim=64 if device == "cuda" else 16).to(device)
    if options is not None:
        fast.accelerate(layer, options)
    u = torch.randn(batch, L, d, device=device, requires_grad=True)

    def fwd_bwd():  # the gradients set afresh each time, as in a training step, not accumulated
        u.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            y = layer(u)
        y.float().square().mean().backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time(fwd_bwd, 10, 3)
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        ms, peak = wall_time(fwd_bwd, 2, 1), float("nan")
    return {"section": "layer", "path": options.train if options else "reference", "batch": batch, "L": L,
            "ms fwd+bwd": ms, "peak GiB": peak}


def paper_model(variant, n_layers, device, dtype):
    """The paper-shape LM (tiny on a CPU) for decoding: weights in dtype, on the kernels on CUDA."""
    torch.manual_seed(0)
    small = {} if device == "cuda" else dict(d_model=64, d_state=16, headdim=16, d_ff=128)
    cfg = ModelConfig(variant=variant, n_layers=n_layers, dropout=0.0, **small)
    model = fast.for_inference(TextToMusicLM(cfg).to(device), dtype)
    return fast.accelerate(model) if device == "cuda" else model


DECODE_MODES = {  # mode -> the decoder's options (None: generate's plain loop)
    "graph": FastOptions(),                                 # gpu_kernels.py's kernels, one CUDA graph per frame
    "bf16state+graph": FastOptions(),                       # the same, the SSM state stored in bf16
    "nopdl+graph": FastOptions(pdl=False),                  # without programmatic dependent launch
    "streams1+graph": FastOptions(decode_streams=1),        # all rows on one stream (graph: by the rows)
    "bf16state+streams1+graph": FastOptions(decode_streams=1),
    "streams2+graph": FastOptions(decode_streams=2),        # the rows in 2 groups on 2 CUDA streams
    "bf16state+streams2+graph": FastOptions(decode_streams=2),
    "streams4+graph": FastOptions(decode_streams=4),        # in 4 groups on 4 streams
    "chunk1+graph": FastOptions(decode_chunk=1),            # Mamba-2's state written every step (ssm_step)
    "bf16state+chunk1+graph": FastOptions(decode_chunk=1),
    "chunk16+graph": FastOptions(decode_chunk=16),          # written once per 16 steps (ssm_chunk_step)
    "bf16state+chunk16+graph": FastOptions(decode_chunk=16),
    "nosplit+graph": FastOptions(decode_split_k=False),     # each product's programs over all of K
    "bf16state+nosplit+graph": FastOptions(decode_split_k=False),
    "nofold+graph": FastOptions(decode_fold_norm=False),    # in_proj's norm a kernel of its own past 8 rows
    "bf16state+nofold+graph": FastOptions(decode_fold_norm=False),
    "compile+graph": FastOptions(compile=True),             # torch.compile's fusion instead of gpu_kernels.py's
    "unfused+graph": FastOptions(decode_kernels=False),     # plain ops (mamba-ssm's step kernels) in the graph
    "eager": FastOptions(cuda_graph=False),                 # gpu_kernels.py's kernels, launched one by one
    "plain": None,                                          # the plain loop (mamba-ssm's step kernels)
    "recompute": None,                                      # the whole sequence at every step
}
# the modes that decode through a fast.Decoder, the only ones decode-batch and decode-profile run
DECODER_MODES = tuple(mode for mode, options in DECODE_MODES.items() if options is not None)


def decode_ms(model, position, mode, device, iters=96, prompts=1):
    """ms per generated frame at a position: the state after `position` steps, then frames, each
    one model step plus guidance, top-k sampling and writing the token (what generate() repeats),
    for `prompts` prompts (2 rows each), timed as generate() runs them: back to back, the mean over
    `iters` frames. Frames differ: with chunks of steps (FastOptions.decode_chunk) the chunk's last
    one also writes the SSM state, so iters is a multiple of the chunk (96: of 1 to 32 steps), and
    a median would leave that frame out. mode: a key of DECODE_MODES; recompute times a full
    forward over position + 1 steps."""
    K, warmup = model.cfg.n_codebooks, 3
    codes, text, mask = batch_inputs(2 * prompts, position, K, device, seed=1)
    mask[prompts:] = False  # the second half: the null condition of guidance
    begin = torch.full_like(codes[..., :1], ssmttm.SPECIAL)
    tokens = torch.cat([begin, codes], -1)
    with torch.no_grad():
        if mode == "recompute":  # every frame the same: the median of single ones
            timer = cuda_time if device == "cuda" else wall_time
            return timer(lambda: model.logits(tokens, text, mask), 5, 2)
        n_steps = position + iters + warmup + 8
        steps = torch.full((prompts, K, n_steps), ssmttm.SPECIAL, device=device)
        steps[..., :position] = codes[:prompts]
        fixed = torch.zeros_like(steps, dtype=torch.bool)
        cache = ssmttm.InferenceCache(model, 2 * prompts, n_steps + 1, device, next(model.parameters()).dtype,
                                      ssm_dtype(mode))
        model.logits(tokens[..., :-1], text, mask, cache)
        sampling = ssmttm.Sampling(cfg_scale=3.0, top_k=250, temperature=1.2)
        options = DECODE_MODES[mode] or FastOptions(decode_kernels=False, cuda_graph=False)  # plain: one step
        frame = fast.Decoder(options).frame(model, cache, steps, fixed, position, 2, sampling)
        return wall_time(frame, iters, warmup)


def runs_on_cpu(mode):
    """Whether a decoding mode (DECODE_MODES) runs on a CPU: neither a CUDA graph nor gpu_kernels.py's decoding
    kernels (which need CUDA; Triton's interpreter does not run them all)."""
    options = DECODE_MODES[mode]
    return "graph" not in mode and (options is None or not options.decode_kernels)


def ssm_dtype(mode):
    return torch.bfloat16 if "bf16state" in mode else None


DECODE_SETUPS = ("prefix_simba:graph", "prefix_simba:bf16state+graph", "prefix_simba:nopdl+graph",
                 "prefix_simba:compile+graph", "prefix_simba:unfused+graph", "prefix_simba:eager",
                 "cross_transformer:eager", "prefix_simba:recompute")


def bench_decoding(device, n_layers, positions, setups=DECODE_SETUPS, seconds=(10, 25), full_baseline=False):
    """Per setup (variant:mode), one model: ms per frame at fixed positions, then seconds for 10 s
    and 25 s of coarse tokens (1 prompt with guidance, top-k 250, temperature 1.2). Modes: the keys
    of DECODE_MODES."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for setup in setups:
        variant, mode = setup.split(":")
        if device != "cuda" and not runs_on_cpu(mode):
            continue
        model = paper_model(variant, n_layers, device, dtype)
        row = {"section": "decode", "variant": variant, "mode": mode}
        try:
            for p in positions:
                row[f"ms/frame @{p}"] = decode_ms(model, p, mode, device)
            _, text, mask = batch_inputs(1, 1, 1, device, seed=2)
            options = DECODE_MODES[mode]
            kw = dict(recurrent=mode != "recompute", ssm_dtype=ssm_dtype(mode),
                      decoder=None if options is None else fast.Decoder(options))
            t0 = time.perf_counter()
            model.generate(text, mask, 8, **kw)  # warm-up: compilation, autotuning, graph capture
            row["warm-up s"] = time.perf_counter() - t0
            # the baseline takes minutes for 25 s: 10 s only unless asked
            for sec in seconds if mode != "recompute" or full_baseline else seconds[:1]:
                n = frames_of(sec) if device == "cuda" else 20
                g = torch.Generator(device=device).manual_seed(0)
                run = functools.partial(model.generate, text, mask, n, generator=g, **kw)
                # a Decoder records its frames' graphs for each length once: not in the timed call
                row[f"s for {sec}s"] = wall_time(run, 1, 0 if kw["decoder"] is None else 1) / 1e3
        except Exception as e:  # report, keep going
            row["error"] = f"{type(e).__name__}: {e}"[:160]
        emit(row)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


H200_COPY_TB_S = 4.3  # device-to-device copy bandwidth measured on this card (bytes read + written)


def decode_floor_ms(model, rows, ssm_bytes, chunk=1):
    """The memory floor of one decoding step of `rows` rows: every weight a step uses read once, and
    each row's Mamba-2 states (SSM, of ssm_bytes a value, and conv, in the weights' dtype as the cache
    keeps it) read and written once, at H200_COPY_TB_S (issue 17's floor). With chunk > 1, the SSM state
    is written once per chunk of steps (FastOptions.decode_chunk)."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith(("text_", "embed")))  # the text projection runs at the prefill
    mamba = [m for m in model.modules() if isinstance(m, Mamba2)]
    ssm = sum(m.nheads * m.headdim * m.d_state * ssm_bytes for m in mamba)
    conv = sum(m.conv_dim * m.d_conv * m.conv1d.weight.element_size() for m in mamba)
    return (weights + rows * ((1 + 1 / chunk) * ssm + 2 * conv)) / (H200_COPY_TB_S * 1e12) * 1e3


@torch.no_grad()
def bench_decode_batch(n_layers, prompts=(1, 4, 16, 64), seconds=10, modes=("graph", "bf16state+graph")):
    """Many prompts at once (2 rows each, guidance): ms per frame against the memory floor (and the
    floor of the state written once per chunk of steps), and
    clip-seconds of coarse tokens per second of generate() (10 s clips, one generator per prompt)
    with its time per frame against the same floor (issue 17's method: all of generate's work, in a
    Decoder's later calls, which replay the CUDA graphs it kept; and with a new Decoder, which records
    its frames' graphs and runs the prefill eager; and a later call with torch's default generator, as
    the issue's own call draws), per mode
    of DECODE_MODES (by default the SSM state in fp32 and in bf16). Prefix SiMBA, bf16 weights."""
    model = paper_model("prefix_simba", n_layers, "cuda", torch.bfloat16)
    n = frames_of(seconds)
    for p, mode in itertools.product(prompts, modes):
        row = {"section": "decode batch", "prompts": p, "rows": 2 * p, "mode": mode,
               "state": "bf16" if "bf16" in mode else "fp32"}
        try:
            row["ms/frame"] = decode_ms(model, 100, mode, "cuda", prompts=p)
            _, text, mask = batch_inputs(p, 1, 1, "cuda", seed=2)
            gens = [torch.Generator("cuda").manual_seed(i) for i in range(p)]
            decoder = fast.Decoder(DECODE_MODES[mode])
            run = lambda d: model.generate(text, mask, n, generator=gens, decoder=d, ssm_dtype=ssm_dtype(mode))
            run(decoder)  # warm-up: compilation, the frames' graphs (the decoder keeps them: KeptFrames)
            run(decoder)  # and the prefill's graph, recorded at the second call (KeptPrefill)
            row[f"s for {seconds}s"] = wall_time(lambda: run(decoder), 1, 0) / 1e3
            # a new Decoder per call records its graphs again (warm-up and capture)
            row["new decoder ms/frame"] = wall_time(lambda: run(fast.Decoder(DECODE_MODES[mode])), 1, 0) / n
            # the call as written: torch's default generator, one for the batch
            one = fast.Decoder(DECODE_MODES[mode])
            run_one = lambda: model.generate(text, mask, n, decoder=one, ssm_dtype=ssm_dtype(mode))
            run_one()
            run_one()
            row["one generator ms/frame"] = wall_time(run_one, 1, 0) / n
            row["clip-s per s"] = p * seconds / row[f"s for {seconds}s"]
            state_dtype = torch.bfloat16 if "bf16" in mode else torch.float32
            chunk = DECODE_MODES[mode].decode_chunk or fast.decode_chunk_for(2 * p, state_dtype)
            row["floor ms"] = decode_floor_ms(model, 2 * p, state_dtype.itemsize)
            row["ratio"] = row["ms/frame"] / row["floor ms"]
            # issue 17's method: the whole generate() (prefill, a generator per prompt) per frame
            row["generate ms/frame"] = row[f"s for {seconds}s"] / n * 1e3
            row["generate ratio"] = row["generate ms/frame"] / row["floor ms"]
            row["chunk"] = chunk  # the state written once per this many steps: a lower floor
            row["chunk floor ms"] = decode_floor_ms(model, 2 * p, state_dtype.itemsize, chunk)
            row["chunk ratio"] = row["ms/frame"] / row["chunk floor ms"]
        except Exception as e:  # report, keep going
            row["error"] = f"{type(e).__name__}: {e}"[:160]
        emit(row)
        torch.cuda.empty_cache()


@torch.no_grad()
def profile_decoding(n_layers, mode="graph", frames=32, rows=30, prompts=1):
    """Kernels of the graphed decoding frame of Prefix SiMBA (torch.profiler sees inside graph
    replays) for `prompts` prompts (2 rows each): how many per frame, and which take the time, over
    `frames` frames (a multiple of the chunk of steps: its last one writes the SSM state).
    mode: a key of DECODE_MODES. With programmatic dependent launch kernels overlap, so their times
    add up to more than the frame; the second table gives each kernel, told apart by its grid, its
    share of the frame's critical path instead (timeline_shares)."""
    from torch.profiler import ProfilerActivity, profile
    model = paper_model("prefix_simba", n_layers, "cuda", torch.bfloat16)
    timer_ms = decode_ms(model, 100, mode, "cuda", prompts=prompts)  # also compiles, if mode says so
    K = model.cfg.n_codebooks
    steps = torch.full((prompts, K, 200), ssmttm.SPECIAL, device="cuda")
    steps[..., :100] = 0
    cache = ssmttm.InferenceCache(model, 2 * prompts, 201, "cuda", torch.bfloat16, ssm_dtype(mode))
    sampling = ssmttm.Sampling(cfg_scale=3.0, top_k=250, temperature=1.2)
    frame = fast.Decoder(DECODE_MODES[mode]).frame(model, cache, steps, torch.zeros_like(steps, dtype=torch.bool), 100,
                                                   2, sampling)
    frame()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            frame()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    n_kernels = sum(e.count for e in events) / frames
    busy_us = sum(e.self_device_time_total for e in events) / frames
    print(f"\n### decoding profile ({mode}, {prompts} prompts): {n_kernels:.0f} kernels per frame, "
          f"{busy_us / 1e3:.3f} ms busy, {timer_ms:.3f} ms per frame (back to back)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90))
    # the same kernels on the frame's critical path; the trace names each launch's grid, which tells
    # apart the products that share a kernel
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            trace = json.load(f)["traceEvents"]
    shares = timeline_shares([(f'{e["name"][:60]} {tuple(e["args"].get("grid", ()))}', e["ts"], e["ts"] + e["dur"])
                              for e in trace if e.get("cat") == "kernel"])
    print("\n| kernel (grid) | per frame | critical path µs per frame | per launch | idle before it µs per frame | "
          "duration per launch |\n|---|---|---|---|---|---|")
    for key, (n, ext, gap, dur) in sorted(shares.items(), key=lambda kv: -kv[1][1] - kv[1][2])[:rows]:
        print(f"| {key} | {n / frames:.0f} | {ext / frames:.1f} | {ext / n:.2f} | {gap / frames:.1f} | {dur / n:.2f} |")
    emit({"section": "decode profile", "mode": mode, "prompts": prompts, "kernels/frame": n_kernels,
          "GPU busy ms/frame": busy_us / 1e3, "ms/frame": timer_ms})


@torch.no_grad()
def bench_decode_kernels(n_layers=24, rows=2, sweep=False):
    """The kernels of one decoding frame, one shape at a time: each kernel runs n_layers times on
    n_layers different weights (so, as in a frame, nothing is left in L2), captured in one CUDA
    graph. Microseconds per call and the bytes it must move per microsecond, for gpu_kernels.py with and
    without programmatic dependent launch, and for cuBLAS (F.linear, the matrix product alone).
    sweep: also linear_rows with each launch shape (outputs and warps per program), with PDL."""
    cfg = ModelConfig()
    d, d_inner, n = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state
    nheads = d_inner // cfg.headdim
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, gated = torch.randn(rows, d_inner, **bf16), torch.randn(rows, d_inner, device="cuda")  # gated y is fp32
    conv_dim = d_inner + 2 * n
    in_proj = 2 * d_inner + 2 * n + nheads
    # (name, N, K, call(weight, i, **launch shape)): four of the five kernels of a SiMBA block, and the head
    conv = [(torch.zeros(rows, conv_dim, cfg.d_conv, **bf16), torch.randn(conv_dim, cfg.d_conv, **bf16),
             torch.randn(conv_dim, **bf16)) for _ in range(n_layers)]
    nw, b_ff = torch.ones(d_inner, **bf16), torch.zeros(d_inner, **bf16)
    shapes = [
        ("norm+in_proj+conv", in_proj, d, lambda w, i, **kw: kernels.linear_rows(
            x[:, :d], w, norm_weight=nw[:d], conv=(*conv[i], d_inner), **kw)),
        ("norm+out_proj+residual (fp32 input)", d, d_inner, lambda w, i, **kw: kernels.linear_rows(
            gated, w, norm_weight=nw, residual=x[:, :d], **kw)),
        ("norm+fc1+GELU", cfg.d_ff, d, lambda w, i, **kw: kernels.linear_rows(
            x[:, :d], w, b_ff[:cfg.d_ff], nw[:d], gelu=True, **kw)),
        ("fc2+bias+residual", d, cfg.d_ff, lambda w, i, **kw: kernels.linear_rows(
            x[:, :cfg.d_ff], w, b_ff[:d], residual=x[:, :d], **kw)),
        ("norm_f+head", cfg.n_codebooks * (ssmttm.CODEBOOK_SIZE + 1), d, lambda w, i, **kw: kernels.linear_rows(
            x[:, :d], w, norm_weight=nw[:d], **kw)),
    ]

    def graphed(calls):
        for c in calls:  # warm-up: compilation
            c()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        return cuda_time(graph.replay, 50, 5) * 1e3 / len(calls)

    def pdl_and_plain(row, mb, calls):  # us and GB/s with programmatic dependent launch and without
        for label, pdl in (("", True), ("no PDL ", False)):
            us = graphed([lambda c=c: c(pdl=pdl) for c in calls])
            row[f"{label}us"], row[f"{label}GB/s"] = us, mb * 1e3 / us
        return row

    counters = torch.zeros(kernels.SPLIT_OUTPUTS, device="cuda", dtype=torch.int32)  # as the decoder's (split_k)
    for name, N, K, call in shapes:
        weights = [torch.randn(N, K, **bf16) / K ** 0.5 for _ in range(n_layers)]
        mb = (N * K * 2 + rows * (K + N) * 2) / 1e6
        calls = [lambda w=w, i=i, **kw: call(w, i, counters=counters, **kw) for i, w in enumerate(weights)]
        default = kernels._default_path(rows, weights[0], split_k=True)
        row = pdl_and_plain({"section": "decode kernels", "rows": rows, "kernel": f"{name} ({default}, the default)",
                             "N x K": f"{N} x {K}", "MB": round(mb, 2)}, mb, calls)
        us = graphed([lambda w=w: torch.nn.functional.linear(x[:, :K], w) for w in weights])
        row["cuBLAS us"], row["cuBLAS GB/s"] = us, mb * 1e3 / us
        emit(row)
        for path in kernels.LINEAR_PATHS:  # the other paths at these rows
            if path == default or (path == "cuda_cores" and rows > kernels.CORE_ROWS):
                continue
            try:
                us = graphed([lambda c=c, p=path: c(path=p) for c in calls])
            except ValueError as e:  # the tensor-core kernel past its shared memory
                us = float("nan")
                print(f"{name} {path}: {e}"[:200], flush=True)
            emit({"section": "decode kernels", "rows": rows, "kernel": f"{name} ({path})", "N x K": f"{N} x {K}",
                  "MB": round(mb, 2), "us": us, "GB/s": mb * 1e3 / us})
        for block_n, warps in (itertools.product((1, 2, 4, 8), (1, 2, 4, 8))
                               if sweep and rows <= kernels.CORE_ROWS else ()):
            us = graphed([lambda c=c, bn=block_n, nw=warps: c(path="cuda_cores", block_n=bn, num_warps=nw)
                          for c in calls])
            emit({"section": "decode kernels", "rows": rows,
                  "kernel": f"{name}: {block_n} outputs, {warps} warps per program",
                  "N x K": f"{N} x {K}", "MB": round(mb, 2), "us": us, "GB/s": mb * 1e3 / us})
        for width, block_n, warps in itertools.product((128, 256, 512), (16, 32, 64), (4, 8)) if sweep else ():
            us = graphed([lambda c=c, s=K // width, bn=block_n, nw=warps: c(
                path="split_k", split=s, block_n=bn, num_warps=nw) for c in calls])
            emit({"section": "decode kernels", "rows": rows,
                  "kernel": f"{name}: split_k, slices of {width} of K, {block_n} outputs, {warps} warps per program",
                  "N x K": f"{N} x {K}", "MB": round(mb, 2), "us": us, "GB/s": mb * 1e3 / us})
        tc_shapes = itertools.product((16, 32), (16, 32, 64), (4, 8, 16)) if sweep else ()
        for block_m, block_n, warps in tc_shapes:
            if block_m > max(16, 1 << (rows - 1).bit_length()):
                continue
            try:
                us = graphed([lambda c=c, bm=block_m, bn=block_n, nw=warps: c(
                    path="tensor_cores", block_m=bm, block_n=bn, num_warps=nw) for c in calls])
            except Exception as e:  # a shape that does not fit (registers, shared memory)
                us = float("nan")
                print(f"{name} tensor cores {block_m} x {block_n}, {warps} warps: {type(e).__name__}", flush=True)
            emit({"section": "decode kernels", "rows": rows,
                  "kernel": f"{name}: tensor cores, {block_m} rows x {block_n} outputs, {warps} warps per program",
                  "N x K": f"{N} x {K}", "MB": round(mb, 2), "us": us, "GB/s": mb * 1e3 / us})
    # the SSD step: read and write the state (rows, nheads, headdim, d_state), fp32 or bf16
    zxbcdt = torch.randn(rows, in_proj, **bf16)
    A, dt_bias = -torch.ones(nheads, device="cuda"), torch.zeros(nheads, device="cuda")
    D = torch.ones(nheads, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        states = [torch.zeros(rows, nheads, cfg.headdim, n, device="cuda", dtype=dtype) for _ in range(n_layers)]
        mb = 2 * states[0].numel() * states[0].element_size() / 1e6
        for block_p, warps in ((2, 1), (2, 4), (4, 1), (4, 2), (4, 4), (8, 4)):
            row = {"section": "decode kernels", "rows": rows,
                   "kernel": f"ssm_step ({str(dtype)[6:]} state, block_p {block_p}, {warps} warps)",
                   "N x K": f"state {tuple(states[0].shape)}", "MB": round(mb, 2)}
            emit(pdl_and_plain(row, mb, [lambda s=s, pdl=True: kernels.ssm_step(
                zxbcdt, s, A, dt_bias, D, d_inner, 1, 0, pdl, block_p, warps) for s in states]))
        # the state read every step and written once per chunk, as the decoder's frames do it:
        # ssm_chunk_step's two kernels, and ssm_chunk_end at the chunk's last step. One replay is a
        # whole chunk of steps, each advancing the slot, so that the last step counts once per chunk
        # (a median of single steps would leave it out). Then fold_chunk alone (the step's fold where
        # the caller does not know where the chunk ends): at a chunk's last step, and at the others
        # (where its programs return at once)
        for chunk in (8, 16):
            slot = torch.zeros(rows, dtype=torch.int32, device="cuda")
            pending = [kernels.PendingSteps.empty(s, chunk, 1, torch.bfloat16, slot) for s in states]
            advance = [lambda c=chunk: slot.add_(1).remainder_(c)]
            within = [lambda s=s, p=p: kernels.ssm_chunk_step(zxbcdt, s, p, A, dt_bias, D, d_inner, 1, 0)
                      for s, p in zip(states, pending)]
            last = [lambda s=s, p=p: kernels.ssm_chunk_end(zxbcdt, s, p, A, dt_bias, D, d_inner, 1, 0)
                    for s, p in zip(states, pending)]
            us = graphed((within + advance) * (chunk - 1) + last + advance) * (len(within) + 1) / len(within)
            mb = (1 + 1 / chunk) * states[0].numel() * states[0].element_size() / 1e6
            emit({"section": "decode kernels", "rows": rows,
                  "kernel": f"ssm_chunk_step, ssm_chunk_end at the end ({str(dtype)[6:]} state, chunks of {chunk})",
                  "N x K": f"state {tuple(states[0].shape)}", "MB": round(mb, 2), "us": us, "GB/s": mb * 1e3 / us})
            for at, mb in ((chunk - 1, 2 * states[0].numel() * states[0].element_size() / 1e6), (0, 0.0)):
                slot.fill_(at)
                us = graphed([lambda s=s, p=p: kernels.fold_chunk(s, p) for s, p in zip(states, pending)])
                emit({"section": "decode kernels", "rows": rows,
                      "kernel": f"fold_chunk ({str(dtype)[6:]} state, chunks of {chunk}, slot {at})",
                      "N x K": f"state {tuple(states[0].shape)}", "MB": round(mb, 2), "us": us,
                      "GB/s": mb * 1e3 / us})


def bench_stage2(device):
    emit(ssmttm_stage2_timing(device))


def ssmttm_stage2_timing(device):
    cfg = stage2.Stage2Config() if device == "cuda" else stage2.Stage2Config(**stage2.Stage2Config.small())
    torch.manual_seed(0)
    model = stage2.Stage2Diffusion(cfg).to(device).eval()
    n = round(25 * ssmttm.FRAME_RATE) if device == "cuda" else 64
    coarse_latent = torch.randn(1, 8, n, device=device)
    _, text, mask = batch_inputs(1, 1, 1, device, seed=3)
    steps = 100 if device == "cuda" else 3
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        run = lambda: model.sample_latents(coarse_latent, text, mask, steps=steps, cfg_scale=3.0)
        ms = wall_time(run, 1, 1)
    return {"section": "stage2", "frames": n, "steps": steps, "s": ms / 1e3,
            "params M": sum(p.numel() for p in model.parameters()) / 1e6}


def bench_pipeline(device, quick=False):
    """data.py -> train.py (stage 1, stage 2) -> generate.py at the paper's size, timed, in a temporary
    folder removed after it, however the steps end (an error, Ctrl-C)."""
    import shutil
    import tempfile
    root = tempfile.mkdtemp(prefix="ssmttm-pipeline-")
    try:
        pipeline_steps(root, quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pipeline_steps(root, quick):
    """bench_pipeline's models, audio and steps, in root."""
    import numpy as np
    import soundfile as sf
    from transformers import ByT5Tokenizer, DacConfig, DacModel, T5Config, T5EncoderModel
    t5_dir, dac_dir, audio = (os.path.join(root, d) for d in ("t5", "dac", "audio"))
    torch.manual_seed(0)
    t5 = T5Config(vocab_size=384, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                  feed_forward_proj="gated-gelu")
    T5EncoderModel(t5 if not quick else T5Config(vocab_size=384, d_model=768, d_kv=32, d_ff=64, num_layers=1,
                                                   num_heads=2)).save_pretrained(t5_dir)
    ByT5Tokenizer().save_pretrained(t5_dir)
    dac_cfg = DacConfig(sampling_rate=44100) if not quick else datamod.tiny_dac_config()
    DacModel(dac_cfg).save_pretrained(dac_dir)
    os.makedirs(audio)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4 if not quick else 1):  # 70 s each: two 30 s clips and a 10 s one
        t = np.arange(70 * 44100) / 44100
        sf.write(os.path.join(audio, f"{i}.wav"), (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t) +
                                                   0.05 * rng.standard_normal(len(t))).astype(np.float32), 44100)
        lines.append(json.dumps({"audio": f"{i}.wav", "caption": f"test tone number {i} with noise"}))
    with open(os.path.join(audio, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    py = [sys.executable]
    size = [] if not quick else ["--layers", "1", "--d-model", "64", "--d-state", "16", "--frames", "64"]
    steps = [
        ("data.py", py + [script("data.py"), "--audio", audio, "--captions", os.path.join(audio, "captions.jsonl"),
                          "--out", os.path.join(root, "tokens"), "--dac", dac_dir]),
        ("train stage 1 (10 steps)", py + [script("train.py"), "--data", os.path.join(root, "tokens"), "--t5", t5_dir,
                                           "--steps", "10", "--grad-accum", "1", "--out", os.path.join(root, "s1"),
                                           *size]),
        ("train stage 2 (10 steps)", py + [script("train.py"), "--data", os.path.join(root, "tokens"), "--t5", t5_dir,
                                           "--dac", dac_dir, "--stage", "2", "--steps", "10", "--grad-accum", "1",
                                           "--out", os.path.join(root, "s2"), *size[-2:]]),
        ("generate 4 x 25 s", py + [script("generate.py"), "--ckpt", os.path.join(root, "s1", "ckpt.pt"), "--stage2",
                                    os.path.join(root, "s2", "ckpt.pt"), "--dac", dac_dir, "--t5", t5_dir,
                                    "--seconds", "25" if not quick else "0.5", "--out", os.path.join(root, "gen"),
                                    "--stage2-steps", "100" if not quick else "3",
                                    "a calm piano piece", "an energetic drum and bass track",
                                    "a jazz reggae concert with a saxophone solo", "a dreamy synth pad"]),
    ]
    for name, cmd in steps:
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        row = {"section": "pipeline", "step": name, "s": time.perf_counter() - t0, "rc": out.returncode}
        if out.returncode != 0:
            row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
        emit(row)
        if out.returncode != 0:
            break
    log = os.path.join(root, "gen", "generations.jsonl")
    if os.path.exists(log):
        recs = [json.loads(line) for line in open(log)]
        r = recs[0]
        emit({"section": "pipeline", "step": "generate.py timings (batch of 4)", "stage1_s": r["stage1_s"],
              "stage2_s": r["stage2_s"], "decode_s": r["decode_s"], "wavs": len(recs),
              "wav_s": sf.info(r["wav"]).duration})


def bench_ddp(root, parts=("1gpu", "2gpu", "resume"), batch=4, steps=14, layers=24, mamba_train=FastOptions.train,
              compile="0", round_number=None, quick=False, grad_accum=1):
    """train.py on 2 GPUs (torchrun, NCCL) against 1, Prefix SiMBA at the paper shape on synthetic
    tokens (30 s, bf16, dropout 0 so that runs differ only by their arithmetic): audio tokens/s at
    the same per-GPU batch, for batch and 2 x batch per GPU (the median of steps 4 on, as train.py
    logs them), peak memory per GPU, the losses of 2 GPUs x batch against 1 GPU x 2 batch, and a
    2-GPU run stopped halfway and resumed against the uninterrupted one. compile: "0" (eager), "1"
    (train.py --compile; its runs' folders end in -compiled) or "graphs" (--compile --cuda-graphs; -graphs).
    Each run's row also gives the 10th and 90th percentiles of its steps' tokens/s: at batch 4 and 8 a step's
    speed follows the host's. round_number: put in every row as "round" (bench.py --rounds: the runs again, in
    turns). The runs go to folders under root; parts "1gpu" and "2gpu" can run in separate calls. grad_accum:
    micro-batches per optimizer step in every run (train.py --grad-accum; folders end in -accumN above 1): the
    processes then all-reduce, and wait for each other, once per grad_accum micro-batches, as in the paper's
    setting (4 x 32)."""
    import csv
    import re
    shape = ["--d-model", "1024", "--d-state", "512", "--headdim", "64", "--n-heads", "8", "--frames", "2584"]
    if quick:  # a CPU smoke test of this function (gloo)
        shape = ["--d-model", "64", "--d-state", "16", "--headdim", "16", "--n-heads", "4", "--frames", "32"]
    flags = {"0": [], "1": ["--compile"], "graphs": ["--compile", "--cuda-graphs"]}
    if compile not in flags:
        raise ValueError(f"bench_ddp: compile {compile!r} is not one of {', '.join(flags)}")
    common = ["--layers", str(layers), *shape, "--grad-accum", str(grad_accum), "--steps", str(steps), "--lr", "1e-4",
              "--warmup", "100", "--dropout", "0", "--eval-every", "0", "--ckpt-every", "1000000",
              "--mamba-train", mamba_train, *flags[compile]]
    tag, said = ddp_tag(compile, grad_accum)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port

    results = {}  # run name -> its row (the 1-GPU ones of an earlier call read from their files)

    def losses(name):  # [] for a run that failed (its row has the error) or wrote none
        path = os.path.join(root, name, "metrics.csv")
        if results.get(name, {}).get("rc", 0) != 0 or not os.path.exists(path):
            return []
        return [float(r["loss"]) for r in csv.DictReader(open(path))]
    rel = lambda a, b: max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=math.nan)  # noqa: E731
    put = lambda row: emit(row if round_number is None else {**row, "round": round_number})  # noqa: E731

    def train(name, gpus, b, *extra):
        cmd = (torchrun if gpus == 2 else [sys.executable]) + [script("train.py"), *common, "--batch-size", str(b),
                                                               "--out", os.path.join(root, name), *extra]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1" if gpus == 2 else "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        row = {"section": "ddp", "run": name, "gpus": gpus, "batch per GPU": b, "grad accum": grad_accum,
               "mamba2": mamba_train, "compile": compile, "rc": out.returncode}
        if out.returncode != 0:
            row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
        elif "--resume" not in extra:
            rows = list(csv.DictReader(open(os.path.join(root, name, "metrics.csv"))))
            tok = sorted(float(r["tokens_per_s"]) for r in rows[3:])  # after the first steps' warm-up
            peaks = [float(g) for g in re.findall(r"peak GPU memory ([0-9.]+) GiB", out.stderr)]
            pick = lambda q: tok[int(q * (len(tok) - 1))] if tok else math.nan  # noqa: E731  (nan: too few steps)
            row.update({"audio tok/s": pick(0.5), "tok/s p10": pick(0.1), "tok/s p90": pick(0.9),
                        "peak GiB per GPU": max(peaks or [math.nan])})
        put(row)
        results[name] = row
        return row

    batches = (batch, 2 * batch)
    if "1gpu" in parts:
        for b in batches:
            row = train(f"1gpu-{b}{tag}", 1, b)
            datamod.atomic_write_text(os.path.join(root, f"1gpu-{b}{tag}.json"), json.dumps(row))
    if "2gpu" in parts:
        for b in batches:
            with open(os.path.join(root, f"1gpu-{b}{tag}.json")) as f:  # (ddp_check: there)
                one = results[f"1gpu-{b}{tag}"] = json.load(f)
            two = train(f"2gpu-{b}{tag}", 2, b)
            put({"section": "ddp", "run": f"2 GPUs / 1 GPU at batch {b} per GPU{said}",
                 "speed-up": two.get("audio tok/s", math.nan) / one.get("audio tok/s", math.nan)})
        put({"section": "ddp", "run": f"losses, 2 GPUs x {batch} vs 1 GPU x {2 * batch}{said}", "max rel diff":
             rel(losses(f"2gpu-{batch}{tag}"), losses(f"1gpu-{2 * batch}{tag}"))})
    if "resume" in parts:
        train(f"2gpu-resumed{tag}", 2, batch, "--stop-after", str(steps // 2))
        train(f"2gpu-resumed{tag}", 2, batch, "--resume")
        put({"section": "ddp", "run": f"2 GPUs, stopped at half and resumed, vs uninterrupted{said}",
             "max rel diff": rel(losses(f"2gpu-resumed{tag}"), losses(f"2gpu-{batch}{tag}")),
             "losses": losses(f"2gpu-resumed{tag}")})


def ddp_tag(compile, grad_accum):
    """The end of bench_ddp's run names for these settings, and the words its rows give them."""
    tag, said = {"0": ("", ""), "1": ("-compiled", ", compiled"), "graphs": ("-graphs", ", CUDA graphs")}[compile]
    if grad_accum > 1:
        tag, said = f"{tag}-accum{grad_accum}", f"{said}, {grad_accum} micro-batches a step"
    return tag, said


def ddp_parts(section):
    """bench_ddp's parts for an --only section: ddp (all), or ddp-1gpu, ddp-2gpu+resume, ..."""
    return section[4:].split("+") if "-" in section else ("1gpu", "2gpu", "resume")


def ddp_check(root, parts, batch, compile, grad_accum, made_before=()):
    """Before any work: one line (exit 2) if root holds a run these parts would make (train.py would refuse
    it, and its old files would be compared as new), or lacks the 1-GPU results a 2-GPU part reads or the
    uninterrupted 2-GPU run that resume compares with. made_before: the paths earlier sections of the same
    call make (they count as made, not as an earlier call's). Returns the paths these parts make."""
    tag, _ = ddp_tag(compile, grad_accum)
    ones, twos = ([f"{g}-{b}{tag}" for b in (batch, 2 * batch)] for g in ("1gpu", "2gpu"))
    made = ((ones + [n + ".json" for n in ones]) * ("1gpu" in parts) + twos * ("2gpu" in parts)
            + [f"2gpu-resumed{tag}"] * ("resume" in parts))
    read = [n + ".json" for n in ones] * ("2gpu" in parts and "1gpu" not in parts) + \
        [f"2gpu-{batch}{tag}"] * ("resume" in parts and "2gpu" not in parts)
    made, read = ([os.path.join(root, n) for n in names] for names in (made, read))
    for path in made:
        if os.path.exists(path) or path in made_before:
            datamod.fail(f"bench.py: --ddp-dir {root} holds {os.path.basename(path)} from an earlier call; pass "
                         "another --ddp-dir")
    for path in read:
        if not (os.path.exists(path) or path in made_before):
            datamod.fail(f"bench.py: --only ddp-{'+'.join(parts)} reads {path}, which an earlier call into this "
                         f"--ddp-dir makes (--only ddp-{os.path.basename(path)[:4]})")
    return set(made)


def bench_cpu(steps=30):
    """What a new user sees first: `python train.py --layers 6` on the synthetic data, this CPU."""
    import shutil
    import tempfile
    import csv
    out_dir = tempfile.mkdtemp(prefix="ssmttm-cpu-")
    shutil.rmtree(out_dir)  # train.py makes its --out folder; the run's files are removed once read
    try:
        out = subprocess.run([sys.executable, script("train.py"), "--layers", "6", "--steps", str(steps),
                              "--device", "cpu", "--out", out_dir, "--eval-every", "0"], capture_output=True, text=True)
        if out.returncode != 0:
            return emit({"section": "cpu", "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]})
        with open(os.path.join(out_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    rows = rows[min(5, len(rows) - 1):]  # after warm-up (--quick: the last of its 5 steps)
    emit({"section": "cpu", "cores": os.cpu_count(), "steps": steps, "threads": torch.get_num_threads(),
          "audio tok/s": sum(float(r["tokens_per_s"]) for r in rows) / len(rows),
          "s/step": float(rows[-1]["elapsed_s"]) / steps, "loss": float(rows[-1]["loss"])})


ROWS, JSON_PATH, HEADER = [], None, {}


def script(name):
    """The path of this repository's script `name` (train.py, ...), which bench.py runs from any folder."""
    return os.path.join(HERE, name)


def json_row(row):
    """A row as JSON holds it: a value that was not measured (NaN: no CUDA peak on the CPU, too few steps)
    as null, since JSON has no NaN and readers other than Python's refuse a file with one."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def emit(row):
    """Rewrite the JSON file with a finished row, then print it, so a run cut short still leaves its numbers."""
    ROWS.append(row)
    if JSON_PATH:  # a kill mid-write leaves the last whole file
        datamod.atomic_write_text(JSON_PATH, json.dumps({"header": HEADER, "rows": [json_row(r) for r in ROWS]},
                                                        indent=1, allow_nan=False))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in json_row(row).items()},
                     allow_nan=False), flush=True)


def print_table(rows):
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    for section, rs in by_section.items():
        keys = [k for k in dict.fromkeys(k for r in rs for k in r) if k != "section"]
        print(f"\n### {section}\n")
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in rs:
            cells = []
            for k in keys:
                v = r.get(k, "")
                cells.append(f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v))
            print("| " + " | ".join(cells) + " |")


def train_runs(variants, batches, compiles, options, rounds):
    """The train section's measurements in order, (round, variant, batch, compile, options): every
    configuration once per round, so that the rounds interleave them and a slow spell of a shared host
    falls on each in turn rather than on one."""
    return [(rnd, *conf) for rnd in range(1, rounds + 1)
            for conf in itertools.product(variants, batches, compiles, options)]


def run_section(section, args, device, train_options):
    """One section of the benchmark, its rows emitted as they finish."""
    n_layers = 2 if args.quick else args.layers
    n_frames = 40 if args.quick else 2584
    batches = [2] if args.quick else args.batches
    if section == "train" and args.rotate:
        for batch, comp in itertools.product(batches, args.compile):
            if args.quick and comp != "0":
                continue
            try:
                rows = bench_train_rotated(rotated_configs(args.variants, train_options), batch,
                                           n_frames, n_layers, comp, args.rotate, device=device)
            except Exception as e:  # report, keep going
                rows = [{"section": "train", "variant": ",".join(args.variants), "batch": batch, "compile": comp,
                         "error": f"{type(e).__name__}: {e}"[:160]}]
            for row in rows:
                emit(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    elif section == "train":
        for rnd, variant, batch, comp, options in train_runs(args.variants, batches, args.compile,
                                                             train_options, args.rounds):
            if args.quick and comp != "0":
                continue
            try:
                row = bench_train(variant, batch, n_frames, n_layers, options, comp, device=device)
            except Exception as e:  # report, keep going
                row = {"section": "train", "variant": variant, "batch": batch, "compile": comp,
                       "mamba2": options.train, "error": f"{type(e).__name__}: {e}"[:160]}
            emit(row if args.rounds == 1 else {**row, "round": rnd})
            if device == "cuda":
                torch.cuda.empty_cache()
    elif section == "profile" and device == "cuda":
        for variant, comp in itertools.product(args.variants, args.compile):
            profile_train(variant, args.batches[0], n_frames, n_layers, comp, train_options[0])
    elif section == "gemms":
        for variant in args.variants:
            bench_gemms(variant, 1 if args.quick else args.batches[0], n_frames, n_layers, device=device)
    elif section == "layer":
        for batch, options in itertools.product([1] if args.quick else args.batches,
                                                train_options + [None] if device == "cuda" else [None]):
            emit(bench_layer(batch, 64 if args.quick else 2650, options, device=device))
    elif section == "decode":
        bench_decoding(device, n_layers, (10, 20) if args.quick else (100, 1000, 2500),
                       args.decode_setups, full_baseline=args.full_baseline)
    elif section == "decode-kernels" and device == "cuda":
        for rows in args.kernel_rows:
            bench_decode_kernels(rows=rows, sweep=args.sweep_configs)
    elif section.startswith("ddp"):  # ddp, or ddp-1gpu / ddp-2gpu for one part
        os.makedirs(args.ddp_dir, exist_ok=True)
        for rnd, comp in itertools.product(range(1, args.rounds + 1), args.compile):
            root = args.ddp_dir if args.rounds == 1 else os.path.join(args.ddp_dir, f"round{rnd}")
            os.makedirs(root, exist_ok=True)
            bench_ddp(root, ddp_parts(section),
                      batch=args.batches[0], steps=args.ddp_steps, layers=n_layers, mamba_train=args.mamba_train[0],
                      compile=comp, round_number=rnd if args.rounds > 1 else None, quick=args.quick,
                      grad_accum=args.ddp_grad_accum)
    elif section == "decode-batch" and device == "cuda":
        bench_decode_batch(n_layers, tuple(args.prompts), modes=args.decode_modes or ("graph", "bf16state+graph"))
    elif section == "decode-profile" and device == "cuda":
        modes = args.decode_modes or ("graph", "nopdl+graph", "bf16state+graph")
        for p, mode in itertools.product(args.prompts, modes):
            profile_decoding(n_layers, mode, prompts=p)
    elif section == "pipeline":
        bench_pipeline(device, quick=args.quick)
    elif section == "stage2":
        bench_stage2(device)
    elif section == "cpu":
        bench_cpu(steps=5 if args.quick else 30)


CUDA_SECTIONS = ("profile", "decode-kernels", "decode-batch", "decode-profile")  # the rest also run --quick
SECTIONS = ("train", "profile", "gemms", "layer", "decode", "decode-batch", "decode-kernels", "decode-profile",
            "stage2", "pipeline", "ddp", "ddp-1gpu", "ddp-2gpu", "ddp-2gpu+resume", "ddp-1gpu+2gpu",
            "cpu")  # ddp-*: some parts


def comma_list(item):
    """An argparse type: comma-separated values, each parsed by item (a type function) or one of the
    collection item; one line naming the flag and the bad value otherwise (data.ArgumentParser)."""
    def parse_one(text):
        if callable(item):
            return item(text)
        if text not in item:
            raise argparse.ArgumentTypeError(f"expected {', '.join(item)} (comma-separated), not {text!r}")
        return text
    return lambda text: [parse_one(part) for part in text.split(",")]


def chunk_size(text):
    """An argparse type: an SSD chunk length the kernels run (FastOptions' rule: a power of two >= 16)."""
    n = datamod.positive_int(text)
    if n < 16 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"a chunk length is a power of two >= 16, not {text!r}")
    return n


def decode_setup(text):
    """An argparse type: VARIANT:MODE, a variant of LAYOUTS and a mode of DECODE_MODES."""
    variant, _, mode = text.partition(":")
    if variant not in LAYOUTS or mode not in DECODE_MODES:
        raise argparse.ArgumentTypeError(f"expected variant:mode with a variant of {', '.join(LAYOUTS)} and a mode of "
                                         f"{', '.join(DECODE_MODES)}, not {text!r}")
    return text


def is_rows_file(path):
    """Whether path holds what --json writes (a JSON object with a header and rows): a rerun may replace it."""
    try:
        with open(path) as f:
            old = datamod.parse_json(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and {"header", "rows"} <= set(old)


def main():
    ap = datamod.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=comma_list(SECTIONS), default="train,layer,decode,stage2",
                    help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test of this script")
    ap.add_argument("--variants", type=comma_list(list(LAYOUTS)), default=",".join(LAYOUTS))
    ap.add_argument("--batches", type=comma_list(datamod.positive_int), default="4,16",
                    help="train, layer: batch sizes; ddp: the first is the batch per GPU (and twice it)")
    ap.add_argument("--compile", type=comma_list(list(COMPILE_MODES)), default="0,1",
                    help="training: 0 eager, 1 torch.compile, graphs torch.compile with CUDA graphs "
                         "(reduce-overhead); comma-separated")
    ap.add_argument("--rounds", type=datamod.positive_int, default=1,
                    help="train, ddp: measure every configuration this many times, in turns (rows get a round key; "
                         "ddp: each round's runs in a folder roundN of --ddp-dir)")
    ap.add_argument("--rotate", type=datamod.positive_int,
                    help="train: build the variants in one process and time this many steps of each, one of each "
                         "in turn (bench_train_rotated), instead of one row after another")
    ap.add_argument("--chunk-sizes", type=comma_list(chunk_size), default="256",
                    help="the SSD kernels' chunk lengths (FastOptions.chunk_size)")
    ap.add_argument("--layers", type=datamod.positive_int, default=24)
    ap.add_argument("--mamba-train", type=comma_list(list(fast.TRAIN_PATHS)), default=FastOptions.train,
                    help="Mamba-2 training paths (FastOptions.train): keep_states, mamba_ssm (mamba-ssm's own "
                         "fused function, which recomputes the conv and the chunk states), split (separate conv "
                         "and SSD ops), grouped (issue 15: ssd_grouped.ssd_grouped)")
    ap.add_argument("--triton-op", type=comma_list(["auto", "0", "1"]), default="auto",
                    help="train, --mamba-train grouped: the Mamba-2 layer as a triton op whose kernels Inductor "
                         "launches, traced under torch.compile, torch.compile'd calls of it eager "
                         "(FastOptions.triton_op; auto: by the rows, fast.triton_op_for, off under CUDA graphs): "
                         "auto, 0, 1, or several")
    ap.add_argument("--fused-add-norm", type=comma_list(["0", "1"]), default="1",
                    help="train: the residual adds inside the norms (FastOptions.fused_add_norm): 0, 1 or both")
    ap.add_argument("--fused-gelu-dropout", type=comma_list(["0", "1"]), default="1",
                    help="train: the feed-forward's GELU and dropout in one kernel each way "
                         "(FastOptions.fused_gelu_dropout): 0, 1 or both")
    ap.add_argument("--fused-residual-dropout", type=comma_list(["0", "1"]), default="1",
                    help="train, with --fused-add-norm 1: each sublayer's output dropout inside the add + norm "
                         "kernel (FastOptions.fused_residual_dropout): 0, 1 or both")
    ap.add_argument("--decode-setups", type=comma_list(decode_setup),
                    default=",".join(DECODE_SETUPS),
                    help=f"variant:mode pairs for the decode section (modes: {', '.join(DECODE_MODES)})")
    ap.add_argument("--decode-modes", type=comma_list(list(DECODER_MODES)),
                    help="decode-batch, decode-profile: modes of DECODE_MODES that run a fast.Decoder (not plain "
                         "or recompute; default: graph,bf16state+graph; the profile also nopdl+graph)")
    ap.add_argument("--sweep-configs", action="store_true", help="decode-kernels: also every linear_rows launch shape")
    ap.add_argument("--kernel-rows", type=comma_list(datamod.whole_number(1, 128)), default="2",
                    help="decode-kernels: rows per call, at most 128 (2 = one prompt with guidance)")
    ap.add_argument("--prompts", type=comma_list(datamod.positive_int), default="1,4,16,64",
                    help="decode-batch, decode-profile: prompts decoded at once (2 rows each)")
    ap.add_argument("--ddp-dir", default="runs/bench-ddp", help="ddp: where its training runs go")
    # fewer than 4 steps: no tokens/s (nan), and 1 step "resumed" from step 0 (--stop-after 0), comparing nothing
    ap.add_argument("--ddp-steps", type=datamod.whole_number(4), default=14,
                    help="ddp: steps per training run, at least 4 (tokens/s: the median of steps 4 on)")
    ap.add_argument("--ddp-grad-accum", type=datamod.positive_int, default=1,
                    help="ddp: micro-batches per step (train.py --grad-accum) in every run; the paper's is 32")
    ap.add_argument("--full-baseline", action="store_true", help="also time the recompute baseline for 25 s")
    ap.add_argument("--json", type=datamod.path_name, help="also write the rows to this file")
    args = ap.parse_args()
    triton_op = {"auto": None, "0": False, "1": True}
    train_options = list(dict.fromkeys(  # the other paths have no triton op: once each
        FastOptions(train=path, triton_op=triton_op[op] if path == "grouped" else None, chunk_size=chunk,
                    fused_add_norm=bool(int(fused)), fused_gelu_dropout=bool(int(gd)),
                    fused_residual_dropout=bool(int(rd)))
        for path in args.mamba_train for op in args.triton_op for chunk in args.chunk_sizes
        for fused in args.fused_add_norm for gd in args.fused_gelu_dropout for rd in args.fused_residual_dropout
        if path == "grouped" or op != "1"))
    if not train_options:
        datamod.fail("bench.py: --triton-op 1 is the grouped path's: pass --mamba-train grouped too")
    if args.rotate and args.rounds > 1:
        datamod.fail("bench.py: --rotate already takes the variants in turn; "
                     "--rounds is for rows timed one after another")
    if args.json is not None:  # checked before any work: the rows are written after each section
        folder = os.path.dirname(args.json) or "."
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            datamod.fail(f"bench.py: --json {args.json}: cannot write this file (a folder, or its folder is missing "
                         "or takes no new files)")
        if os.path.exists(args.json) and not is_rows_file(args.json):
            datamod.fail(f"bench.py: --json {args.json}: exists and is not a file of bench.py's rows; give a new name")
        try:  # the write itself, of its temporary file (atomic_write_text's): as root, os.access says yes to all
            with open(args.json + ".tmp", "w"):
                pass
            os.remove(args.json + ".tmp")
        except OSError as e:
            datamod.fail(f"bench.py: --json {args.json}: cannot write it ({e.filename}: {e.strerror.lower()})")
    if any(section.startswith("ddp") for section in args.only):
        datamod.check_out_folder(args.ddp_dir, "--ddp-dir")
        made = set()  # in the order the sections run: a later one may read what an earlier one makes
        for section in (s for s in args.only if s.startswith("ddp")):
            for rnd, comp in itertools.product(range(1, args.rounds + 1), args.compile):
                made |= ddp_check(args.ddp_dir if args.rounds == 1 else os.path.join(args.ddp_dir, f"round{rnd}"),
                                  ddp_parts(section), args.batches[0], comp, args.ddp_grad_accum, made)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.quick and args.only != ["cpu"]:
        datamod.fail("bench.py: no CUDA device; use --quick for a CPU smoke run or --only cpu")
    cuda_only = [s for s in args.only if s in CUDA_SECTIONS]
    if device == "cpu" and cuda_only:  # asked for by name (none is in --only's default): say so, not skip it
        datamod.fail(f"bench.py: --only {','.join(cuda_only)}: CUDA sections, and "
                     + ("--quick runs on the CPU" if args.quick else "there is no CUDA device"))
    if args.quick and any(c != "0" for c in args.compile) and "train" in args.only:
        print("bench.py --quick: the train section's eager rows only (compiling on the CPU would take minutes)",
              file=sys.stderr)
    sections = args.only
    global JSON_PATH
    JSON_PATH = args.json
    HEADER.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, python=platform.python_version(),
                  device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu")
    try:
        import mamba_ssm
        HEADER["mamba_ssm"] = mamba_ssm.__version__
    except Exception:
        HEADER["mamba_ssm"] = "not installed"
    print(json.dumps(HEADER))
    for section in sections:
        run_section(section, args, device, train_options)
    print_table(ROWS)


if __name__ == "__main__":
    datamod.run_command(main, "bench.py", resumes=False)
