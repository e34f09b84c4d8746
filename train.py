"""Train ssmttm: a plain loop, one file.

    python train.py --layers 6                          # Prefix SiMBA on the built-in synthetic data
    python train.py --data data/jamendo --layers 24     # the paper's setting on preprocessed real data
    python train.py --data data/jamendo --stage 2       # the stage-2 diffusion model (codebooks 2..9)
    python train.py --init-from runs/x/ckpt.pt --data data/mine --out runs/mine --lr 2e-5   # fine-tune
    torchrun --nproc_per_node 4 train.py --data ...     # several GPUs (DDP, NCCL; gloo on CPU)

Every setting left unset comes from a preset: the paper's (AdamW 1e-4, weight decay 0.02, betas
0.9/0.999, cosine schedule after 100 warm-up steps, batch 4 x 32 accumulation, dropout 0.3, clip
1.0, 30 s clips, d_model 1024, d_state 512) with --data, or a small demo of it on the synthetic set
(see SYNTHETIC below) so that it visibly learns in minutes on a laptop CPU. A summary of the run is
printed, and the resolved settings are saved to OUT/config.json.

On CUDA with mamba-ssm and causal-conv1d installed, the Mamba-2 layers train on their kernels
(fast.accelerate; --mamba-train picks which, --no-kernels keeps the plain ssd_reference path). The
weights are the same.

OUT/ckpt.pt holds the model config, weights, optimizer, scheduler, step and RNG states (written to
a temporary file, then renamed); --resume continues exactly where it stopped. --init-from starts a
new run from another run's weights only (a fresh optimizer and schedule, step 0). OUT/metrics.csv logs
step, loss, lr, grad norm, audio tokens/s, elapsed seconds (a resumed run's counted on from its checkpoint's)
and, on the synthetic set, the caption score of samples.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as datamod
import fast
import stage2
from ssmttm import (LAYOUTS, SPECIAL, ModelConfig, TextToMusicLM, check_integer, delay_pattern,
                    pad_text)

PAPER = dict(batch_size=4, grad_accum=32, lr=1e-4, warmup=100, steps=100_000, dropout=0.3, d_model=1024,
             d_state=512, headdim=64, n_heads=8, frames=datamod.CLIP_FRAMES, eval_every=0, ckpt_every=1000,
             clips_per_track=1)
SYNTHETIC = dict(batch_size=16, grad_accum=1, lr=1e-3, warmup=30, steps=300, dropout=0.1, d_model=256,
                 d_state=64, headdim=32, n_heads=4, frames=128, eval_every=100, ckpt_every=100)
RUNTIME = {"steps", "stop_after", "device", "eval_every", "ckpt_every", "log_every", "compile", "cuda_graphs",
           "no_kernels", "mamba_train", "triton_op", "no_fused_add_norm", "no_fused_gelu_dropout",
           "no_fused_residual_dropout", "t5", "dac"}
# RUNTIME flags that a resumed run does not take from the checkpoint: --stop-after counts this invocation's
# steps, and the on/off switches (store_true) could not be turned off again if they were kept
THIS_INVOCATION = {"stop_after", "cuda_graphs", "compile", "no_kernels", "no_fused_add_norm", "no_fused_gelu_dropout",
                   "no_fused_residual_dropout"}
# Flags of the stage-1 LM alone; stage 2's model is fixed by its config (stage2.Stage2Config)
STAGE1_ONLY = {"variant", "layers", "codebooks", "d_model", "d_state", "headdim", "n_heads", "dropout", "no_kernels",
               "mamba_train", "triton_op", "no_fused_add_norm", "no_fused_gelu_dropout", "no_fused_residual_dropout"}
METRICS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "caption_score"]


def parse_args(argv=None, prog="train.py"):
    """The settings: flags, then the preset for those left unset. A bad value stops here with one
    line naming the flag and exit code 2 (data.ArgumentParser), "PROG: error: ...": evaluate.py passes
    its own name for the flags it trains with, which its user typed to evaluate.py, not to train.py."""
    ap = datamod.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # sizes and counts past int32 overflowed in numpy and torch (OverflowError tracebacks); none is meant
    count, at_least_0 = datamod.whole_number(1, 2**31 - 1), datamod.whole_number(0)
    probability = datamod.number(0, 1, hi_open=True)  # 1 would drop everything
    ap.add_argument("--data", type=datamod.path_name,
                    help="preprocessed folder from data.py (default: the synthetic set)")
    ap.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: the LM; 2: the diffusion model")
    ap.add_argument("--variant", choices=list(LAYOUTS), default="prefix_simba")
    ap.add_argument("--layers", type=count, default=24, help="LM blocks N (paper: 24; RQ3: 12, 6)")
    ap.add_argument("--codebooks", type=int, choices=[1, 9], default=1, help="1: coarse stage 1; 9: single stage")
    ap.add_argument("--steps", type=count, help="optimizer steps in all")
    ap.add_argument("--batch-size", type=count, help="sequences per micro-batch, per process")
    ap.add_argument("--grad-accum", type=count, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=datamod.number(0, 1, lo_open=True))
    ap.add_argument("--warmup", type=at_least_0, help="linear warm-up steps before the cosine decay")
    ap.add_argument("--weight-decay", type=datamod.number(0, 1), default=0.02)
    ap.add_argument("--grad-clip", type=datamod.number(0, lo_open=True), default=1.0,
                    help="the largest gradient norm (a large value, e.g. 1e9, leaves the gradients as they are)")
    ap.add_argument("--dropout", type=probability)
    ap.add_argument("--cfg-dropout", type=probability, help="probability that a caption is replaced by the null "
                    "condition, for classifier-free guidance (default 0.1 for stage 1, 0.2 for stage 2)")
    ap.add_argument("--d-model", type=count)
    ap.add_argument("--d-state", type=count)
    ap.add_argument("--headdim", type=count, help="Mamba-2 head size (2 d_model / headdim heads)")
    ap.add_argument("--n-heads", type=count, help="attention heads")
    ap.add_argument("--frames", type=count, help="frames per training sequence (30 s = 2584)")
    ap.add_argument("--clips-per-track", type=at_least_0,
                    help="--data: train on at most this many 30 s clips of each audio file, drawn at random with "
                         "--seed (default 1, as the paper; 0: every clip)")
    ap.add_argument("--out", help="run folder (default: runs/stage1-<variant>-<N>L-k<K> or runs/stage2, with "
                                  "-synthetic appended without --data)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--init-from", metavar="CKPT", type=datamod.path_name,
                    help="start a new run (in its own --out) from this checkpoint's model weights, not its "
                         "optimizer, schedule or step: fine-tuning. The architecture comes from the checkpoint; "
                         "the training settings (steps, lr, data, ...) from the command line and the preset")
    ap.add_argument("--stop-after", type=at_least_0,
                    help="stop (with a checkpoint) after this many steps of this invocation")
    ap.add_argument("--seed", type=datamod.SEED, default=0)
    ap.add_argument("--device", type=datamod.device_name, default="auto", help="auto, cpu, cuda")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model: it takes minutes to compile, then each step is faster "
                         "(BENCHMARKS.md)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --compile, on CUDA (one GPU, or one per process under torchrun): torch.compile's "
                         "reduce-overhead mode, which replays each forward and backward as CUDA graphs instead of "
                         "launching its kernels from Python; it pays where launching is the step's bottleneck, as "
                         "at the paper's batch 4 (BENCHMARKS.md). Under torchrun DDP all-reduces the gradients "
                         "outside the graphs, after each backward. Not kept on --resume: pass it again")
    ap.add_argument("--no-kernels", action="store_true",
                    help="on CUDA, train on the plain model (ssd_reference) instead of mamba-ssm's kernels")
    ap.add_argument("--mamba-train", choices=fast.TRAIN_PATHS,
                    default=fast.FastOptions.train,
                    help="on CUDA, Mamba-2's training kernels (fast.FastOptions.train; grouped: ssd_grouped.py's SSD)")
    ap.add_argument("--triton-op", choices=["auto", "on", "off"], default="auto",
                    help="on CUDA, --mamba-train grouped: the Mamba-2 layer as a triton op whose kernels Inductor "
                         "launches, with --compile traced into the model's graph, eager as torch.compile'd calls of "
                         "it: about half the host time, more GPU time (fast.FastOptions.triton_op); faster where the "
                         "host is the bound, as at the paper's batch 4, slower at batch 16; auto: on for at most "
                         f"{fast.TRITON_OP_ROWS} positions a batch (fast.triton_op_for; BENCHMARKS.md)")
    ap.add_argument("--no-fused-add-norm", action="store_true",
                    help="on CUDA: the plain residual adds and norms instead of one kernel for each add and "
                         "the next norm (fast.FastOptions.fused_add_norm)")
    ap.add_argument("--no-fused-gelu-dropout", action="store_true",
                    help="on CUDA: the feed-forward's plain GELU and dropout instead of one kernel each way "
                         "(fast.FastOptions.fused_gelu_dropout)")
    ap.add_argument("--no-fused-residual-dropout", action="store_true",
                    help="on CUDA: torch's dropout on each sublayer's output instead of a mask drawn inside the add "
                         "+ norm kernel (fast.FastOptions.fused_residual_dropout)")
    ap.add_argument("--t5", default="google/flan-t5-base", type=datamod.path_name,
                    help="Flan-T5 name or local folder (real data)")
    ap.add_argument("--dac", type=datamod.path_name,
                    help="DAC name or local folder (stage 2, real data; default: the one data.py encoded "
                         "--data with, from its meta.json)")
    ap.add_argument("--eval-every", type=at_least_0,
                    help="steps between caption-score evaluations (synthetic set; 0: none)")
    ap.add_argument("--ckpt-every", type=count, help="steps between checkpoints (one is also written at the end)")
    ap.add_argument("--log-every", type=count, default=1, help="steps between rows of metrics.csv")
    args = ap.parse_args(argv)
    for action in ap._actions:  # parsed again without defaults: the flags typed, even at their default value
        action.default = argparse.SUPPRESS
    given = set(vars(ap.parse_args(argv)))
    if args.stage == 2 and given & STAGE1_ONLY:
        ap.error(f"--stage 2: {', '.join('--' + k.replace('_', '-') for k in sorted(given & STAGE1_ONLY))} "
                 "set the stage-1 LM; stage 2's diffusion model takes none of them")
    if args.clips_per_track is not None and not args.data:
        ap.error("--clips-per-track: the synthetic set has no tracks; it is for --data")
    # the checkpoint keeps them, and a run resumed from another working directory reads or compares them
    if args.data:
        args.data = os.path.abspath(args.data)
    if args.init_from:
        args.init_from = os.path.abspath(args.init_from)
    preset = PAPER if args.data else SYNTHETIC
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.dac is None:
        args.dac = datamod.data_codec(args.data) if args.data else datamod.DEFAULT_DAC
    # the checkpoint keeps them, and generate.py reads them from another working directory
    args.t5, args.dac = datamod.model_location(args.t5), datamod.model_location(args.dac)
    if args.cfg_dropout is None:
        args.cfg_dropout = 0.1 if args.stage == 1 else 0.2
    if args.out is None:
        name = f"stage1-{args.variant}-{args.layers}L-k{args.codebooks}" if args.stage == 1 else "stage2"
        args.out = os.path.join("runs", name + ("" if args.data else "-synthetic"))
    datamod.check_out_folder(args.out)
    args.data_rows = None  # not a flag: load_data sets it for a new run, resume_or_start from the checkpoint
    rules = width_rules(args)
    broken = [(flag, m, why) for flag, m, why in rules if args.d_model % m]
    if args.stage == 1 and broken:
        multiple = math.lcm(*(m for _, m, _ in rules))
        typed = [(flag, m, why) for flag, m, why in broken if flag in given and flag != "d_model"]
        if typed and "d_model" not in given:  # the head size or count typed is the culprit, not the default width
            flag, m, why = typed[0]
            others = "; ".join(w for f, _, w in rules if f != flag)
            ap.error(f"argument --{flag.replace('_', '-')}: {getattr(args, flag)} does not split d_model "
                     f"{args.d_model} for {args.variant} ({why}); pass --d-model a multiple of {multiple}"
                     + (f" ({others})" if others and multiple != m else ""))
        ap.error(f"argument --d-model: expected a multiple of {multiple} for {args.variant} "
                 f"({'; '.join(why for _, _, why in rules)}), not {args.d_model}")
    return args, given


def width_rules(args):
    """[(flag, m, why)]: d_model must be a multiple of each m: for the variant's layers to split it into
    heads (m set by the flag, headdim or n_heads), and even for the sinusoidal positions (named only
    where no head split asks for an even width already)."""
    layout, splits = LAYOUTS[args.variant], []
    if "mamba" in layout:
        expand = ModelConfig.expand
        splits.append(("headdim", args.headdim // math.gcd(args.headdim, expand),
                       f"Mamba-2 splits {expand} x d_model channels into heads of {args.headdim}"))
    if {"self_attn", "cross_attn"} & set(layout):
        splits.append(("n_heads", args.n_heads, f"attention splits d_model into {args.n_heads} heads"))
    if all(m % 2 for _, m, _ in splits):
        splits.append(("d_model", 2, "the sinusoidal positions are its cos and sin halves"))
    return splits


# ------------------------------------------------------------------------------------------------
# What each step reads: pure functions of (seed, step), so that a resumed run reads what an
# uninterrupted one would, and W processes with batch b read what one process with batch W*b would.


def lr_at(step, args):
    """Linear warm-up, then cosine decay to zero at args.steps. With args.warmup >= args.steps the run
    ends inside the warm-up: the rate only rises, to lr * args.steps / args.warmup (main notes it)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step, micro, args, rank, world, n_examples):
    """Example indices of one micro-batch of one process, and the epoch each is read in (a clip
    with several captions gets caption epoch % count, so every caption is used). The dataset is
    read in a new permutation each epoch; the endless synthetic set has one epoch."""
    first = ((step * args.grad_accum + micro) * world + rank) * args.batch_size
    positions = np.arange(first, first + args.batch_size)
    if n_examples is None:
        return positions, np.zeros_like(positions)
    # 0 divided by zero (an IndexError from an empty permutation), a float failed in numpy's seeding
    check_integer("batch_indices: n_examples", n_examples, least=1)
    epoch = positions // n_examples
    return np.array([np.random.default_rng([args.seed, e]).permutation(n_examples)[p % n_examples]
                     for e, p in zip(epoch, positions)]), epoch


