"""The fast paths of ssmttm on CUDA, attached to the plain model (ssmttm.py) at one seam.

    model = fast.accelerate(TextToMusicLM(cfg).cuda(), FastOptions())   # training and prefill
    codes = model.generate(text, mask, n_frames, decoder=fast.Decoder(FastOptions()))   # decoding

- `accelerate` turns every Mamba-2 layer of a model into a `FastMamba2`: the same parameters (so
  the same state_dict and checkpoints), running on the kernels of gpu_kernels.py: the training pass as one custom op
  (ssd_grouped's SSD and a Triton conv by default, as a triton op whose kernels Inductor launches where
  the host is the bound; mamba-ssm's kernels and causal-conv1d with the other FastOptions.train paths),
  the prefill's SSD, mamba-ssm's decoding step.
  A whole LM becomes a `FastLM`, whose residual adds run inside the next sublayer's norm and whose
  heads multiply on rows padded for cuBLAS's aligned kernels.
- `Decoder` is generate's prefill and its loop after the first step: each frame (the input
  embedding, one step of every block, the heads, guidance, top-k sampling, writing the token) in a
  few fused kernels, recorded once as a CUDA graph and replayed, and the prefill replayed from a
  graph from its second call of the same shapes. It draws the same noise from the same generator as
  the plain loop, so it writes the same tokens (up to floating-point rounding of the logits).

Every choice is an explicit FastOptions field. The arrows point one way: this file reads the
model's classes and tensors; ssmttm.py never imports it. test_ssmttm.py compares every path here
with the plain model.
"""
import contextlib
import copy
import functools
import itertools
import weakref
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gpu_kernels as kernels
import ssd_grouped
import ssmttm
from ssmttm import SPECIAL, Mamba2, Mamba2State


TRAIN_PATHS = ("keep_states", "mamba_ssm", "split", "grouped")  # FastOptions.train
# the training paths on mamba-ssm's conv, which asserts a multiple of 8 channels (conv_refuses)
MAMBA_SSM_CONV_PATHS = ("keep_states", "mamba_ssm")


@dataclass(frozen=True)
class FastOptions:
    # Mamba-2's training pass: "grouped" (kernels.mamba2_train with ssd_grouped's SSD for ngroups = 1,
    # its state products as GEMMs over all heads, and the Triton conv kernels.causal_conv_silu; without
    # grad and on a CPU the plain layer on ssd_grouped; other ngroups: the plain layer on mamba-ssm's
    # chunk scan), "keep_states" (kernels.mamba2_train on mamba-ssm's kernels and causal-conv1d, keeping
    # the conv's output and the SSD's chunk states for the backward), "mamba_ssm" (mamba-ssm's
    # mamba_split_conv1d_scan_combined, which recomputes them) or "split" (causal-conv1d, then
    # mamba_chunk_scan_combined, as separate ops)
    train: str = "grouped"
    triton_op: bool | None = None  # training, train "grouped": the Mamba-2 layer as a triton op whose
    # kernels Inductor's code launches (kernels.mamba2_train): under torch.compile traced into the model's
    # graph, not an opaque custom op; eager, its forward and backward each one torch.compile'd call of it.
    # About half the host time, more GPU time; None: by the rows (triton_op_for)
    chunk_size: int = 256        # the SSD kernels' chunk length, the one they are tuned for
    decode_kernels: bool = True  # decoding steps through gpu_kernels.py (False: the layers' own steps)
    pdl: bool = True             # programmatic dependent launch between decoding kernels (Hopper)
    cuda_graph: bool = True      # record a decoding frame once as a CUDA graph and replay it
    compile: bool = False        # decoding: torch.compile the plain step instead of gpu_kernels.py's
    fused_add_norm: bool = True  # training and scoring: each residual add inside the next sublayer's
    # RMSNorm (FastLM), eager and compiled
    fused_gelu_dropout: bool = True  # training: the feed-forward's GELU and dropout in one pass each
    # way (kernels.gelu_dropout; FastFeedForward), its mask drawn again in the backward, not kept
    fused_residual_dropout: bool = True  # training, with fused_add_norm: each sublayer's output dropout
    # inside the add + norm (kernels.add_rms_norm), its mask drawn again in the backward, not kept
    decode_streams: int | None = None  # decoding: the rows in this many groups, each on its own CUDA
    # stream (row_groups); None: by the rows (decode_streams_for)
    decode_chunk: int | None = None  # decoding: Mamba-2's state written once per chunk of this many
    # steps (kernels.ssm_chunk_step; 1: every step, kernels.ssm_step); None: by the rows and the
    # state's dtype (decode_chunk_for)
    decode_split_k: bool = True  # decoding: products of few outputs (out_proj, fc1, fc2, the head) in
    # slices of K at 4-32 rows (kernels.linear_rows' split_k, kernels._default_path; it needs counters)
    decode_fold_norm: bool = True  # decoding: where in_proj is cuBLAS's product (linear_rows' many_rows
    # path) among split_k's products (9-32 rows), its RMSNorm's weight folded into a copy of its weight
    # (FusedStep.in_weights) and 1/rms(x) applied after the product (linear_rows' norm_folded): no norm
    # kernel before it (_folds_norm)

    def __post_init__(self):
        if self.train not in TRAIN_PATHS:
            raise ValueError(f"FastOptions.train: {self.train!r} is not one of {', '.join(TRAIN_PATHS)}")
        if self.triton_op and self.train != "grouped":
            raise ValueError(f"FastOptions.triton_op: the triton op is the grouped path's, not {self.train!r}'s")
        for name in ("decode_streams", "decode_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"FastOptions.{name}: {value!r} is not an int")
        if self.decode_streams is not None and self.decode_streams < 1:
            raise ValueError(f"FastOptions.decode_streams: {self.decode_streams} is not a positive number of streams")
        if self.decode_chunk is not None and self.decode_chunk < 1:
            raise ValueError(f"FastOptions.decode_chunk: {self.decode_chunk} is not a positive number of steps")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"FastOptions.chunk_size: {self.chunk_size!r} is not a power of two >= 16 (the SSD "
                             "kernels' chunk length)")


TRITON_OP_ROWS = 16384  # triton_op_for: at most this many positions a call (batch x length)


def triton_op_for(rows):
    """FastOptions.triton_op's default for a training call over `rows` positions (batch x length): on up to
    TRITON_OP_ROWS, where a step waits on the host (the paper's batch 4 of 30 s, 10 600 rows: about 20%
    faster a step, eager or compiled), off above, where the GPU sets the pace and the triton op's extra GPU
    time shows (batch 16 about 7% slower; batch 8 level; BENCHMARKS.md §0c, sixty-first session)."""
    return rows <= TRITON_OP_ROWS


def for_cuda_graphs(options):
    """options for a model whose training steps CUDA graphs replay (train.py --cuda-graphs): triton_op off
    where it was left to the rows, as the graphs replay the host's launches and only the triton op's extra GPU
    time would show (batch 4: 73.7 against 69.1 ms a step, BENCHMARKS.md §0c, thirtieth session)."""
    return replace(options, triton_op=False) if options.triton_op is None else options


def available():
    """Whether the fast paths can run here: CUDA, mamba-ssm and causal-conv1d."""
    return torch.cuda.is_available() and kernels.HAS_MAMBA_SSM and kernels.HAS_CAUSAL_CONV1D


def conv_refuses(train, conv_dim):
    """Whether the training path `train` (FastOptions.train) refuses a Mamba-2 conv of conv_dim channels
    (d_inner + 2 ngroups d_state): mamba-ssm's conv, under "keep_states" and "mamba_ssm", asserts a
    multiple of 8; "grouped" and "split" take any width."""
    return train in MAMBA_SSM_CONV_PATHS and conv_dim % 8 != 0