def caption_keep(step, micro, args, rank, world):
    """True where a sequence keeps its caption (else: the null condition), per global position: one
    draw per sequence of the step, in batch_indices' order, so that the step drops the same captions
    however it is split into processes and micro-batches."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009)
    keep = torch.rand(args.grad_accum * world * args.batch_size, generator=g) >= args.cfg_dropout
    first = (micro * world + rank) * args.batch_size
    return keep[first:first + args.batch_size]


# ------------------------------------------------------------------------------------------------
# Setting up a run


def setup_processes(args):
    """One process per GPU under torchrun (or gloo processes on CPU), else just this one.
    Returns (world size, rank, device)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = args.device = datamod.resolve_device(args.device)
    if world > 1:
        if device == "cuda":  # the GPU first, so that NCCL binds this process to it
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    return world, rank, device


def resume_or_start(args, given, world):
    """The checkpoint to continue (--resume), or None for a new run. A resumed run takes its
    settings from the checkpoint; only the RUNTIME flags may change. Stops (one line, exit code 2)
    if --out holds a run and --resume is not given, the checkpoint cannot be read, or it was saved by
    another number of processes (`world` now): the data each reads and the RNG states are per process."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    check_run_folder(args)
    if not args.resume:
        return None
    ckpt = load_checkpoint(ckpt_path)
    saved_world = len(ckpt["rng"])  # one RNG state per process
    if saved_world != world:
        datamod.fail(f"--resume: {ckpt_path} was saved by {saved_world} process{'es' * (saved_world != 1)} and this "
                     f"run has {world}; resume it with as many (torchrun --nproc_per_node {saved_world})")
    # a run saved before these trained on every clip, and on the clips its folder held at each start
    saved = {"clips_per_track": 0, "data_rows": None, **ckpt["args"]}
    def kind(value):
        return datamod.JSON_KINDS.get(type(value), type(value).__name__)
    wrong = next((k for k, v in saved.items()  # a setting edited to another type would fail deep in the run
                  if v is not None and getattr(args, k, None) is not None and kind(v) != kind(getattr(args, k))), None)
    if wrong:
        datamod.fail(f"{ckpt_path}: a damaged checkpoint: its args' {wrong} is {saved[wrong]!r}, not "
                     f"{kind(getattr(args, wrong))}")
    if saved.get("stage") == 2 and given & STAGE1_ONLY:  # (its stage-1 flags hold parse_args' defaults)
        datamod.fail(f"--resume: {', '.join('--' + k.replace('_', '-') for k in sorted(given & STAGE1_ONLY))} set "
                     f"the stage-1 LM; {ckpt_path} is stage 2's diffusion model, which takes none of them")
    changed = [k for k in given if k not in RUNTIME | {"resume", "out"}
               and same_path(k, saved.get(k)) != same_path(k, getattr(args, k))]
    if changed:
        flags = lambda values: ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in zip(changed, values))
        datamod.fail(f"--resume: {flags(getattr(args, k) for k in changed)} "
                     f"{'differs' if len(changed) == 1 else 'differ'} from the checkpoint's "
                     f"{flags(saved.get(k) for k in changed)}; only {', '.join(sorted(RUNTIME))} can change on resume")
    for k, v in saved.items():
        if k not in THIS_INVOCATION | {"out"} and not (k in given and k in RUNTIME):  # --out: where the run is now
            setattr(args, k, v)
    args.t5, args.dac = datamod.model_location(args.t5), datamod.model_location(args.dac)  # as parse_args does
    args.resume = True
    return ckpt


def same_path(key, value):
    """A setting as resume compares it: --data and --init-from as absolute paths, so that a folder typed
    again as ./data, data or /home/me/data is the same (a checkpoint saved before 2026-12-06 keeps them
    as typed, taken from this working directory)."""
    return os.path.abspath(value) if key in ("data", "init_from") and isinstance(value, str) else value


def check_run_folder(args):
    """One line, exit code 2, unless --out suits the run: a checkpoint to continue for --resume; for a
    new run, no checkpoint (pass --resume to continue it) and nothing but a run's files."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        if not os.path.exists(ckpt_path):
            datamod.fail(f"--resume: no checkpoint at {ckpt_path}")
    else:
        if os.path.exists(ckpt_path):
            datamod.fail(f"{ckpt_path} exists: pass --resume to continue it, or --out to start another run")
        check_new_run_folder(args.out)