def accelerate(model, options=FastOptions()):
    """Run every ssmttm.Mamba2 layer of model on the kernels: each becomes a FastMamba2 in place (the
    same object, parameters and buffers; only its methods change), a TextToMusicLM a FastLM (its
    residual adds inside the norms) and a FeedForward a FastFeedForward. Returns model. Raises
    TypeError if options is not a FastOptions, ValueError if options.train cannot take a Mamba-2
    layer's conv width (conv_refuses), both before any change, and RuntimeError without CUDA,
    mamba-ssm or causal-conv1d."""
    if not isinstance(options, FastOptions):
        raise TypeError(f"fast.accelerate: options must be a FastOptions, not {type(options).__name__}")
    for module in model.modules():
        if isinstance(module, Mamba2) and conv_refuses(options.train, module.conv_dim):
            raise ValueError(f"fast.accelerate: FastOptions.train {options.train!r} runs mamba-ssm's conv, which "
                             f"takes a multiple of 8 channels, and a Mamba-2 layer here has {module.conv_dim}; "
                             "train 'grouped' or 'split' takes any width")
    if not available():
        raise RuntimeError("fast.accelerate needs CUDA, mamba-ssm and causal-conv1d "
                           "(pip install -r requirements-gpu.txt --no-build-isolation)")
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.__class__ = FastMamba2
            module.options = options
        elif isinstance(module, ssmttm.TextToMusicLM):
            module.__class__ = FastLM
            module.options = options
        elif isinstance(module, ssmttm.FeedForward):
            module.__class__ = FastFeedForward
            module.options = options
    return model


def for_inference(model, dtype=torch.bfloat16):
    """Cast a model for decoding: weights in dtype (bf16 halves the bytes each step reads), except
    Mamba-2's dt_bias, A_log and D, which set the decay rates and stay in fp32 like the state.
    Returns the model, in eval mode."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Mamba2):
            for p in (m.dt_bias, m.A_log, m.D):
                p.data = p.data.to(torch.promote_types(dtype, torch.float32))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# The residual adds inside the norms


class FastLM(ssmttm.TextToMusicLM):
    """ssmttm.TextToMusicLM whose blocks run with every residual add but the last fused into the next
    sublayer's RMSNorm (kernels.add_rms_norm), across block boundaries too; made by accelerate(). The
    sums are the plain ones in the plain order (x + dropout(h) in fp32); the next sublayer's input is
    written in h's dtype (bf16 under autocast), so the dropout, the add, the norm and the cast before the
    next product, and their backwards, are one pass each way, under torch.compile too (an opaque op
    there). On the CPU, and with fused_residual_dropout=False, the dropouts are torch's, the plain
    model's draws. Decoding states take the plain loop."""

    options: FastOptions

    def run_blocks(self, x, mask=None, memory=None, memory_mask=None, states=None):
        if states is not None or not self.options.fused_add_norm:
            return super().run_blocks(x, mask, memory, memory_mask, states)
        h, dtype = None, x.dtype  # the last sublayer's output, not yet added to x
        p = 0.0                   # and the rate of its dropout, still to draw
        for block in self.blocks:
            for i, norm in enumerate(block.norms):
                if h is None:
                    normed = norm(x)
                else:
                    normed, x = kernels.add_rms_norm(h, x, norm.weight, norm.eps, p, self.training)
                h = block.sublayer(i, normed, mask, memory, memory_mask)
                if self.options.fused_residual_dropout:
                    p = block.dropout.p
                else:
                    h = block.dropout(h)
        # the plain loop's dtype (bf16 for a bf16 model), though add_rms_norm keeps the sums in fp32
        return (x + F.dropout(h, p, self.training)).to(torch.promote_types(dtype, h.dtype))

    def heads(self, x):
        """The plain heads; on CUDA the head's product on its weight's rows padded to a multiple of 8
        (aligned_linear), for cuBLAS's aligned kernels: the same logits (b, K, s, 1025)."""
        if not x.is_cuda:
            return super().heads(x)
        b, s, _ = x.shape
        logits = aligned_linear(self.norm_f(x), self.head.weight)
        return logits.view(b, s, self.cfg.n_codebooks, ssmttm.CODEBOOK_SIZE + 1).transpose(1, 2)


def aligned_linear(x, weight, multiple=8):
    """F.linear(x, weight) (no bias) computed on weight's rows padded with zeros to a multiple of
    `multiple`, the padded outputs sliced off: the same values, as a view whose rows lie n rounded up
    to that multiple apart. cuBLAS runs its fast kernels only when every matrix's rows start on 16 bytes; the
    heads' 1025 bf16 logits per row do not, and their three products (forward, both gradients) took
    an unaligned kernel, three times as long together (BENCHMARKS.md §0c). x (..., d), weight (n, d) ->
    (..., n). TypeError / ValueError for a multiple that is not an integer of 1 or more; ValueError for a
    weight that is not (n, d) for x (..., d) (a 1-D weight failed in F.pad, a wrong d in a product whose
    message gives the padded weight's shape, not the caller's). Python shape checks: no GPU sync."""
    # a Python int, no GPU sync: 0 divided by zero, a negative multiple cut the weight's rows (fewer outputs)
    ssmttm.check_integer("aligned_linear: multiple", multiple, least=1)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"aligned_linear: weight {tuple(weight.shape)} for x {tuple(x.shape)}: want (n, d) for "
                         "x (..., d)")
    n = weight.shape[0]
    if n % multiple == 0:
        return F.linear(x, weight)
    return F.linear(x, F.pad(weight, (0, 0, 0, -n % multiple)))[..., :n]


class FastFeedForward(ssmttm.FeedForward):
    """ssmttm.FeedForward with its GELU and dropout in one Triton pass each way while training
    (kernels.gelu_dropout), made by accelerate(): the same parameters and function, a dropout mask
    drawn from Philox instead of torch's (the same rate, to 2^-16). Elsewhere the plain forward."""

    options: FastOptions

    def forward(self, x):
        if not self.options.fused_gelu_dropout:
            return super().forward(x)
        return self.fc2(kernels.gelu_dropout(self.fc1(x), self.dropout.p, self.training))


# ------------------------------------------------------------------------------------------------
# Mamba-2 on mamba-ssm's kernels


class FastMamba2(Mamba2):
    """ssmttm.Mamba2 on CUDA kernels, made by accelerate(): the same parameters and the same
    function. On a CPU tensor every method is the plain one, but for the SSD with options.train
    "grouped": ssd_grouped's torch form (the same function, to rounding: 1e-15 in float64)."""

    options: FastOptions

    def forward(self, u, mask=None, state=None):
        train = self.options.train
        fused = torch.is_grad_enabled() and kernels.HAS_TRAIN_KERNELS and (train != "grouped" or self.ngroups == 1)
        if state is not None or not u.is_cuda or train == "split" or (train == "grouped" and not fused):
            return super().forward(u, mask, state)  # the prefill and steps: conv, ssd, step below
        # Padding is sequence 0 and the text and audio sequence 1: the kernels start the sequence
        # from a clean state and conv: mask_padding's result at the real positions, without a pass over
        # zxbcdt (the padding's own outputs are not its zeros; nothing reads them).
        seq_idx = None if mask is None else mask.to(torch.int32)
        params = (self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, self.A(), self.D)
        # Keeping the chunk states pays only when a backward follows: without grad, mamba-ssm's own.
        if train in ("keep_states", "grouped") and fused:
            return kernels.mamba2_train(u, self.in_proj.weight, *params, self.norm.weight, self.out_proj.weight,
                                        seq_idx, self.options.chunk_size, self.headdim, self.ngroups, self.norm.eps,
                                        grouped=train == "grouped", triton_op=self.triton_op(u))
        return kernels.mamba_split_conv1d_scan_combined(
            self.in_proj(u), *params, self.options.chunk_size, seq_idx=seq_idx, rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=None,
            headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False)

    def triton_op(self, u):
        """Whether the training pass over u (b, l, d_model) runs the triton op: FastOptions.triton_op, else by
        its rows (triton_op_for)."""
        chosen = self.options.triton_op
        return triton_op_for(u.shape[0] * u.shape[1]) if chosen is None else chosen

    def conv(self, xBC, state=None):
        x = xBC.transpose(1, 2)  # (b, conv_dim, l), channels last in memory: xBC is a slice of zxbcdt's rows
        if xBC.is_cuda and x.stride(2) % 8 and self.conv_dim % 8 == 0:
            x = xBC.contiguous().transpose(1, 2)  # in_proj's rows not a multiple of 8 wide (e.g. 4 heads)
        # causal-conv1d takes channels last only with both strides multiples of 8 (so conv_dim too)
        if not xBC.is_cuda or x.stride(1) != 1 or x.stride(0) % 8 or x.stride(2) % 8:
            return super().conv(xBC, state)
        weight = self.conv1d.weight[:, 0]
        if state is None:
            return kernels.causal_conv1d_fn(x, weight, self.conv1d.bias).transpose(1, 2)
        # The prefill: the window starts from the state's last d_conv - 1 inputs, which causal-conv1d takes
        # channels last, as x; the state then keeps the last d_conv inputs, as the plain conv leaves it.
        history = state.conv[..., 1:].to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        out = kernels.causal_conv1d_fn(x, weight, self.conv1d.bias, initial_states=history)
        tail = x[..., -self.d_conv:].to(state.conv.dtype)
        state.conv.copy_(torch.cat([state.conv, tail], dim=-1)[..., -self.d_conv:])
        return out.transpose(1, 2)

    def ssd(self, x, dt, B, C, initial_state=None):
        """The plain ssd's result. On CUDA, without grad and with a contiguous initial state (a prefill
        from a cache), the grouped SSD writes the final state over initial_state, in its dtype, and
        returns it: one pass over the state each way, no fp32 copies of it (Mamba2.forward's copy of
        the final state into the cache is then a copy onto itself, which torch skips)."""
        # A sequence shorter than a chunk (a prefill) takes the shortest power-of-two chunk that holds it:
        # the same SSD (the chunk length changes only the rounding) without the work on padded positions.
        chunk = min(self.options.chunk_size, max(16, 1 << (x.shape[1] - 1).bit_length()))
        if self.options.train == "grouped" and self.ngroups == 1:  # on a CPU too (its torch form)
            f32 = torch.promote_types(x.dtype, torch.float32)
            with torch.autocast(x.device.type, enabled=False):
                dt = F.softplus(dt.to(f32) + self.dt_bias.to(f32))
                args = (x, dt, self.A(), B[:, :, 0], C[:, :, 0], chunk, self.D.to(f32), initial_state)
                if (x.is_cuda and initial_state is not None and initial_state.is_contiguous()
                        and not torch.is_grad_enabled()):
                    return ssd_grouped.forward_triton(*args, final_out=initial_state)[:2]
                return ssd_grouped.ssd_grouped(*args, use_triton=x.is_cuda)
        if not x.is_cuda:
            return super().ssd(x, dt, B, C, initial_state)
        return kernels.mamba_chunk_scan_combined(x, dt, self.A(), B, C, chunk, D=self.D,
                                                 dt_bias=self.dt_bias, dt_softplus=True,
                                                 initial_states=initial_state, return_final_states=True)

    def step(self, u, state):
        # Under torch.compile the plain ops fuse into a few kernels; eager, mamba-ssm's step kernels win.
        if not u.is_cuda or torch.compiler.is_compiling():
            return super().step(u, state)
        b, h, p, n = state.ssm.shape
        z, xBC, dt = self.in_proj(u[:, 0]).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = kernels.causal_conv1d_update(xBC, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias,
                                           "silu")
        x, B, C = xBC.split([self.d_inner, self.ngroups * n, self.ngroups * n], dim=-1)
        per_channel = lambda v: v[:, None].expand(h, p)  # the kernel takes dt, A, D per channel
        y = kernels.selective_state_update(state.ssm, x.view(b, h, p), dt[..., None].expand(b, h, p),
                                           per_channel(self.A())[..., None].expand(h, p, n),
                                           B.view(b, self.ngroups, n), C.view(b, self.ngroups, n),
                                           D=per_channel(self.D), dt_bias=per_channel(self.dt_bias),
                                           dt_softplus=True)
        return self.out_proj(self.norm(y.reshape(b, self.d_inner).to(z.dtype), z))[:, None]


# ------------------------------------------------------------------------------------------------
# Decoding