# What a run folder holds before its first checkpoint (a run stopped early), temporary files included
RUN_FILES = {"config.json", "metrics.csv", "ckpt.pt.tmp", "config.json.tmp", "metrics.csv.tmp", ".lock"}


def check_new_run_folder(out):
    """One line, exit code 2, unless out is new, empty, or a run folder without a checkpoint (a run
    stopped before its first one, which a new run replaces): a new run writes config.json and
    metrics.csv there, and must not overwrite another program's files."""
    if not os.path.isdir(out):
        return
    others = sorted(set(os.listdir(out)) - RUN_FILES)
    config = os.path.join(out, "config.json")
    if not others and os.path.isfile(config):
        try:
            with open(config) as f:
                saved = datamod.parse_json(f.read())
            others = [] if isinstance(saved, dict) and {"args", "model"} <= set(saved) else ["config.json"]
        except (OSError, ValueError):
            others = ["config.json"]
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        datamod.fail(f"--out {out}: holds files that are not a train.py run's ({listed}); pass a new or empty folder")


def read_metrics(path, step):
    """The rows of a run's metrics.csv up to `step` (dicts of METRICS' names), for a resumed run to
    keep; a last line without its newline was cut by a crash and does not count. One line naming the
    file, exit code 2, if it cannot be read or a whole row is not one of train.py's."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        datamod.fail(f"{path}: cannot read it ({getattr(e, 'strerror', None) or type(e).__name__}); move it away "
                     "to resume without the earlier rows")
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = []
    for n, row in enumerate(csv.DictReader(lines), 2):
        try:
            valid = None not in row and None not in row.values()  # as many fields as the header
            row_step, _ = int(row["step"]), float(row["loss"])
            _ = [float(v) for k, v in row.items() if k in METRICS and v != ""]  # the others numbers or empty
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            datamod.fail(f"{path}:{n}: not a row of train.py's metrics; move the file away to resume without "
                         "the earlier rows")
        if row_step <= step:
            rows.append(row)
    return rows


def load_checkpoint(path, keys=("model", "optimizer", "scheduler", "step", "rng", "args"), flag=""):
    """A train.py checkpoint, read on the CPU; one line naming the file (and flag) with exit code 2
    if it is missing, cannot be read, or lacks one of keys."""
    where = f"{flag} {path}".strip()
    problem = datamod.file_problem(path)
    if problem:
        datamod.fail(f"{where}: checkpoint {problem}" if problem == "not found" else f"{where}: {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a cut or damaged file: pickle, zip and torch errors of every kind
        datamod.fail(f"{where}: not a readable checkpoint ({type(e).__name__}: {datamod.first_line(e)})")
    missing = set(keys) - set(ckpt) if isinstance(ckpt, dict) else set(keys)
    if missing:
        datamod.fail(f"{where}: not a train.py checkpoint (no {', '.join(sorted(missing))})")
    problem = datamod.checkpoint_problem(ckpt)
    if problem:
        datamod.fail(f"{where}: a damaged checkpoint: {problem}")
    return ckpt


# flag of an LM architecture setting -> its ModelConfig field; with --init-from they come from the checkpoint
ARCHITECTURE = {"variant": "variant", "layers": "n_layers", "d_model": "d_model", "d_state": "d_state",
                "codebooks": "n_codebooks", "headdim": "headdim", "n_heads": "n_heads"}
TRAINING_ONLY = {"dropout", "chunk_size"}  # ModelConfig fields a fine-tuning run may set otherwise


def init_from(args, given):
    """--init-from CKPT for a new run: the checkpoint whose weights it starts from. Its architecture
    becomes this run's (args.variant, layers, d_model, ... for stage 1); the training settings stay
    as given or preset. BadInput (one line, exit 2) without --out, for a checkpoint that cannot be
    read, of the other stage, an architecture flag that disagrees with it, or a text encoder or
    codec of another kind than this run's data uses."""
    flag = f"--init-from {args.init_from}"
    if "out" not in given:
        datamod.fail(f"{flag}: give the new run its own folder with --out")
    src = load_checkpoint(args.init_from, ("kind", "config", "model", "step", "text_encoder"), "--init-from")
    if src["kind"] not in ("stage1", "stage2"):
        datamod.fail(f"{flag}: not an ssmttm checkpoint (kind {src['kind']!r})")
    if src["kind"] != f"stage{args.stage}":
        datamod.fail(f"{flag} is a {src['kind'].replace('stage', 'stage-')} checkpoint; this run is stage "
                     f"{args.stage} (--stage {src['kind'][-1]} to fine-tune it)")
    datamod.make_config(ModelConfig if args.stage == 1 else stage2.Stage2Config, src["config"], flag)
    if args.stage == 1:
        for name, field in ARCHITECTURE.items():
            if name in given and getattr(args, name) != src["config"][field]:
                datamod.fail(f"{flag}: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                             f"{field} = {src['config'][field]}; the architecture comes from the checkpoint")
            setattr(args, name, src["config"][field])
    text = "t5" if args.data else "words"
    if src["text_encoder"]["kind"] != text:
        datamod.fail(f"{flag}: trained with the {src['text_encoder']['kind']!r} text encoder; this run's data "
                     f"({args.data or 'synthetic'}) uses {text!r}")
    codec = codec_spec(args)
    if codec is not None and (src.get("codec") or {}).get("kind") != codec["kind"]:
        datamod.fail(f"{flag}: its codec is {src.get('codec')}; this run's data uses {codec}")
    # Another T5 or DAC of the same kind and width gives states or latents the weights were not trained
    # on; the same model in another place is also another name, so this is said, not refused.
    for what, theirs, ours in (("text encoder", src["text_encoder"].get("name"), args.t5 if text == "t5" else None),
                               ("DAC", (src.get("codec") or {}).get("name"), (codec or {}).get("name"))):
        if ours is not None and theirs is not None and theirs != ours:
            print(f"note: {flag} was trained with the {what} {theirs}; this run uses {ours} (fine if it is the same "
                  "model in another place)", file=sys.stderr)
    args.init_from_step = src["step"]  # recorded with the run's settings (config.json, ckpt.pt)
    return src


def check_source_config(src, model_config, args):
    """BadInput unless the --init-from checkpoint's config is this run's model config (a dict, as
    model_config_of gives it), but for TRAINING_ONLY fields."""
    differ = sorted(k for k in set(model_config) | set(src["config"])
                    if k not in TRAINING_ONLY and model_config.get(k) != src["config"].get(k))
    if differ:
        datamod.fail(f"--init-from {args.init_from}: the model config differs from this run's in "
                     + ", ".join(f"{k} ({src['config'].get(k)} vs {model_config.get(k)})" for k in differ))


def load_source_weights(src, model, model_config, args):
    """Put the --init-from checkpoint's weights (and, for stage 2, its latent statistics, which
    its weights were trained with) into the new model. BadInput if the configs disagree."""
    check_source_config(src, model_config, args)
    datamod.load_weights(model, src["model"], f"--init-from {args.init_from}")


def load_data(args, device, world, rank=0):
    """The dataset, its size (None: endless), the text encoder and the frames per sequence. A new run
    fixes args.data_rows, the clips the folder holds now (as rank 0 reads them), so that a resumed run,
    and every process, reads the same examples in the same order while data.py adds clips."""
    if args.data:
        if args.data_rows is None:
            if args.resume and rank == 0:  # a checkpoint saved before runs kept their clips' count: nothing to restore
                print(f"note: {args.out}/ckpt.pt does not say how many clips its run began with; it goes on with "
                      f"those {args.data} holds now", file=sys.stderr)
            rows = [datamod.committed_rows(datamod.committed_clips(args.data)[0])]
            if world > 1:
                dist.broadcast_object_list(rows, src=0)
            args.data_rows = rows[0]
        dataset = datamod.TokenDataset(args.data, args.clips_per_track, args.seed, rows=args.data_rows)
        width = ModelConfig.d_text if args.stage == 1 else stage2.Stage2Config.d_text  # what text_proj reads
        text_encoder = datamod.T5TextEncoder(args.t5, device=device, width=width)
        print(f"{args.data}: {len(dataset)} clips of {dataset.tracks} audio files"
              + (f", at most {args.clips_per_track} of each" if args.clips_per_track else ""), file=sys.stderr)
        return dataset, len(dataset), text_encoder, min(args.frames, dataset.n_frames)
    dataset = datamod.SyntheticMusic(n_frames=args.frames, seed=args.seed)
    return dataset, None, datamod.WordEncoder(device=device), args.frames


def triton_op_option(args):
    """FastOptions.triton_op from --triton-op: None for auto, and for the other training paths (which have no
    triton op) unless asked; a checkpoint saved before the flag took auto/on/off holds False or True."""
    value = {"auto": None, "on": True, "off": False, True: True, False: None}[args.triton_op]
    return value if args.mamba_train == "grouped" or value else None


def fast_options(args):
    """The training kernels' fast.FastOptions that the flags choose: --mamba-train, --triton-op, the
    --no-fused-* switches, and --cuda-graphs (fast.for_cuda_graphs)."""
    options = fast.FastOptions(train=args.mamba_train, triton_op=triton_op_option(args),
                               fused_add_norm=not args.no_fused_add_norm,
                               fused_gelu_dropout=not args.no_fused_gelu_dropout,
                               fused_residual_dropout=not args.no_fused_residual_dropout)
    return fast.for_cuda_graphs(options) if args.cuda_graphs else options


def lm_config(args):
    """The stage-1 LM's ModelConfig from the flags (feed-forward 2 x --d-model wide)."""
    return ModelConfig(variant=args.variant, n_layers=args.layers, d_model=args.d_model, d_state=args.d_state,
                       headdim=args.headdim, n_heads=args.n_heads, d_ff=2 * args.d_model, dropout=args.dropout,
                       n_codebooks=args.codebooks)


def stage2_config(args):
    """Stage 2's Stage2Config: the full one for --data, the small one for the synthetic set."""
    return stage2.Stage2Config(**({} if args.data else stage2.Stage2Config.small()))


def model_config_of(args):
    """The config of the model that build_model makes for args.stage, as a dict (what the checkpoint
    stores), from the flags alone: nothing is built."""
    return asdict(stage2_config(args) if args.stage == 2 else lm_config(args))


def build_model(args, device):
    """The model of args.stage on device, and its config as a dict (what the checkpoint stores).
    Stage 2 gets its codec (the synthetic set's or DAC). On CUDA, stage 1's Mamba-2 layers run on
    the kernels when they are installed (fast.accelerate), unless --no-kernels."""
    if args.stage == 2:
        cfg = stage2_config(args)
        model = stage2.Stage2Diffusion(cfg).to(device)
        model.attach_codec(datamod.load_codec(codec_spec(args), device, args.dac))
        return model, asdict(cfg)
    cfg = lm_config(args)
    model = TextToMusicLM(cfg).to(device)
    if device.startswith("cuda") and not args.no_kernels:
        if fast.available():
            fast.accelerate(model, fast_options(args))
        else:
            print("note: mamba-ssm and causal-conv1d are not installed, so Mamba-2 trains on ssd_reference "
                  "(slow); pip install -r requirements-gpu.txt --no-build-isolation", file=sys.stderr)
    return model, asdict(cfg)


def device_memory(device):
    """Bytes of memory on device ("cpu", "cuda", "cuda:N"): the GPU's total, or the machine's physical
    memory; None where the system does not say."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def check_model_fits(args, device):
    """One line, exit code 2, before any work: a stage-1 model whose fp32 weights, gradients and
    AdamW's two moments (16 bytes a parameter, activations not counted) exceed device_memory, as a
    mistyped --layers 2400 would; it filled memory or ended in a C++ allocator's traceback. The
    blocks are alike, so the count comes from models of 1 and 2 blocks on the meta device (no memory)."""
    if args.stage != 1:
        return
    cfg = lm_config(args)
    with torch.device("meta"):
        one, two = (sum(p.numel() for p in TextToMusicLM(replace(cfg, n_layers=n)).parameters()) for n in (1, 2))
    count = one + (args.layers - 1) * (two - one)
    memory = device_memory(device)
    if memory is not None and 16 * count > memory:
        datamod.fail(f"--layers {args.layers} at --d-model {args.d_model}: {count:,} parameters need "
                     f"{16 * count / 2**30:,.1f} GiB for the weights, gradients and AdamW's moments alone, more than "
                     f"{device}'s {memory / 2**30:,.1f} GiB; fewer --layers or a smaller --d-model")


def check_models(args, given):
    """One line, exit code 2, before any work (nothing printed or written first, but for OUT/.lock in an
    --out that already exists and --init-from's notes): --t5 or --dac typed for the synthetic set, which
    reads neither, or (real data) a local path that is no folder, or a folder of another kind of model
    (datamod.check_model_folder). The DAC is checked at stage 1 too: generate.py decodes with the one the
    checkpoint keeps."""
    if not args.data:
        typed = [f"--{k}" for k in ("t5", "dac") if k in given]
        if typed:
            datamod.fail(f"{' and '.join(typed)}: the synthetic set has no T5 text encoder and no audio; "
                         "they are for --data")
        return
    datamod.check_model_folder(args.t5, "t5", "the T5 text encoder", "--t5")
    datamod.check_model_folder(args.dac, "dac", "DAC", "--dac")


def codec_spec(args):
    return None if args.stage == 1 else {"kind": "synthetic"} if not args.data else {"kind": "dac", "name": args.dac}


def latent_stat_examples(n_examples, seed, n=64):
    """The examples whose latents set stage 2's per-codebook mean and std (Stage2Diffusion.set_latent_stats):
    n of a folder's clips drawn with the run's seed, in index order (its first n could be one album's: data.py
    writes the files in the captions file's order), or all of them; the synthetic set's first n (endless,
    and each example is a new draw). Its own generator: the run's RNG states stay as they were."""
    if n_examples is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n_examples, min(n, n_examples), replace=False))


def restore(ckpt, model, optimizer, scheduler, rank, device, path="ckpt.pt"):
    """Put a checkpoint's weights, optimizer, schedule and this process's RNG states back; returns
    its step. One line naming path (exit code 2) when one of them does not fit this run's model."""
    datamod.load_weights(model, ckpt["model"], path)
    try:  # torch and numpy raise any of these for a state of another shape or layout
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        datamod.fail(f"{path}: its optimizer, schedule or RNG state does not fit this run "
                     f"({type(e).__name__}: {datamod.first_line(e)[:200]})")
    return ckpt["step"]


def lock_file(out):
    """OUT/.lock opened and locked (data.exclusive_lock); one line, exit code 2, if another train.py holds it."""
    return datamod.exclusive_lock(os.path.join(out, ".lock"),
                                  f"--out {out}: another train.py is writing to this folder")


def lock_run_folder(args, world, rank):
    """OUT/.lock, locked by rank 0 when OUT exists (data.exclusive_lock; else None: run_training locks
    the folder it makes), after the cheap checks of check_run_folder, so that no lock file is made in a
    folder that is not a run's. Two runs in one folder would overwrite each other's checkpoint and
    metrics; resume_or_start checks the folder again under the lock. Under torchrun every process
    stops (exit code 2) when rank 0 cannot lock, with rank 0's one line. Keep the returned file open
    while the run writes the folder."""
    lock, error = None, None
    if rank == 0 and os.path.isdir(args.out):
        try:
            check_run_folder(args)
            lock = lock_file(args.out)
        except datamod.BadInput as e:
            error = e
    share_refusal(world, error)
    return lock


def share_refusal(world, error):
    """Raise rank 0's refusal of the run (error: the datamod.BadInput of its checks, whose one line it
    printed; None where it had none, and on the other ranks) in every process: under torchrun, exit code 2
    on the other ranks too, instead of their waiting in (or failing out of) a collective with a process
    that stopped. A collective itself: every process calls it at the same point."""
    if world > 1:
        ok = [error is None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:
            raise error if error is not None else SystemExit(2)
    if error is not None:
        raise error


def prepare_run_folder(args, model_config, step, resumed, world):
    """OUT/config.json (the resolved settings, the model's and the number of processes: a step's
    tokens/s counts every process's) and OUT/metrics.csv, cut back to the checkpoint's step on resume
    (lines logged after the last checkpoint are logged again)."""
    datamod.make_folder(args.out)
    datamod.atomic_write_text(os.path.join(args.out, "config.json"),
                              json.dumps({"args": vars(args), "model": model_config, "processes": world}, indent=1))
    path = os.path.join(args.out, "metrics.csv")
    old = read_metrics(path, step) if (resumed and os.path.exists(path)) else []
    kept = io.StringIO()  # the whole file first, then one atomic write: a crash keeps the old lines
    w = csv.DictWriter(kept, METRICS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(old)
    datamod.atomic_write_text(path, kept.getvalue())


# ------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What the loop works with, set up once by main()."""
    args: argparse.Namespace
    world: int                # processes
    rank: int                 # this process
    device: str
    dataset: object           # .batch(indices, epochs) -> codes (b, 9, frames), captions
    n_examples: Optional[int]  # None: the endless synthetic set
    frames: int               # frames per training sequence
    text_encoder: object      # captions -> T5 states (b, lt, 768), mask (b, lt)
    model: torch.nn.Module    # the model itself (its state_dict is what is saved)
    trained: torch.nn.Module  # what the loop calls: the model, compiled and/or wrapped in DDP
    model_config: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume_with: Optional[str] = None  # what a Ctrl-C's line says continues the run (main's argument)

    @property
    def master(self):
        return self.rank == 0


def accumulate_gradients(run, step):
    """The gradients of one optimizer step, summed over its grad_accum micro-batches; returns the
    step's loss. It changes nothing but the gradients and the RNG states (dropout): the weights stay
    those of the step before. Each micro-batch's loss is its share of the whole step's (its targets
    over the step's count of real targets, on every process: loss_counts), so that with padded clips
    too the step is that of one batch of grad_accum x processes x batch_size, however it is split."""
    args, device = run.args, run.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    run.trained.train()
    batches = [run.dataset.batch(*batch_indices(step, micro, args, run.rank, run.world, run.n_examples))
               for micro in range(args.grad_accum)]
    targets = [loss_targets(codes[..., :run.frames].to(device), args) for codes, _ in batches]
    counts = sum(loss_counts(t, args) for t in targets)
    if run.world > 1:
        dist.all_reduce(counts)  # the step's count over every process
    total = torch.zeros((), device=device)
    for micro, (codes, (_, captions)) in enumerate(zip(targets, batches)):
        text, mask = run.text_encoder(captions)
        if pads_text(args, device):  # a few text lengths, not one per batch: each new shape costs a compilation
            text, mask = pad_text(text, mask, TEXT_LENGTH_STEP)
        mask = mask & caption_keep(step, micro, args, run.rank, run.world).to(device)[:, None]  # null condition
        sync = run.world == 1 or micro == args.grad_accum - 1  # DDP: all-reduce the gradients once
        with (contextlib.nullcontext() if sync else run.trained.no_sync()), autocast:
            if args.stage == 1:
                _, loss = run.trained(codes, text, mask, counts)
            else:
                loss = run.trained(codes, text, mask, counts)
        (loss * run.world).backward()  # (DDP averages the processes' gradients; the shares add up)
        total += loss.detach()
    if run.world > 1:
        dist.all_reduce(total)
    return total.item()


def loss_targets(codes, args):
    """A micro-batch's codes (b, 9, frames) as its model's loss reads them: stage 1's first
    args.codebooks in the delay pattern, stage 2's as they are."""
    return delay_pattern(codes[:, :args.codebooks]) if args.stage == 1 else codes


def loss_counts(targets, args):
    """What a micro-batch adds to its step's count of real targets (lm_loss's counts, stage 2's
    count): stage 1, each codebook's targets that are not the special id (K,); stage 2, the real
    frames (codebook 1 not special), a scalar. float32, as the losses divide by them."""
    real = targets != SPECIAL
    return real.sum((0, 2)).float() if args.stage == 1 else real[:, 0].sum().float()


TEXT_LENGTH_STEP = 32


def compile_model(model, cuda_graphs, backend="inductor"):
    """train.py --compile (--cuda-graphs: torch.compile's reduce-overhead mode, the forward and backward
    replayed as CUDA graphs). Shapes are static: each text length that pad_text leaves is compiled on its
    own (at most 256 / 32 = 8 with the text encoder's 256 tokens: Dynamo's recompile limit). Dynamo's
    default would recompile the second length with symbolic shapes, a compile in which Inductor has failed
    (BENCHMARKS.md, section 0c)."""
    return torch.compile(model, backend=backend, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)


def data_parallel(model, device):
    """model in DDP for this torchrun process: the gradients all-reduced (averaged over the processes) in
    buckets of about 25 MB as the backward makes them, each gradient divided by the world size as DDP
    copies it into its bucket. The gradients are then views into those buckets (gradient_as_bucket_view:
    no copy back after the all-reduce, and one gradient-sized buffer less)."""
    return DDP(model, device_ids=[device] if device.startswith("cuda") else None, gradient_as_bucket_view=True)


def pads_text(args, device):
    """Whether the text is padded to a multiple of TEXT_LENGTH_STEP (pad_text): under --compile, and eager on
    CUDA where the Mamba-2 layers may run the triton op as torch.compile'd calls (--triton-op auto or on, with
    the fast kernels' grouped path), whose shapes are static too."""
    return bool(args.compile or (device.startswith("cuda") and not args.no_kernels and args.mamba_train == "grouped"
                                 and triton_op_option(args) is not False))


def apply_update(run):
    """Clip the gradients, step the optimizer and the schedule, clear the gradients; returns (grad
    norm, lr). The one place where the weights, the optimizer and the schedule change."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip).item()
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    # Under CUDA graphs a gradient set to None would become the backward graph's output buffer, which
    # the next micro-batch's replay overwrites before adding to it (pytorch/pytorch#169545); zeroed
    # in place, the gradients stay this loop's tensors and every backward adds into them.
    run.optimizer.zero_grad(set_to_none=not run.args.cuda_graphs)
    return grad_norm, lr


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and kill's, a scheduler's or torchrun's stop


@contextlib.contextmanager
def stop_is_ctrl_c():
    """SIGTERM raises KeyboardInterrupt inside the block, as Ctrl-C does, so that a run stopped by kill, a job
    scheduler (its time limit, a preemption) or torchrun saves its last completed step too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def hold_signals(held):
    """Make each of STOP_SIGNALS append its number to held; the previous handlers, to put back (restore_signals).
    A signal that comes while they are swapped one by one meets the handler of its own not yet swapped and
    raises here: the ones already swapped are put back first, else they would swallow every later Ctrl-C or
    SIGTERM of the process. The handlers are read before any is swapped (signal.signal's return value
    would be lost if the signal came right after the call)."""
    previous = [signal.getsignal(s) for s in STOP_SIGNALS]
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, lambda signum, frame: held.append(signum))
    except BaseException:
        restore_signals(previous)
        raise
    return previous


def restore_signals(previous, signals=STOP_SIGNALS):
    """Put back each of signals' handler in previous (None: a handler not set from Python; Python's own
    then). Each one is put back even if a signal whose handler is back raises before the next is."""
    if not signals:
        return
    try:
        s, handler = signals[0], previous[0]
        signal.signal(s, handler if handler is not None else
                      signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    finally:
        restore_signals(previous[1:], signals[1:])


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) or a SIGTERM that comes inside the block and raise it as KeyboardInterrupt once the
    block has finished, so the block's changes are made whole. Signal handlers belong to the main
    thread; in another thread this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = hold_signals(held)
    try:
        yield
    finally:
        restore_signals(previous)
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_agreed(run):
    """Under torchrun: yields a function, called by every process after each step, that says whether
    any process has been sent Ctrl-C (SIGINT) since the run began, so that all stop after the same
    step. Each process gets the signal at its own point of a step; raised there, one process could
    wait in the gradients' all-reduce while another saves, or save the RNG states of another step.
    So the signal is held for the whole loop, and the processes agree on it (an all-reduce of a flag).
    One process: yields None, and Ctrl-C is raised where it comes (train's docstring)."""
    if run.world == 1 or threading.current_thread() is not threading.main_thread():
        yield None
        return
    held = []
    previous = hold_signals(held)

    def any_process():
        flag = torch.tensor([float(bool(held))], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    try:
        yield any_process
    finally:
        restore_signals(previous)


def evaluate_captions(run, n=8):
    """Mean caption score of low-temperature generations for held-out synthetic captions."""
    captions = run.dataset.captions(n)
    text, mask = run.text_encoder(captions)
    g = torch.Generator(device=run.device).manual_seed(run.args.seed)
    codes = run.model.generate(text, mask, min(run.args.frames, 128), cfg_scale=3.0, top_k=50, temperature=0.3,
                               generator=g)
    return float(np.mean([datamod.caption_score(c.cpu().numpy(), cap) for c, cap in zip(codes, captions)]))


def rng_states(run):
    """This process's RNG states: what a resumed run needs to draw what the uninterrupted one draws."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None}


def save_checkpoint(run, step, rng, elapsed):
    """Save the run as of the completed step `step`: weights, optimizer and schedule as they are
    (so only between updates) and rng, this process's RNG states taken right after that step's
    update, gathered from every process; elapsed: the seconds since the run's start as of that step
    (its metrics row's), from which a resumed run counts on. Rank 0 writes OUT/ckpt.pt (temp file,
    then rename)."""
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if run.master:
        args = run.args
        with open(os.path.join(args.out, "metrics.csv"), "ab") as f:  # its rows up to this step, on disk first
            os.fsync(f.fileno())
        atomic_save({"kind": f"stage{args.stage}", "config": run.model_config, "model": run.model.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "step": step,
                     "elapsed_s": elapsed, "rng": rngs, "args": vars(args), "text_encoder": run.text_encoder.spec,
                     "codec": codec_spec(args)}, os.path.join(args.out, "ckpt.pt"))


def atomic_save(obj, path):
    """torch.save(obj, path) as one commit: a temp file, synced, then renamed over path (and the folder
    synced), so that a kill or a power cut leaves the old checkpoint or the new one, whole. A save that
    fails (a full disk) leaves no temp file."""
    datamod.atomic_write(path, lambda f: torch.save(obj, f))


def log_step(run, bar, row, score):
    """After a completed step (rank 0): the progress bar, and a row of OUT/metrics.csv every
    log_every steps and at each evaluation. row: [step, loss, lr, grad norm, tokens/s, elapsed s]."""
    if not run.master:
        return
    step, loss, lr, grad_norm, tokens_per_s, elapsed = row
    bar.update(step - bar.n)
    scored = {} if score is None else {"score": f"{score:.2f}"}
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", **scored)
    if step % run.args.log_every == 0 or score is not None:
        with open(os.path.join(run.args.out, "metrics.csv"), "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{grad_norm:.4f}",
                                                         f"{tokens_per_s:.1f}", f"{elapsed:.1f}",
                                                         "" if score is None else f"{score:.4f}"])


def resume_command(out, world, script, environ=os.environ):
    """What a Ctrl-C's line says continues the run in `out` (its value quoted for the shell: data.shell_flag):
    in one process, train.py's flags --resume --out OUT; under torchrun (world > 1) the launch too, as the
    checkpoint holds each process's RNG states and data position and refuses another count: torchrun
    --nproc_per_node N SCRIPT --resume --out OUT, N torchrun's LOCAL_WORLD_SIZE. script: the file torchrun
    started (sys.argv[0]). Over several nodes (WORLD_SIZE a multiple of LOCAL_WORLD_SIZE) their count,
    and the rendezvous flags the run was started with, which no process is told."""
    flags = "--resume " + datamod.shell_flag("--out", out)
    if world == 1:
        return flags
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    launch = f"torchrun --nproc_per_node {local} {shlex.quote(script)} {flags}"
    if local == world:
        return launch
    return (f"{launch.replace('torchrun ', f'torchrun --nnodes {world // local} ', 1)} on each node, with the "
            "rendezvous flags this run was started with")


def train(run, step, saved, elapsed=0.0):
    """The loop: steps from `step` to args.steps (or --stop-after), logging, evaluating and saving.
    saved: the step of the checkpoint on disk (None: none yet). elapsed: the seconds since the run's
    start as of `step` (a resumed run's, from its checkpoint), on which metrics.csv's elapsed_s counts.
    Returns (step, the loss of the last step run, or None when none ran).

    A checkpoint holds the state as of a completed step, so a resumed run repeats the uninterrupted
    one bit for bit. A step first accumulates gradients (which changes nothing else but the RNG
    states), then updates the weights, optimizer and schedule in place (apply_update). Ctrl-C while
    accumulating drops the step: the checkpoint is the step before, with the RNG states taken after
    its update (not those the dropped step has advanced). Ctrl-C during the update is held until
    the update, the step's evaluation and its row are whole (ctrl_c_held), and that step is saved.
    Under torchrun every process finishes the step in progress, and all save it (ctrl_c_agreed).
    Either way the run exits with 130.
    A non-finite loss stops before the update, with exit code 1, and keeps the last checkpoint."""
    args = run.args
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    bar = tqdm(total=args.steps, initial=step, unit="step", disable=not run.master, dynamic_ncols=True)
    # The seconds of the invocations before this one count too: a resumed run's elapsed_s went back to 0
    first_step, t_start, loss = step, time.time() - elapsed, None
    rng, row = rng_states(run), None  # the RNG states as of the last completed step; its metrics until logged
    whole = ctrl_c_held if run.world == 1 else contextlib.nullcontext  # under torchrun ctrl_c_agreed holds it
    with ctrl_c_agreed(run) as any_process_interrupted:
        try:
            while step < args.steps and (args.stop_after is None or step - first_step < args.stop_after):
                t0 = time.time()
                loss = accumulate_gradients(run, step)
                if not math.isfinite(loss):
                    kept = (f"the last good checkpoint is {ckpt_path} (step {saved})" if saved is not None
                            else "no checkpoint was written yet")
                    if run.master:
                        print(f"\nstep {step}: the loss is {loss}, stopping; {kept}", file=sys.stderr)
                    sys.exit(1)
                # The update, the count of completed steps, the evaluation and the row, held as one: the row is
                # written once, with its score, and a Ctrl-C let out between the update and the evaluation (or
                # in it) would lose that score, as the step is saved and a resumed run starts after it
                with whole():
                    grad_norm, lr = apply_update(run)
                    step += 1
                    rng = rng_states(run)
                    tokens_per_s = args.batch_size * args.grad_accum * run.world * run.frames / (time.time() - t0)
                    elapsed = time.time() - t_start  # as of this step, like rng: what its checkpoint keeps
                    row = [step, loss, lr, grad_norm, tokens_per_s, elapsed]
                    score = None
                    scored = args.eval_every and step % args.eval_every == 0 and args.stage == 1 and not args.data
                    if scored and run.master:
                        score = evaluate_captions(run)  # its own generator: the global RNG states stay
                    log_step(run, bar, row, score)
                    row = None
                if step % args.ckpt_every == 0 or step == args.steps:
                    with whole():  # a Ctrl-C inside torch.save's writer broke it with its own traceback
                        save_checkpoint(run, step, rng, elapsed)
                        saved = step
                if any_process_interrupted and any_process_interrupted():
                    raise KeyboardInterrupt  # in every process, after the same step
            if saved != step:
                with whole():
                    save_checkpoint(run, step, rng, elapsed)
                    saved = step
        except KeyboardInterrupt:
            if row is not None:  # interrupted after the update, before its row was logged
                log_step(run, bar, row, None)
            if saved != step:
                with whole():  # a second Ctrl-C waits for this save
                    save_checkpoint(run, step, rng, elapsed)
            if run.master:
                print(f"\ninterrupted: checkpoint at step {step} in {ckpt_path}; continue with "
                      f"{run.resume_with or resume_command(args.out, run.world, sys.argv[0])}", file=sys.stderr)
            sys.exit(130)
        finally:
            bar.close()
    return step, loss if step > first_step else None


def main(argv=None, resume_with=None, prog="train.py"):
    """resume_with: the command that a Ctrl-C's line names to continue the run (evaluate.py's, when it
    trains the run); by default resume_command's: train.py's --resume --out OUT, under torchrun with its launch.
    prog: the command named in its errors (evaluate.py's, when it trains the run)."""
    args, given = parse_args(argv, prog)
    world, rank, device = setup_processes(args)
    lock = lock_run_folder(args, world, rank)  # rank 0's on a folder that exists, held while this run writes it
    try:
        with stop_is_ctrl_c():
            run_training(args, given, world, rank, device, lock, resume_with)
    except (MemoryError, RuntimeError, OSError) as e:
        disk = datamod.disk_error(e)
        if disk is not None and not datamod.failing_outputs():  # not stdout or stderr's write
            datamod.fail(f"{prog}: cannot write in {args.out} ({disk.strerror.lower()}); what it saved before is "
                         "kept whole")
        memory = None if isinstance(e, OSError) else datamod.out_of_memory(e)
        if memory is None:
            raise
        datamod.fail(f"out of memory on {device} ({memory}); at a batch of "
                     f"{args.batch_size} x --frames {args.frames}: lower --batch-size (and raise --grad-accum to keep "
                     "the batch) or --frames")
    finally:  # also on Ctrl-C, a NaN loss or bad input: a caller in this process (evaluate.py) may train again
        if lock is not None:
            lock.close()


def run_training(args, given, world, rank, device, lock, resume_with=None):
    """main() after lock_run_folder: the run resumed or set up, trained, and reported. lock: None when
    the folder did not exist yet; rank 0 then makes and locks it before writing there."""
    ckpt = resume_or_start(args, given, world)
    error = None
    if rank == 0 and ckpt is not None and os.path.exists(os.path.join(args.out, "metrics.csv")):
        try:  # its rows (prepare_run_folder keeps them), before the data or any model loads; under the folder's lock
            read_metrics(os.path.join(args.out, "metrics.csv"), ckpt["step"])
        except datamod.BadInput as e:
            error = e
    share_refusal(world, error)
    source = init_from(args, given) if ckpt is None and args.init_from else None
    if source is not None:  # its config against this run's, before the data, the text encoder or the model load
        check_source_config(source, model_config_of(args), args)
    args.device = device.split(":")[0]
    if args.cuda_graphs and not args.compile:
        datamod.fail("--cuda-graphs: pass --compile too (the graphs are torch.compile's reduce-overhead mode)")
    if args.cuda_graphs and args.device != "cuda":
        datamod.fail(f"--cuda-graphs: needs CUDA devices, and this run has {world} x {args.device}")
    if triton_op_option(args) and args.mamba_train != "grouped":
        datamod.fail(f"--triton-op on: pass --mamba-train grouped (this run has --mamba-train {args.mamba_train})")
    conv_dim = ModelConfig.expand * args.d_model + 2 * args.d_state  # Mamba-2's conv channels (one group)
    if (args.stage == 1 and args.device == "cuda" and not args.no_kernels and "mamba" in LAYOUTS[args.variant]
            and fast.conv_refuses(args.mamba_train, conv_dim) and fast.available()):  # as build_model accelerates
        datamod.fail(f"--mamba-train {args.mamba_train}: mamba-ssm's conv takes a multiple of 8 channels, and "
                     f"Mamba-2's here has {conv_dim} ({ModelConfig.expand} x --d-model {args.d_model} + 2 x "
                     f"--d-state {args.d_state}); --mamba-train grouped or split takes any width")
    check_models(args, given)
    check_model_fits(args, device)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    dataset, n_examples, text_encoder, frames = load_data(args, device, world, rank)
    model, model_config = build_model(args, device)
    optimizer = model.configure_optimizers(args.lr, args.weight_decay, (0.9, 0.999), args.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args) / args.lr)
    step = 0
    if ckpt is not None:
        step = restore(ckpt, model, optimizer, scheduler, rank, device, os.path.join(args.out, "ckpt.pt"))
        # --steps may change on resume, and the cosine with it: the next step's lr is the new schedule's
        # (LambdaLR's own product, so an unchanged --steps gives the saved value bit for bit), not the saved one
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * (lr_at(step, args) / args.lr)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    elif source is not None:  # fine-tuning: the weights only; optimizer, schedule and step start afresh
        load_source_weights(source, model, model_config, args)
    elif args.stage == 2:  # per-codebook latent statistics of the training data, kept in the model
        model.set_latent_stats(dataset.batch(latent_stat_examples(n_examples, args.seed))[0][..., :frames].to(device))
    trained = compile_model(model, args.cuda_graphs) if args.compile else model
    # Each gradient a tensor of this loop's, from the start on (why: apply_update); DDP then copies them into
    # its buckets and keeps them there, so that the graphs' gradients are added into the buckets in place.
    if args.cuda_graphs:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    if world > 1:
        trained = data_parallel(trained, device)
    run = Run(args, world, rank, device, dataset, n_examples, frames, text_encoder, model, trained, model_config,
              optimizer, scheduler, resume_with)
    if run.master:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = (f"stage 1 {args.variant}, {args.layers} blocks, d_model {args.d_model}" if args.stage == 1 else
                f"stage 2 diffusion, channels {tuple(model_config['channels'])}")
        print(f"{what}: {n_params / 1e6:.1f} M parameters | data: {args.data or 'synthetic'} "
              f"| {world} x {device} | batch {args.batch_size} x {args.grad_accum} x {world} of {frames} frames | "
              f"lr {args.lr} | {args.steps} steps | out {args.out}")
        if source is not None:
            print(f"starting from the weights of {args.init_from} (step {args.init_from_step})")
    late, error = None, None  # the lock on a folder this run makes (one that stops before leaves no folder)
    try:
        if run.master:
            try:
                if lock is None:
                    datamod.make_folder(args.out)
                    late = lock_file(args.out)
                    check_run_folder(args)  # again, under the lock: another run may have made the folder meanwhile
                prepare_run_folder(args, model_config, step, resumed=ckpt is not None, world=run.world)
            except datamod.BadInput as e:  # (a metrics.csv that is not train.py's, on resume)
                error = e
        share_refusal(world, error)
        if run.master:
            if ckpt is None and args.warmup >= args.steps:  # after the folder's checks: no note before an error
                print(f"note: --warmup {args.warmup} is not below --steps {args.steps}: the learning rate rises for "
                      f"the whole run, to {lr_at(args.steps - 1, args):.3g}, and never decays", file=sys.stderr)
        step, loss = train(run, step, saved=None if ckpt is None else step,
                           elapsed=0.0 if ckpt is None else ckpt.get("elapsed_s", 0.0))  # (saved before it was kept: 0)
    finally:
        if late is not None:
            late.close()
    if run.master:
        ckpt_path = os.path.join(args.out, "ckpt.pt")
        if loss is None and step >= args.steps:
            print(f"nothing to train: {ckpt_path} is at step {step}, and --steps is {args.steps}")
        else:
            print(f"done: step {step}{'' if loss is None else f', loss {loss:.4f}'}, checkpoint {ckpt_path}")
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"rank {rank}: peak GPU memory {peak:.2f} GiB", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
        leave_process(0)


def leave_process(code):
    """End a process of a torchrun group with exit code `code`, without the interpreter's shutdown:
    gloo's worker threads may still be releasing the last collective's buffers, which takes the
    interpreter, and an interpreter that is shutting down then aborts the process ("terminate called
    without an active exception", exit code -6 in place of 0, or of the 2 of a refused run: torch 2.13,
    about 1 in 20 CPU runs). Call it once every file is written and closed; stdout and stderr are flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # a Ctrl-C in the loop saves the step (train); before it, one line and exit 130 too
    try:
        datamod.run_command(main, "train.py")
    except SystemExit as e:  # bad input (2, its line printed), a Ctrl-C (130), an output gone (1)
        if dist.is_initialized():
            leave_process(0 if e.code is None else e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:  # a fault: its traceback, exit code 1, as Python's own exit gives
        if dist.is_initialized():
            import traceback
            traceback.print_exc()
            leave_process(1)
        raise