class Decoder:
    """The loop of TextToMusicLM.generate after the first step, fast on CUDA; pass it as
    generate(..., decoder=Decoder(options)). Per frame: kernels.embed_rows, five kernels per SiMBA
    block (norm + in_proj + conv, ssm_step + gate, norm + out_proj + residual, norm + fc1 + GELU,
    fc2 + residual; with options.decode_split_k the products of few outputs in slices of K at 4-32
    rows; past kernels.CORE_ROWS rows the others, past 32 all, are cuBLAS's with a small kernel or two;
    with options.decode_chunk > 1 the SSD step is kernels.ssm_chunk_step's two kernels, and the
    state is written once per chunk of steps, by kernels.ssm_chunk_end at its last step, in a frame
    of its own: FusedStep), norm + heads, and
    kernels.sample_top_k, which also writes the token into the step layout and the next input (its
    noise drawn ahead, outside the frames, on a stream of its own: NoiseAhead);
    the blocks in groups of rows on their own CUDA streams
    (options.decode_streams, row_groups, blocks_on_streams). Rows or widths past kernels.linear_rows'
    limits, and sublayers without a fused step (attention), take the plain ops. cuda_graph needs a decoding
    state of fixed size: not for self-attention, whose KV cache grows. TypeError if options is not a
    FastOptions."""

    def __init__(self, options=FastOptions()):
        if not isinstance(options, FastOptions):
            raise TypeError(f"fast.Decoder: options must be a FastOptions, not {type(options).__name__}")
        self.options = options
        self._compiled = {}  # model -> its torch.compile'd step (options.compile)
        # with options.cuda_graph: the last call's recorded prefill and frames (KeptPrefill, KeptFrames),
        # both on one copy of the cache, kept for caches of these state shapes (_states_key: the copy)
        self._kept_cache = None
        self._prefill = None
        self._prefill_key = None  # the key of the last prefill (KeptPrefill.key_for)
        self._kept = None

    def new_cache(self, model, batch, max_len, device, dtype, ssm_dtype=None):
        """ssmttm.InferenceCache(model, batch, max_len, device, dtype, ssm_dtype), generate's. With
        options.cuda_graph, for a model of Mamba-2 and feed-forward sublayers, its states and positions
        are this Decoder's own copy of them (_cache_like: the one its kept graphs run on), zeroed, so that
        prefill() and decode() copy nothing in or out (each copy of the states moves them twice: 0.85 ms
        at 16 prompts with the bf16 state) and the states are in memory once. The cache then shares them
        with the Decoder: the next new_cache() of the same shapes zeroes them again."""
        if not self.options.cuda_graph or _unsplit_sublayers(model):
            return ssmttm.InferenceCache(model, batch, max_len, device, dtype, ssm_dtype)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        shapes = ssmttm.InferenceCache(model, batch, max_len, "meta", dtype, ssm_dtype)  # (allocates nothing)
        if self._kept_cache is not None and self._kept_cache[0] == _states_key(shapes, device):
            kept = self._kept_cache[1]
            for t in _states_tensors(kept) + [kept.position]:
                t.zero_()
        else:
            self._kept_cache = self._prefill = self._kept = None  # (freed before the next are made)
            kept = ssmttm.InferenceCache(model, batch, max_len, device, dtype, ssm_dtype)
            self._kept_cache = (_states_key(kept), kept)
        cache = copy.copy(kept)  # the same states and positions, a text mask of its own
        cache.states, cache.memory_mask = [list(block) for block in kept.states], None
        return cache

    def prefill(self, model, tokens, text, text_mask, cache):
        """model.logits(tokens, text, text_mask, cache), generate's prefill: logits (b, K, s, 1025), and
        cache left as model.logits leaves it. With options.cuda_graph, recorded as a CUDA graph at
        the second call of these shapes and settings and replayed from then on (KeptPrefill): eager,
        launching its kernels takes the host longer than the GPU takes to run them (BENCHMARKS.md
        §0b). The first call runs eager, as recording costs about two prefills, which only replays
        win back. Models with attention (whose prefill makes their states' tensors rather than
        filling them) run eager."""
        if self.options.cuda_graph:
            _check_fixed_size_states(model)
        if not self.options.cuda_graph or _unsplit_sublayers(model):
            return model.logits(tokens, text, text_mask, cache)
        key = KeptPrefill.key_for(model, tokens, text, text_mask, cache)
        if self._prefill is None or self._prefill.key != key:
            if self._prefill_key != key:  # the first call of this key
                self._prefill_key = key
                return model.logits(tokens, text, text_mask, cache)
            self._prefill = None  # (its tensors freed before the next are made)
            kept_cache = self._cache_like(cache)
            with _kept_apart(cache, kept_cache):
                self._prefill = KeptPrefill(model, tokens, text, text_mask, kept_cache)
        return self._prefill.run(tokens, text, text_mask, cache)

    def decode(self, model, cache, steps, fixed, start, copies, sampling, progress=False):
        """Fill steps (b, K, n_steps) from step `start` on, as generate's plain loop does: the model
        continues from cache (after the prefill and step start - 1), fixed (b, K, n_steps) marks the
        slots to keep, copies is 2 with guidance, sampling an ssmttm.Sampling. With options.cuda_graph
        the frames recorded at one call are kept for the next calls of the same shapes and settings
        (KeptFrames): this Decoder then holds a copy of the cache until a call of other shapes (for a cache
        from new_cache, the same tensors: nothing is copied)."""
        if self.options.cuda_graph:
            key = KeptFrames.key_for(model, cache, steps, copies, sampling)
            if self._kept is None or self._kept.key != key:
                self._kept = None  # (its tensors freed before the next are made)
                kept_cache = self._cache_like(cache)
                with _kept_apart(cache, kept_cache):
                    self._kept = KeptFrames(self, model, cache, kept_cache, steps, fixed, start, copies, sampling)
            self._kept.run(cache, steps, fixed, start, sampling.generator, progress)
            return
        step = self.step_function(model, cache.position.shape[0])
        chunks = step.chunk_slot(cache) if isinstance(step, FusedStep) else None
        frame = self.frame(model, cache, steps, fixed, start, copies, sampling, step)
        for _ in tqdm(range(start, steps.shape[-1]), desc="stage 1", unit="step", leave=False,
                      disable=not progress):
            frame()
        if chunks is not None and (chunks[1] + steps.shape[-1] - start) % chunks[0]:
            step.flush(cache)  # the cache as the plain loop leaves it (when the last chunk is not whole)

    def _cache_like(self, cache):
        """The copy of a cache that the kept graphs run on: one per Decoder, made anew (and the graphs
        recorded on the old one dropped) for a cache of other state shapes."""
        key = _states_key(cache)
        if self._kept_cache is None or self._kept_cache[0] != key:
            self._kept_cache = self._prefill = self._kept = None  # (freed before the next are made)
            self._kept_cache = (key, copy.deepcopy(cache))
        return self._kept_cache[1]

    def frame(self, model, cache, steps, fixed, start, copies, sampling, step=None):
        """A function that decodes one step per call, from step `start` on: it reads step pos - 1,
        runs the model one step, samples step pos into steps and advances pos, a device tensor (no
        host synchronisation). With options.cuda_graph, all of it is recorded once as a CUDA graph
        on these tensors, and each call replays it. step: step_function's for these rows (made here
        if None); a FusedStep's pending steps stay out of the cache until its flush(cache). With a
        FusedStep in chunks of K steps there are two frames (two graphs), one for a chunk's last
        step, which writes the states, and one for the others; the host counts the steps to pick.
        The sampling noise is drawn a block of steps ahead (NoiseAhead.blocks), at most up to the
        last step of steps: that many calls."""
        frames = self.frames(model, cache, steps, fixed, start, copies, sampling, step)
        K = frames.chunk
        # each step's place in its chunk (the pending steps' slot on the device), once its noise is drawn
        places = ((frames.slot + s - start) % K
                  for block in frames.noise.blocks(start, steps.shape[-1] - start, sampling.generator) for s in block)

        def frame():
            (frames.last if next(places) == K - 1 else frames.within)()

        return frame

    def frames(self, model, cache, steps, fixed, start, copies, sampling, step=None, warm_up_in_place=False):
        """frame()'s parts (Frames): the frame inside a chunk and the chunk's last, recorded with
        options.cuda_graph, the tensors they read, and the NoiseAhead that draws their sampling noise
        (each frame reads its step's; a frame draws nothing, so a graph holds no generator).
        warm_up_in_place: the recording's warm-up (_record) runs on these tensors, not on copies: for
        tensors of the caller's own, filled after."""
        pos = torch.full((1,), start, device=steps.device)
        tokens = steps.index_select(2, pos - 1).repeat(copies, 1, 1)  # the input step (b * copies, K, 1)
        step = self.step_function(model, tokens.shape[0]) if step is None else step
        # (the pending steps allocated now, not inside the graph's capture)
        chunks = step.chunk_slot(cache) if isinstance(step, FusedStep) else None
        noise = NoiseAhead(steps.shape[:2], SPECIAL, steps.device, block=chunks[0] if chunks else NoiseAhead.BLOCK,
                           draws=not sampling.greedy)
        sample_kernel = self.options.decode_kernels and kernels.triton is not None and noise.ring is not None

        # (frame does not hold self: the graphs that hold frame may be kept by self, KeptFrames)
        def frame(cache=cache, steps=steps, pos=pos, tokens=tokens, ends_chunk=None):
            logits = step(tokens, cache) if ends_chunk is None else step(tokens, cache, ends_chunk)
            Decoder._sample_into(logits[:, :, -1], steps, pos, fixed, tokens, sampling, noise.ring, sample_kernel)
            pos.add_(1)

        if self.options.cuda_graph:
            _check_fixed_size_states(model)
        tensors = (cache, steps, pos, tokens)
        record = (lambda f: _record(f, tensors, warm_up_in_place)) if self.options.cuda_graph else (lambda f: f)
        if chunks is None:
            frame = record(frame)
            return Frames(pos, tokens, frame, frame, 1, 0, noise)
        K, slot = chunks
        within, last = (record(functools.partial(frame, ends_chunk=ends)) for ends in (False, True))
        return Frames(pos, tokens, within, last, K, slot, noise)

    def step_function(self, model, rows):
        """model.step for `rows` rows, tokens (rows, K, 1) -> logits (rows, K, 1, 1025): in the fused
        kernels where they fit, else compiled (options.compile) or the model's own."""
        if self.options.compile:
            if model not in self._compiled:
                self._compiled[model] = torch.compile(model.step, dynamic=False)
            return self._compiled[model]
        widest = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
        if not self.options.decode_kernels or model.training or not kernels.fits_linear_rows(rows, widest):
            return model.step  # (the kernels have no dropout)
        # A = -exp(A_log) is fixed while decoding: computed once, not twice per layer and step
        A = [[m.A().detach() if isinstance(m, Mamba2) else None for m in block.layers]
             for block in model.blocks]
        device = model.embed.weight.device
        freqs = ssmttm.position_frequencies(model.cfg.d_model, device)
        n = min(self.options.decode_streams or decode_streams_for(model, rows), rows)
        groups = None if n == 1 else row_groups(model, rows, n, device)
        split_k = self.options.decode_split_k
        group_rows = [rows] if groups is None else [r.stop - r.start for *_, r in groups]
        fold = self.options.decode_fold_norm and any(
            _folds_norm(r, m.in_proj.weight, split_k or None) for r in group_rows for m in model.modules()
            if isinstance(m, Mamba2))
        return FusedStep(model, A, freqs, self.options.pdl, groups, self.options.decode_chunk, split_k, fold)

    @staticmethod
    def _sample_into(logits, steps, pos, fixed, next_input, sampling, ring=None, kernel=False):
        """Sample step pos from its logits (b * copies, K, 1025); write it into steps where not
        fixed and into next_input, the next step's input. ring: NoiseAhead.ring, the steps' noise
        (None when greedy); kernel: in kernels.sample_top_k, else in plain ops. Device tensors only."""
        if kernel:
            V = SPECIAL
            kernels.sample_top_k(logits[..., :V], ring, sampling.cfg_scale, min(sampling.top_k or V, V),
                                 sampling.temperature, steps, pos, fixed, next_input)
            return
        noise = None if ring is None else ring.index_select(0, pos % ring.shape[0])[0]
        tokens = sampling(logits, noise)
        tokens = torch.where(fixed.index_select(2, pos)[..., 0], steps.index_select(2, pos)[..., 0], tokens)
        steps.index_copy_(2, pos, tokens[..., None])
        next_input.copy_(tokens[..., None].repeat(next_input.shape[0] // steps.shape[0], 1, 1))


def _check_fixed_size_states(model):
    """Raise ValueError for a model whose decoding state grows (self-attention's KV cache): its frames
    are not the same graph at every step."""
    if any("self_attn" in block.layout for block in model.blocks):
        raise ValueError("Decoder: cuda_graph needs a fixed-size decoding state; self-attention's KV "
                         "cache grows (FastOptions(cuda_graph=False))")


class Frames(NamedTuple):
    """Decoder.frames': the frames of one decoding (each decodes one step; recorded as CUDA graphs with
    options.cuda_graph) and the tensors they read besides the cache, steps and fixed."""
    pos: torch.Tensor     # (1,) the step the next frame samples
    tokens: torch.Tensor  # (rows, K, 1) its input step
    within: Callable      # a frame inside a chunk of steps (FusedStep), or every frame without chunks
    last: Callable        # the frame of a chunk's last step (which writes the states), or `within`
    chunk: int            # steps per chunk (1: no chunks)
    slot: int             # the first frame's place in its chunk
    noise: "NoiseAhead"   # draws the frames' sampling noise; run them by its blocks()


class KeptFrames:
    """Decoder.frames recorded on tensors of their own (the Decoder's copy of the cache, which a
    KeptPrefill shares, and copies of the first call's steps and fixed), kept for the next decode()
    calls of the same key (key_for): each call copies its cache, steps, fixed and first step in,
    replays the frames (the noise drawn from the call's generators, NoiseAhead), and copies the
    cache and steps out, as decoding them in place leaves them. Copying the cache twice is faster
    than recording anew (a warm-up and a capture per frame). The weights are read where they are,
    and what is derived from them (FusedStep.read_weights) again per call: a model trained in place
    between calls decodes with its new weights."""

    def __init__(self, decoder, model, cache, kept_cache, steps, fixed, start, copies, sampling):
        """kept_cache: the copy of cache to record on (Decoder._cache_like), shared with a KeptPrefill."""
        self.key = self.key_for(model, cache, steps, copies, sampling)
        # the text mask the frames read, copied in at each run (the prefill's graph writes one of its own)
        mask, kept_mask = cache.memory_mask, kept_cache.memory_mask
        if mask is None or kept_mask is None or kept_mask.shape != mask.shape:
            kept_cache.memory_mask = None if mask is None else mask.clone()
        self.cache = kept_cache
        self.steps, self.fixed = steps.clone(), fixed.clone()
        self.copies = copies
        self.step = decoder.step_function(model, cache.position.shape[0])
        self.frames = decoder.frames(model, self.cache, self.steps, self.fixed, start, copies, sampling, self.step,
                                     warm_up_in_place=True)
        if isinstance(self.step, FusedStep):
            self.step.flush(self.cache)  # no steps pending after the warm-up's (each run starts a chunk)

    @staticmethod
    def key_for(model, cache, steps, copies, sampling):
        """What the recorded frames depend on besides the values they read: the model and where its
        weights are (not their values), the shapes and dtypes of the tensors, the sampling settings
        (not the generators: the frames draw nothing)."""
        tensors = _shapes([*_cache_tensors(cache), steps])
        return _model_key(model), tensors, copies, sampling.cfg_scale, sampling.top_k, sampling.temperature

    def run(self, cache, steps, fixed, start, generator, progress=False):
        """Decoder.decode on the kept frames: steps (b, K, n_steps) from step `start` on, continuing
        from cache; cache, steps and generator (None, one, or a list) left as decoding in place would."""
        for mine, theirs in zip(_cache_tensors(self.cache), _cache_tensors(cache)):
            mine.copy_(theirs)
        self.steps.copy_(steps)
        self.fixed.copy_(fixed)
        self.frames.pos.fill_(start)
        self.frames.tokens.copy_(steps[..., start - 1:start].repeat(self.copies, 1, 1))
        if isinstance(self.step, FusedStep):
            self.step.read_weights()
        f = self.frames
        n, K = steps.shape[-1] - start, f.chunk  # (from the first step of a chunk: blocks of K steps)
        with tqdm(total=n, desc="stage 1", unit="step", leave=False, disable=not progress) as bar:
            for block in f.noise.blocks(start, n, generator):
                for i in range(len(block)):
                    (f.last if i % K == K - 1 else f.within)()
                bar.update(len(block))
        if isinstance(self.step, FusedStep) and n % K:  # (after whole chunks none are pending)
            self.step.flush(self.cache)
        for mine, theirs in zip(_cache_tensors(self.cache), _cache_tensors(cache)):
            theirs.copy_(mine)
        steps.copy_(self.steps)


class KeptPrefill:
    """Decoder.prefill recorded as a CUDA graph on tensors of its own (the inputs, and a copy of the
    cache that the Decoder's KeptFrames share), kept for the next calls of the same key (key_for):
    each call copies its inputs and cache in, replays, and copies the cache out, as model.logits
    leaves it, and returns a copy of the logits. The weights are read where they are."""

    def __init__(self, model, tokens, text, text_mask, kept_cache):
        """kept_cache: the copy of the caller's cache to record on (Decoder._cache_like)."""
        self.key = self.key_for(model, tokens, text, text_mask, kept_cache)
        self.tokens, self.text, self.text_mask = tokens.clone(), text.clone(), text_mask.clone()
        self.cache = kept_cache
        # model.logits sets cache.memory_mask to a tensor of its own: on a view of the kept cache
        # (the same states and positions), so that the frames' graphs keep reading theirs
        self.view = copy.copy(kept_cache)
        self.out = [None]  # the logits
        inputs, view, out = (self.tokens, self.text, self.text_mask), self.view, self.out

        def prefill():  # (holds none of self: the Decoder frees the graph with this object)
            out[0] = model.logits(*inputs, view)

        self.replay = _capture(prefill, lambda: [prefill() for _ in range(2)])

    @staticmethod
    def key_for(model, tokens, text, text_mask, cache):
        """What the recorded prefill depends on besides the values it reads (as KeptFrames.key_for);
        not cache's text mask, which model.logits sets and does not read."""
        return _model_key(model), _states_key(cache), _shapes([tokens, text, text_mask])

    def run(self, tokens, text, text_mask, cache):
        """model.logits(tokens, text, text_mask, cache) on the recorded graph."""
        self.tokens.copy_(tokens)
        self.text.copy_(text)
        self.text_mask.copy_(text_mask)
        for mine, theirs in zip(_states_tensors(self.cache), _states_tensors(cache)):
            mine.copy_(theirs)
        self.replay()
        for mine, theirs in zip(_states_tensors(self.cache), _states_tensors(cache)):
            theirs.copy_(mine)
        cache.position.copy_(self.view.position)
        cache.memory_mask = self.view.memory_mask.clone()
        return self.out[0].clone()


def _states_tensors(cache):
    """The tensors of an ssmttm.InferenceCache's states (each sublayer's), in a fixed order."""
    states = [s for block in cache.states for s in block if s is not None]
    return [t for s in states for t in vars(s).values() if torch.is_tensor(t)]


def _states_key(cache, device=None):
    """The shapes of a cache's state tensors and positions (not of its text mask): _shapes. device: as
    _shapes'."""
    return _shapes([*_states_tensors(cache), cache.position], device)


def _shapes(tensors, device=None):
    """The shapes, dtypes and devices of tensors, a key of what a recording depends on. device: the
    device to name instead of theirs (for tensors on the meta device that stand for some there)."""
    return tuple((t.shape, t.dtype, device or t.device) for t in tensors)


@contextlib.contextmanager
def _kept_apart(cache, kept_cache):
    """Around recording on kept_cache (whose warm-up runs on its tensors in place): where cache shares
    them (Decoder.new_cache), their values saved before and put back after."""
    shared = [t for t, k in zip(_cache_tensors(cache), _cache_tensors(kept_cache)) if t.data_ptr() == k.data_ptr()]
    saved = [t.clone() for t in shared]
    yield
    for t, s in zip(shared, saved):
        t.copy_(s)


def _model_key(model):
    """The model, its mode and where its weights are (not their values): a key of what a recording
    of it depends on."""
    return model, model.training, tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def _cache_tensors(cache):
    """Every tensor of an ssmttm.InferenceCache in a fixed order: each state's, the positions, the text mask."""
    return _states_tensors(cache) + [t for t in (cache.position, cache.memory_mask) if t is not None]


class NoiseAhead:
    """The Exp(1) noise of a decoding's sampling, step by step the numbers the plain loop's sample_next
    draws (ssmttm.exponential_noise: (b, K, V) per step, from the same generator or one per prompt,
    in the same order), drawn ahead of the frames that read them and outside them: into a ring of
    2 * block steps, `ring` (2 * block, b, K, V), step s at slot s % (2 * block). blocks() hands out
    the steps a block at a time; on CUDA each block's draws are queued on a stream of their own while
    the block before runs. So the frames, and the CUDA graphs recorded of them, draw nothing: no
    generator is registered with a graph, whose every replay would otherwise first set the seed and
    offset of each (two small kernels per generator, 32 per frame at 16 prompts), and later calls of
    kept graphs draw from the caller's generators as they are. draws=False (greedy sampling): no ring
    (None), no draws."""

    BLOCK = 16  # steps per block without chunks of steps (Decoder.frames: else a chunk)

    def __init__(self, shape, V, device, block=BLOCK, draws=True):
        device = torch.device(device)
        self.block = block
        self.ring = torch.empty(2 * block, *shape, V, device=device) if draws else None
        cuda = draws and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.drawn = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None  # per half of the ring
        self.read = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None

    def blocks(self, start, n, generator):
        """Steps start .. start + n - 1 as ranges of at most `block` steps, each yielded once its
        noise is drawn (on CUDA: once the current stream waits for the draws); the caller then queues
        the frames of its steps on the current stream, and the next block's draws are queued after
        them, to run beside them. generator: Sampling.generator (None: the default one; one; or a
        list, one per prompt)."""
        blocks = [range(s, min(s + self.block, start + n)) for s in range(start, start + n, self.block)]
        if self.stream is not None and blocks:  # the ring's last readers: the work queued before
            self.stream.wait_stream(torch.cuda.current_stream(self.ring.device))
        if blocks:
            self._draw(blocks[0], generator, 0)
        for j, block in enumerate(blocks):
            if self.stream is not None:
                torch.cuda.current_stream(self.ring.device).wait_event(self.drawn[j % 2])
            yield block
            if self.stream is not None:  # the frames of this block, queued by the caller, read this half
                self.read[j % 2].record(torch.cuda.current_stream(self.ring.device))
            if j + 1 < len(blocks):
                self._draw(blocks[j + 1], generator, (j + 1) % 2)

    def _draw(self, steps, generator, half):
        """Draw the noise of these steps into their slots (the ring's half `half`), after the frames
        that read that half last."""
        if self.ring is None:
            return
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if self.stream is not None:
                self.stream.wait_event(self.read[half])
            for s in steps:
                slot = self.ring[s % self.ring.shape[0]]
                ssmttm.exponential_noise(slot, generator, out=slot)
            if self.stream is not None:
                self.drawn[half].record(self.stream)


class FusedStep:
    """fused_step for one model, called as its step: (tokens (rows, K, 1), cache) -> logits.

    With chunks of steps (decode_chunk > 1, kernels.ssm_chunk_step), each Mamba-2 state in a cache
    is the one at the start of its chunk, and the steps since wait in kernels.PendingSteps, kept here
    per cache (made at the first step on it, or by pending(cache)): flush(cache) adds them to the
    states, which are then the plain model's after the same steps. Before that, the plain model's
    step must not continue from that cache. A caller that knows where the chunks end says so
    (ends_chunk); otherwise each layer's state is written by kernels.fold_chunk, launched at every
    step on a CUDA stream of its own, beside the layers after it, and the step ends once they are
    all written. split_k: counters for linear_rows' split_k, one row for the kernels on the current
    stream and one per group of rows (fused_step). fold_norm: in_weights, per block, per sublayer,
    a Mamba-2 layer's in_proj weight times its norm's weight (linear_rows' norm_folded; else None),
    made here and again by read_weights."""

    def __init__(self, model, A, freqs, pdl, groups, chunk, split_k=True, fold_norm=False):
        self.model, self.A, self.freqs, self.pdl, self.groups, self.chunk = model, A, freqs, pdl, groups, chunk
        self.in_weights = [[torch.empty_like(layer.in_proj.weight, requires_grad=False)
                            if fold_norm and isinstance(layer, Mamba2) else None for layer in block.layers]
                           for block in model.blocks]
        self._fold_norms()
        self._pending = weakref.WeakKeyDictionary()  # cache -> per block, per sublayer: PendingSteps or None
        device = model.embed.weight.device
        self.counters = torch.zeros(1 + len(groups or ()), kernels.SPLIT_OUTPUTS, dtype=torch.int32,
                                    device=device) if split_k else None
        self.fold_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, tokens, cache, ends_chunk=None):
        """logits (rows, K, 1, 1025) of the next step of tokens (rows, K, 1) from cache. ends_chunk:
        whether this step is the last of its chunk in every row (chunk_slot says where it is), or
        None: not known here, the states then written by kernels.fold_chunk, launched at every step.
        With True or False, the step takes kernels.ssm_chunk_end or ssm_chunk_step alone."""
        pending = self.pending(cache)
        logits = fused_step(self.model, tokens, cache, self.A, self.freqs, self.pdl, self.groups, pending,
                            self.counters, self.fold_stream, ends_chunk, self.in_weights)
        first = _first(pending)
        if first is not None:  # after every layer's kernels: the next step's place in its chunk
            if self.fold_stream is not None and ends_chunk is None:
                torch.cuda.current_stream(tokens.device).wait_stream(self.fold_stream)  # the states written
            first.slot.add_(1).remainder_(first.chunk)
        return logits

    def read_weights(self):
        """Compute A = -exp(A_log) and in_weights again, in place (for graphs recorded on them): after the
        weights changed."""
        for block_A, block in zip(self.A, self.model.blocks):
            for A, layer in zip(block_A, block.layers):
                if A is not None:
                    A.copy_(layer.A())
        self._fold_norms()

    @torch.no_grad()
    def _fold_norms(self):
        """in_weights = in_proj's weight * the norm's weight (each column of W by its input's weight), rounded
        once to W's dtype."""
        for block_in, block in zip(self.in_weights, self.model.blocks):
            for folded, norm, layer in zip(block_in, block.norms, block.layers):
                if folded is None:
                    continue
                W, w = layer.in_proj.weight, norm.weight
                if w.dtype == W.dtype:
                    torch.mul(W, w, out=folded)
                else:
                    folded.copy_(W.float() * w.float())

    def chunk_slot(self, cache):
        """(K, slot): the chunk length and the step's place in it, the same in every row (one host
        synchronisation), for cache's pending steps; None for steps of one (no chunks)."""
        first = _first(self.pending(cache))
        if first is None:
            return None
        slot = first.slot[0].item()
        if not bool((first.slot == slot).all()):
            raise ValueError("FusedStep.chunk_slot: the rows are at different places of their chunks")
        return first.chunk, slot

    def pending(self, cache):
        """The pending steps of each Mamba-2 state of cache (per block, per sublayer; None for other
        sublayers, or all None for steps of one), made empty at the first call."""
        if cache not in self._pending:
            ssm = [s.ssm for block in cache.states for s in block if isinstance(s, Mamba2State)]
            chunk = self.chunk or (decode_chunk_for(ssm[0].shape[0], ssm[0].dtype) if ssm else 1)
            slot = torch.zeros(cache.position.shape[0], dtype=torch.int32, device=cache.position.device)
            self._pending[cache] = [
                [kernels.PendingSteps.empty(s.ssm, chunk, layer.ngroups, layer.in_proj.weight.dtype, slot)
                 if isinstance(s, Mamba2State) and chunk > 1 else None for s, layer in zip(states, block.layers)]
                for states, block in zip(cache.states, self.model.blocks)]
        return self._pending[cache]

    def flush(self, cache):
        """Add each Mamba-2 layer's pending steps to its state in cache (kernels.fold_chunk's
        every_row: fold_pending's sum in one kernel per layer); none are pending after."""
        pending = self._pending.get(cache, [])
        for states, block_pending in zip(cache.states, pending):
            for s, p in zip(states, block_pending):
                if p is not None:
                    kernels.fold_chunk(s.ssm, p, every_row=True)
        first = _first(pending)
        if first is not None:
            first.slot.zero_()  # (one tensor for all layers)


def _first(pending):
    """The first of the layers' PendingSteps (per block, per sublayer), or None."""
    return next((p for block in pending for p in block if p is not None), None)


def decode_chunk_for(rows, state_dtype):
    """FastOptions.decode_chunk by default: chunks of 16 steps past 2 rows for an fp32 state, past 4
    for a bf16 one; at fewer rows the state moves too few bytes for ssm_chunk_step's second kernel to
    pay. Chunks of 32 for an fp32 state from 32 rows: there a state read costs more than the longer
    chunk's pending steps; not with a bf16 state, nor at 8 rows (frames measured at 2-128 rows,
    BENCHMARKS.md §0b)."""
    if rows <= 2 or (state_dtype != torch.float32 and rows <= 4):
        return 1
    return 32 if state_dtype == torch.float32 and rows >= 32 else 16


def decode_streams_for(model, rows):
    """FastOptions.decode_streams by default: 2 streams where two groups of rows take faster kernels
    than all rows at once (kernels._default_path), so that one group's products, run beside the
    other's state update, gain more than reading every weight twice costs: 3-4 rows (groups of 1-2
    on CUDA cores, faster there than split_k from 4 rows) and CORE_ROWS + 1 to 2 * CORE_ROWS rows
    (groups of up to CORE_ROWS: in_proj in one kernel, not cuBLAS's product and a kernel after it).
    Elsewhere 1, and for blocks with attention (frames measured at 2-128 rows, BENCHMARKS.md §0b)."""
    if _unsplit_sublayers(model):
        return 1
    return 2 if 2 < rows <= 4 or kernels.CORE_ROWS < rows <= 2 * kernels.CORE_ROWS else 1


def _unsplit_sublayers(model):
    """The model's kinds of sublayer whose decoding state row_groups does not split by rows."""
    return sorted({kind for block in model.blocks for kind in block.layout} - {"mamba", "ff"})


def row_groups(model, rows, n, device):
    """n groups of consecutive rows for blocks_on_streams: [(CUDA stream, stream for its ssm_step or
    None, slice of the rows)], sizes differing by at most one; no streams on a CPU. Raises ValueError
    for sublayers other than Mamba-2 and feed-forward, whose states are not split by rows here.

    Groups past kernels.CORE_ROWS rows run their state updates on a stream of their own at a lower
    priority than the rest: the GPU hands SMs freed by one group's state update (thousands of short
    programs) to the other group's pending products first, instead of to that update's next programs
    in launch order. Up to CORE_ROWS rows, in_proj's kernel hands over to ssm_step through PDL, which
    needs them on one stream, and that was faster (frames measured, BENCHMARKS.md §0b)."""
    unsplit = _unsplit_sublayers(model)
    if unsplit:
        raise ValueError(f"FastOptions.decode_streams > 1 needs blocks of Mamba-2 and feed-forward sublayers, "
                         f"not {', '.join(unsplit)}")
    device = torch.device(device)
    groups = []
    for i in range(n):
        rows_i = slice(rows * i // n, rows * (i + 1) // n)
        if device.type != "cuda":
            groups.append((None, None, rows_i))
        elif rows_i.stop - rows_i.start > kernels.CORE_ROWS:  # lower number: higher priority
            groups.append((torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device, priority=0), rows_i))
        else:
            groups.append((torch.cuda.Stream(device), None, rows_i))
    return groups


def fused_step(model, tokens, cache, A, freqs, pdl=True, groups=None, pending=None, counters=None,
               fold_stream=None, ends_chunk=None, in_weights=None):
    """TextToMusicLM.step for one step, tokens (rows, K, 1) -> logits (rows, K, 1, 1025), in the
    kernels of gpu_kernels.py (rows and widths within kernels.fits_linear_rows). A: per block, per
    sublayer, A = -exp(A_log) of a Mamba-2 layer (else None); freqs: the position frequencies.
    groups: the blocks for groups of rows, each on its own stream (row_groups, blocks_on_streams).
    pending: per block, per sublayer, kernels.PendingSteps for Mamba-2 layers in chunks of steps
    (FusedStep; the caller advances their slot), or None. counters: int32 zeros (1 + groups, n)
    for linear_rows' split_k, row 0 for the kernels on the current stream, row 1 + i for group i's
    (streams that may run at once need their own), or None: no split_k. fold_stream, ends_chunk: as
    mamba2_fused_step's; the caller joins fold_stream before the slot advances. in_weights: per block, per
    sublayer, FusedStep's in_proj weights with the norm folded in (or None), as fused_blocks'."""
    rows, K, _ = tokens.shape
    x = kernels.embed_rows(tokens[..., 0], model.offsets, model.embed.weight, cache.position, freqs,
                           advance=True)  # and position += 1
    own = None if counters is None else counters[0]
    if groups:
        x, xn = blocks_on_streams(model, x, cache, A, pdl, groups, pending, counters, fold_stream, ends_chunk,
                                  in_weights)
    else:
        x, xn = fused_blocks(model, x, cache.states, cache.memory_mask, A, pdl, pending=pending, counters=own,
                             fold_stream=fold_stream, ends_chunk=ends_chunk, in_weights=in_weights)
    x_in, norm_weight, eps = _normed(x, xn, model.norm_f)
    logits = kernels.linear_rows(x_in, model.head.weight, norm_weight=norm_weight, eps=eps, pdl=pdl, counters=own)
    return logits.view(rows, 1, K, ssmttm.CODEBOOK_SIZE + 1).transpose(1, 2)


def blocks_on_streams(model, x, cache, A, pdl, groups, pending, counters=None, fold_stream=None, ends_chunk=None,
                      in_weights=None):
    """fused_blocks for x (rows, d), each group of rows (row_groups: stream, rows) through every
    block on its own CUDA stream (None: the current stream, after the groups before it). While
    decoding, rows are independent: one group's ssm_step, which moves the state, can run beside
    another group's products, which read the weights (once per group). In a CUDA graph the streams
    are branches between a fork and a join. pending: as fused_blocks', for all rows, or None. counters:
    as fused_step's (group i takes row 1 + i), or None. fold_stream, ends_chunk, in_weights: fused_step's. Returns
    (x, norm_f(x) or None) as fused_blocks."""
    current = torch.cuda.current_stream(x.device) if x.is_cuda else None
    # the heads take norm_f(x) of all rows or of none: from every group, or from none
    head_norm = _takes_normed(x.shape[0], model.head.weight, None if counters is None else counters[0])
    out = torch.empty_like(x)
    out_n = torch.empty_like(x, dtype=model.norm_f.weight.dtype) if head_norm else None
    for i, (stream, ssm_stream, rows) in enumerate(groups):
        if stream is not None:
            stream.wait_stream(current)  # the fork: after the embedding
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            states = [[s if s is None else Mamba2State(s.conv[rows], s.ssm[rows]) for s in block_states]
                      for block_states in cache.states]
            rows_pending = pending and [[p if p is None else p.rows(rows) for p in block] for block in pending]
            h, hn = fused_blocks(model, x[rows], states, None, A, pdl, head_norm, ssm_stream, rows_pending,
                                 None if counters is None else counters[1 + i], fold_stream, ends_chunk, in_weights)
            out[rows] = h
            if head_norm:
                out_n[rows] = hn
    for stream, *_ in groups:
        if stream is not None:
            current.wait_stream(stream)  # the join: before the heads
    return out, out_n


def fused_blocks(model, x, states, memory_mask, A, pdl=True, head_norm=None, ssm_stream=None, pending=None,
                 counters=None, fold_stream=None, ends_chunk=None, in_weights=None):
    """The blocks of ssmttm.TextToMusicLM for one decoding step, x (rows, d) -> (x, xn): Mamba-2 and
    feed-forward sublayers in gpu_kernels.py's kernels (norm and residual included), the others as they
    are. Where the next product takes its input normed (_takes_normed: past kernels.CORE_ROWS rows,
    off split_k) a sublayer's last kernel also makes that norm (linear_rows' norm_out), which then
    has no kernel of its own. head_norm: whether the last one makes norm_f(x) for the heads (default:
    where the heads take it normed); xn is then norm_f(x) in the weights' dtype (else None). states,
    A: per block, per sublayer. ssm_stream: where Mamba-2's ssm_step runs (row_groups), else in line.
    pending: per block, per sublayer, the Mamba-2 layers' kernels.PendingSteps (or None: steps of one).
    counters: int32 zeros for linear_rows' split_k (its default where it pays), or None. fold_stream,
    ends_chunk: fused_step's. in_weights: per block, per sublayer, a Mamba-2 layer's in_proj weight with
    its norm's weight folded in (FusedStep), or None: taken where _folds_norm says (then neither a
    kernel of its own nor the one before makes that norm), else in_proj's own."""
    rows = x.shape[0]
    head_norm = _takes_normed(rows, model.head.weight, counters) if head_norm is None else head_norm
    pending = pending or [[None] * len(block.layers) for block in model.blocks]
    in_weights = in_weights or [[None] * len(block.layers) for block in model.blocks]
    sublayers = [(kind, norm, layer, state, layer_A, layer_pending, in_weight)
                 for block, *per_block in zip(model.blocks, states, A, pending, in_weights)
                 for kind, norm, layer, state, layer_A, layer_pending, in_weight in zip(
                     block.layout, block.norms, block.layers, *per_block)]
    first_product = {"mamba": lambda layer: layer.in_proj.weight, "ff": lambda layer: layer.fc1.weight}
    takes_normed = [kind in first_product and _takes_normed(rows, first_product[kind](layer), counters)
                    for kind, norm, layer, *_ in sublayers]
    folded = [in_weight is not None and _folds_norm(rows, layer.in_proj.weight, counters)
              for _, _, layer, *_, in_weight in sublayers]
    after = [(norm, normed and not fold) for (_, norm, *_), normed, fold in zip(sublayers[1:], takes_normed[1:],
                                                                                 folded[1:])]
    after += [(model.norm_f, head_norm)]
    xn = None  # norm(x) of the sublayer about to run, made by the one before it
    for (kind, norm, layer, state, layer_A, layer_pending, in_weight), (next_norm, normed), fold in zip(
            sublayers, after, folded):
        norm_out = (next_norm.weight, next_norm.eps) if normed else None
        if kind == "mamba":
            x, xn = mamba2_fused_step(layer, norm, x, state, layer_A, pdl, xn, norm_out, ssm_stream, layer_pending,
                                      counters, fold_stream, ends_chunk, in_weight if fold else None)
        elif kind == "ff":
            x_in, norm_weight, eps = _normed(x, xn, norm)
            h = kernels.linear_rows(x_in, layer.fc1.weight, layer.fc1.bias, norm_weight, eps, gelu=True, pdl=pdl,
                                    counters=counters)
            x, xn = _split(kernels.linear_rows(h, layer.fc2.weight, layer.fc2.bias, residual=x, norm_out=norm_out,
                                               pdl=pdl, counters=counters))
        elif kind == "cross_attn":
            x, xn = (x[:, None] + layer(norm(x[:, None]), None, memory_mask, state=state))[:, 0], None
        else:
            x, xn = (x[:, None] + layer(norm(x[:, None]), state=state))[:, 0], None
    return x, xn


def _takes_normed(rows, weight, counters):
    """Whether a decoding product of `rows` rows with weight takes its input normed by the kernel
    before it (linear_rows' norm_out): on linear_rows' many_rows path, where the norm is otherwise a
    kernel of its own; the other paths norm x inside the product's kernel. counters: as linear_rows'."""
    return kernels._default_path(rows, weight, split_k=counters is not None) == "many_rows"


def _folds_norm(rows, in_weight, counters):
    """Whether in_proj (in_weight, its weight) takes its norm folded into a copy of its weight at `rows`
    rows (FastOptions.decode_fold_norm): on linear_rows' many_rows path while split_k runs the products
    before it (up to SPLIT_MAX_ROWS rows), whose kernels would need one more kernel to make its norm. Past
    that fc2's residual kernel makes the norm along, and the fold was slower (BENCHMARKS.md §0b).
    counters: as linear_rows'."""
    return counters is not None and rows <= kernels.SPLIT_MAX_ROWS and _takes_normed(rows, in_weight, counters)


def _normed(x, xn, norm):
    """linear_rows' x, norm_weight and eps for a sublayer's product: norm(x) unless the kernel
    before made it (xn), then xn as it is."""
    return (x, norm.weight, norm.eps) if xn is None else (xn, None, norm.eps)


def _split(out):
    """linear_rows' result as (out, normed or None)."""
    return out if isinstance(out, tuple) else (out, None)


def mamba2_fused_step(layer, norm, x, state, A, pdl=True, xn=None, norm_out=None, ssm_stream=None, pending=None,
                      counters=None, fold_stream=None, ends_chunk=None, in_weight=None):
    """x + layer(norm(x)) for one decoding step, x (rows, d_model), in three kernels: norm + in_proj
    + conv, the SSD step + gate (y * silu(z)), norm + out_proj + residual. xn: norm(x) in the
    weights' dtype if the kernel before made it. ssm_stream: a CUDA stream for the SSD step (it
    waits for in_proj's kernel, out_proj's waits for it), else the current one. pending: the
    layer's kernels.PendingSteps for the SSD step in chunks, or None for kernels.ssm_step. In chunks,
    ends_chunk: True at a chunk's last step (kernels.ssm_chunk_end: the output and the state in one
    kernel), False at the others (kernels.ssm_chunk_step, two kernels), None where not known
    (ssm_chunk_step, then kernels.fold_chunk, which writes the state where a row ends its chunk: on
    fold_stream if given, beside the layers after this one, else in line). counters: linear_rows'.
    in_weight: in_proj's weight times norm's weight (FusedStep.in_weights), for linear_rows'
    norm_folded on its many_rows path: x then goes in as it is (xn must be None). Returns (out, the
    next norm of out if norm_out, as linear_rows, else None). Raises ValueError for ngroups != 1 (the
    out_proj kernel normalises y * silu(z) as one group), and for both in_weight and xn."""
    if layer.ngroups != 1:
        raise ValueError(f"mamba2_fused_step: ngroups must be 1 (the LM's), got {layer.ngroups}")
    conv = (state.conv, layer.conv1d.weight[:, 0], layer.conv1d.bias, layer.d_inner)
    if in_weight is not None:
        if xn is not None:
            raise ValueError("mamba2_fused_step: with in_weight (the norm folded in), x goes in as it is, not xn")
        zxbcdt = kernels.linear_rows(x, in_weight, eps=norm.eps, conv=conv, pdl=pdl, counters=counters,
                                     norm_folded=True, path="many_rows")
    else:
        x_in, norm_weight, eps = _normed(x, xn, norm)
        zxbcdt = kernels.linear_rows(x_in, layer.in_proj.weight, norm_weight=norm_weight, eps=eps, conv=conv, pdl=pdl,
                                     counters=counters)
    ssm_args = (layer.dt_bias, layer.D, layer.d_inner, layer.ngroups)

    def ssm():
        if pending is None:
            return kernels.ssm_step(zxbcdt, state.ssm, A, *ssm_args, z_start=0, pdl=pdl)
        if ends_chunk:
            return kernels.ssm_chunk_end(zxbcdt, state.ssm, pending, A, *ssm_args, z_start=0, pdl=pdl)
        y = kernels.ssm_chunk_step(zxbcdt, state.ssm, pending, A, *ssm_args, z_start=0, pdl=pdl)
        if ends_chunk is None and fold_stream is None:
            kernels.fold_chunk(state.ssm, pending)
        elif ends_chunk is None:  # after the step's kernels; the next step's wait for it (FusedStep)
            fold_stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(fold_stream):
                kernels.fold_chunk(state.ssm, pending)
        return y

    if ssm_stream is None:
        gated = ssm()
    else:  # after in_proj's kernel, before out_proj's
        current = torch.cuda.current_stream(x.device)
        ssm_stream.wait_stream(current)
        with torch.cuda.stream(ssm_stream):
            gated = ssm()
        current.wait_stream(ssm_stream)
    out_norm = layer.norm  # a plain RMSNorm now: the gate is in ssm_step
    return _split(kernels.linear_rows(gated, layer.out_proj.weight, norm_weight=out_norm.weight, eps=out_norm.eps,
                                      residual=x, norm_out=norm_out, pdl=pdl, counters=counters))


def _record(frame, tensors, warm_up_in_place=False):
    """Record frame() as a CUDA graph on tensors (what it reads and writes), after _warm_up; returns its
    replay. The frame must draw no random numbers (its noise comes from NoiseAhead). warm_up_in_place:
    _warm_up's in_place."""
    return _capture(frame, lambda: _warm_up(frame, tensors, warm_up_in_place))


def _capture(fn, warm_up):
    """Record fn() as a CUDA graph; returns its replay. Capturing records kernels without running them,
    so first warm_up() runs it (compile, autotune, allocate) on the capture's stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm_up()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)  # the replays after what the capture queued

    def replay():
        graph.replay()

    # The replay holds fn, and with it every tensor the graph reads and writes: one made before the
    # capture and freed after (as NoiseAhead's ring would be) is memory the graph's kernels write
    # into at every replay, while the allocator hands it to other tensors.
    replay.fn = fn
    return replay


def _warm_up(frame, tensors, in_place=False, times=3):
    """Run frame() `times` times on copies of tensors (cache, steps, pos, tokens), or on the tensors
    themselves (in_place: their values are then lost), each time from the same pos."""
    start = tensors[2].clone()
    cache, steps, pos, tokens = tensors if in_place else copy.deepcopy(tensors)
    for _ in range(times):
        pos.copy_(start)
        frame(cache, steps, pos, tokens)
    pos.copy_(start)
