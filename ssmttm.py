"""ssmttm: text-to-music generation with state-space models, the readable model.

After "Training-Efficient Text-to-Music Generation with State-Space Modeling" (Lee et al., 2026).
One file, read top to bottom:

  1. configuration                                    ModelConfig
  2. the delay pattern and the LM loss                delay_pattern, undelay_pattern, lm_loss
  3. Mamba-2 (same parameters as mamba_ssm.Mamba2)    Mamba2, GatedRMSNorm, Mamba2State
  4. the other sublayers                              FeedForward, SelfAttention, CrossAttention
  5. the block and the four LM variants               Block, LAYOUTS, TextToMusicLM
  6. sampling with classifier-free guidance           classifier_free_guidance, sample_next, .generate

Audio is K streams of DAC codes (1024 entries each, 86.13 frames/s); text is the sequence of
Flan-T5 encoder states (768-d). The sequence the LM reads (prefix variants):

    [ text_1 ... text_Lt | begin | x_0 ... x_{S-2} ]      ->  logits for x_0 ... x_{S-1}
      Linear+LayerNorm     all K   sum of K embeddings        K heads, one per codebook
      of the T5 states     special

Cross variants read only [begin | x_0 ... x_{S-2}] and look at the text through cross-attention.

Stage 2, which writes codebooks 2..9 from codebook 1 by latent diffusion, is stage2.py (it reuses
section 4's CrossAttention and section 6's guidance).

Everything here is plain PyTorch and runs anywhere; the SSD inside Mamba-2 is ssd_reference.py.
The GPU kernels live in fast.py and gpu_kernels.py, which import this file (never the other way):
`fast.accelerate(model)` runs the same weights on them, and `model.generate(..., decoder=...)`
takes their prefill and decoding loop. Same checkpoints, same tokens.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ssd_reference import ssd_chunked, ssd_step

CODEBOOK_SIZE = 1024
SPECIAL = CODEBOOK_SIZE  # begin / padding / "no token here" id; embeddings and heads have 1025 rows
FRAME_RATE = 44100 / 512  # DAC 44.1 kHz: 86.13 frames per second


# ------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ModelConfig:
    variant: str = "prefix_simba"  # prefix_mamba | prefix_simba | cross_simba | cross_transformer
    n_layers: int = 24             # N blocks; the paper's RQ3 also uses 12 and 6
    d_model: int = 1024
    d_state: int = 512             # Mamba-2 state size N
    d_conv: int = 4
    expand: int = 2                # d_inner = 2048 -> 32 heads of 64
    headdim: int = 64
    n_heads: int = 8               # attention heads (cross and self)
    d_ff: int = 2048               # feed-forward hidden size, 2 x d_model
    dropout: float = 0.3
    n_codebooks: int = 1           # K: 1 for the coarse stage-1 LM, 9 for single-stage
    d_text: int = 768              # Flan-T5-base hidden size
    # SSD chunk length Q of ssd_chunked. The result does not depend on it; short chunks are the
    # fastest on a CPU (the kernels of fast.py take their own, FastOptions.chunk_size).
    chunk_size: int = 32
    label_smoothing: float = 0.1   # as in the official code

    def __post_init__(self):
        """ValueError naming the field: an unknown variant, a size below 1, an odd d_model (the
        sinusoidal positions take its halves), a rate outside [0, 1); TypeError for a size that is not
        an integer (64.0, True). The head splits are checked by the layers (Mamba2, SelfAttention,
        CrossAttention)."""
        if self.variant not in LAYOUTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(LAYOUTS)}")
        for name in ("n_layers", "d_model", "d_state", "d_conv", "expand", "headdim", "n_heads", "d_ff",
                     "n_codebooks", "d_text", "chunk_size"):
            check_integer(f"ModelConfig.{name}", getattr(self, name), least=1)
        if self.d_model % 2:
            raise ValueError(f"ModelConfig.d_model {self.d_model}: want an even width (the sinusoidal positions "
                             "are its cos and sin halves)")
        for name in ("dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} {getattr(self, name)}: want a rate in [0, 1)")

    @property
    def prefix(self):
        return self.variant.startswith("prefix")


def check_integer(name, value, least=None):
    """TypeError naming `name` unless value is an integer: a float (even 64.0) or a bool is refused,
    so that a size fails here and not deep inside torch; ValueError if it is below `least` (None: any).
    A torch.SymInt is an integer: a size torch.compile or make_fx traces as a symbol (dynamic shapes),
    such as rows padded from a traced length, which no caller could otherwise pass."""
    if not isinstance(value, (numbers.Integral, torch.SymInt)) or isinstance(value, bool):
        raise TypeError(f"{name} {value!r}: want an integer")
    if least is not None and value < least:
        raise ValueError(f"{name} {value}: want {least} or more")


def as_codes(name, codes):
    """codes as int64, the dtype the embeddings and the loss index with; TypeError naming `name` unless
    they are a torch tensor of int16, int32 or int64, the integer dtypes that hold every id 0..1024 (a
    lossless conversion: codes of a .npy or of an int32 kernel are taken as they are). Refused, as their
    ids are not the codes: a bool tensor (a mask: read as ids 0 and 1), uint8 or int8 (1024 and every
    code above 255 or 127 wrap), floats (they fail deep in an embedding or the loss), numpy arrays."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int16, torch.int32, torch.int64):
        kind = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{name}: {kind}: want a torch tensor of integer codes (int16, int32 or int64)")
    return codes.long()


def check_same_shape(where, name, t, other_name, other):
    """ValueError naming `where` and `name` unless t has other's shape: a pair that torch would broadcast
    (a row of 1 against b rows, a missing leading dim) would give every row the one row's values, silently."""
    if t.shape != other.shape:
        raise ValueError(f"{where}: {name} {tuple(t.shape)} for {other_name} {tuple(other.shape)}: want one shape")


def check_numbers(where, name, t, integer=False):
    """TypeError naming `where` and `name` unless t is a torch tensor of floating point numbers (integer=True:
    or of integers). A numpy array or a list would fail later on a missing tensor method, and a bool
    tensor (a mask) would be read as the numbers 0 and 1. A dtype check only: no GPU sync."""
    numeric = isinstance(t, torch.Tensor) and (t.is_floating_point() or integer and not t.is_complex()
                                               and t.dtype != torch.bool)
    if not numeric:
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{where}: {name} {kind}: want a torch tensor of floating point "
                        f"{'or integer ' if integer else ''}numbers")


def check_state_batch(where, state, fields, b):
    """ValueError naming `where`, the state's field and both batch sizes unless each of the state's `fields`
    has b rows, one per row of the input: a state of 1 row would be broadcast against b rows (one row's
    keys written into every row of a KV cache, one text read by every row), another batch would fail deep
    in torch. Python shape checks only: these run at every decoding step."""
    for field in fields:
        rows = getattr(state, field).shape[0]
        if rows != b:
            raise ValueError(f"{where}: {type(state).__name__}.{field} of batch {rows} for an input of batch {b}: "
                             "want one state row per input row")


# ------------------------------------------------------------------------------------------------
# 2. Delay pattern (MusicGen) and loss


def delay_pattern(codes, special=SPECIAL):
    """(b, K, T) codes -> (b, K, T + K - 1): codebook k shifted right by k steps, empty slots special.
    Step s then holds codebook k of frame s - k, so one step predicts all K codebooks at once while
    codebook k still sees codebooks j < k of its own frame (generated k - j steps earlier).
    int64 out; TypeError for codes of another kind (as_codes)."""
    codes = as_codes("delay_pattern: codes", codes)
    b, K, T = codes.shape
    out = codes.new_full((b, K, T + K - 1), special)
    for k in range(K):
        out[:, k, k:k + T] = codes[:, k]
    return out


def undelay_pattern(delayed):
    """Exact inverse of delay_pattern: (b, K, T + K - 1) -> (b, K, T). ValueError for fewer than K - 1
    steps (no delay_pattern output has them); TypeError for codes of another kind (as_codes). int64 out."""
    delayed = as_codes("undelay_pattern: delayed", delayed)
    b, K, S = delayed.shape
    T = S - K + 1
    if T < 0:
        raise ValueError(f"undelay_pattern: {S} steps of {K} codebooks; a delayed layout has at least K - 1 = {K - 1}")
    return torch.stack([delayed[:, k, k:k + T] for k in range(K)], dim=1)


def lm_loss(logits, targets, label_smoothing=0.0, counts=None):
    """Cross-entropy per codebook, averaged over codebooks; special targets (padding and the empty
    slots of the delay pattern) are ignored. logits (b, K, s, V), targets (b, K, s). counts (K,): the
    real targets of each codebook in the whole batch this one is a part of (a training step's
    micro-batches on every process); the loss is then this part's share of that batch's loss, and the
    parts' shares add up to it, whatever the padding of each (None: the whole batch is this one).
    ValueError for targets of another shape than logits' (b, K, s), and counts that are not (K,) (a scalar
    or (1,) would broadcast over the codebooks, (b, K) over a batch axis the loss does not have); TypeError
    for targets of another kind (as_codes: a uint8 target can never be the special id, so padding would
    count as code 0) and counts that are no torch tensor of integers or floats (check_numbers: a list fails
    on .shape, a bool tensor would count 1 target per codebook; train.py passes float32 sums)."""
    targets = as_codes("lm_loss: targets", targets)
    b, K, s, V = logits.shape
    if targets.shape != (b, K, s):
        raise ValueError(f"lm_loss: targets {tuple(targets.shape)} for logits {tuple(logits.shape)}: "
                         f"want ({b}, {K}, {s})")
    if counts is not None:
        check_numbers("lm_loss", "counts", counts, integer=True)
    if counts is not None and counts.shape != (K,):
        raise ValueError(f"lm_loss: counts {tuple(counts.shape)} for logits {tuple(logits.shape)}: want ({K},), "
                         "one count per codebook")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits -> fp32 loss
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=SPECIAL,
                         label_smoothing=label_smoothing, reduction="none").view(b, K, s)
    valid = (targets != SPECIAL).float()
    per_codebook = (ce * valid).sum((0, 2)) / (valid.sum((0, 2)) if counts is None else counts).clamp(min=1)
    return per_codebook.mean()


# ------------------------------------------------------------------------------------------------
# 3. Mamba-2


@dataclass
class Mamba2State:
    """What one Mamba-2 layer carries from step to step while decoding (updated in place)."""
    conv: torch.Tensor  # (b, conv_dim, d_conv): the last d_conv inputs of the causal conv
    ssm: torch.Tensor   # (b, nheads, headdim, d_state): h_t


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight over each of `groups` channel groups, in float32 or above:
    Mamba-2's norm before out_proj. Returns z's dtype."""

    def __init__(self, d, groups=1, eps=1e-5):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z):
        dtype = torch.promote_types(torch.promote_types(y.dtype, z.dtype), torch.float32)
        y = (y.to(dtype) * F.silu(z.to(dtype))).unflatten(-1, (self.groups, -1))
        y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (y * self.weight.to(dtype)).to(z.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 layer (Dao & Gu 2024), with the parameter names, shapes and initialisation of
    mamba_ssm.Mamba2 (no D per channel, gate before the norm), so a state_dict loads into either.

    u (b, l, d_model) -> in_proj -> [z | xBC | dt] -> causal depthwise conv + SiLU on xBC -> x, B, C
    -> SSD with dt = softplus(dt + dt_bias), A = -exp(A_log) (ssd_reference.py) -> y + D x
    -> norm(y, z) -> out_proj. ValueError for a size below 1, for an A_init_range or (dt_min, dt_max) not
    0 < low <= high, and unless expand * d_model splits into heads of headdim and the heads into ngroups groups;
    TypeError for a size that is not an integer (64.0, True). Past d_conv the arguments are keyword-only:
    mamba_ssm.Mamba2's fourth is conv_init, so a positional call would mean another layer there. chunk_size
    defaults to 32 (mamba_ssm: 256), the fastest on a CPU; the result does not depend on it."""

    def __init__(self, d_model, d_state=128, d_conv=4, *, expand=2, headdim=64, ngroups=1, chunk_size=32,
                 A_init_range=(1, 16), dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        for name, size in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                           ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            check_integer(f"Mamba2: {name}", size, least=1)
        for name, (low, high) in (("A_init_range", A_init_range), ("(dt_min, dt_max)", (dt_min, dt_max))):
            if not 0 < low <= high:  # (mamba_ssm.Mamba2 asserts it for A) a log of the draws below: NaN or -inf
                raise ValueError(f"Mamba2: {name} ({low}, {high}): want 0 < low <= high")
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.ngroups, self.chunk_size = ngroups, chunk_size
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        if self.d_inner % headdim or self.nheads % ngroups:
            raise ValueError(f"Mamba2: d_inner {self.d_inner} must split into heads of {headdim} values and those "
                             f"heads into {ngroups} groups")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)  # z,xBC,dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1)
        # dt ~ log-uniform in [dt_min, dt_max], stored through the inverse of softplus
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def A(self):
        """A = -exp(A_log) (nheads,), in float32 or above: it sets the decay rates."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def new_state(self, batch, max_len, device, dtype, ssm_dtype=None):
        """An empty state (the start of a sequence). ssm_dtype: how h_t is stored between steps
        (default: fp32 or above); each step computes in fp32 or above whatever it is stored in. TypeError
        for an ssm_dtype that is no floating-point torch.dtype (an integer state would silently truncate h_t
        at every step; a name such as "float32" fails deep in torch.zeros)."""
        if ssm_dtype is not None and not (isinstance(ssm_dtype, torch.dtype) and ssm_dtype.is_floating_point):
            raise TypeError(f"ssm_dtype {ssm_dtype!r}: want a floating-point torch.dtype (or None: fp32 or above)")
        return Mamba2State(conv=torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                           ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                           dtype=ssm_dtype or torch.promote_types(dtype, torch.float32)))

    def forward(self, u, mask=None, state=None):
        """u (b, l, d_model) -> (b, l, d_model). mask (b, l): False at padding, which must come first
        in its row (left padding). state: a Mamba2State to continue from and update in place (the
        prefill, then one step per token); None when training. No positions (l = 0): no output, the
        state unchanged. ValueError for a mask that is not bool (b, l), and a state of another batch than u
        (check_state_batch)."""
        if state is not None:
            check_state_batch("Mamba2", state, ("conv", "ssm"), u.shape[0])
        if u.shape[1] == 0:  # (the conv has nothing to slide over)
            return self.out_proj(u.new_zeros(*u.shape[:2], self.d_inner))
        if state is not None and u.shape[1] == 1 and mask is None:
            return self.step(u, state)
        if mask is not None and (mask.dtype != torch.bool or mask.shape != u.shape[:2]):
            raise ValueError(f"Mamba2: mask {tuple(mask.shape)} {mask.dtype}: want torch.bool {tuple(u.shape[:2])}, "
                             "False at (left) padding")
        zxbcdt = self.in_proj(u)
        if mask is not None:
            zxbcdt = self.mask_padding(zxbcdt, mask)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.silu(self.conv(xBC, state))
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b, l, _ = u.shape
        y, final_state = self.ssd(x.view(b, l, self.nheads, self.headdim), dt,
                                  B.view(b, l, self.ngroups, self.d_state), C.view(b, l, self.ngroups, self.d_state),
                                  None if state is None else state.ssm)
        if state is not None:
            state.ssm.copy_(final_state)
        return self.out_proj(self.norm(y.reshape(b, l, self.d_inner), z))

    def mask_padding(self, zxbcdt, mask):
        """Make padded positions leave no trace: xBC = 0 (the conv then sees zeros, as at the start
        of a sequence) and dt -> 0, so exp(dt A) = 1 and dt x B = 0: the state passes unchanged.
        With the padding on the left, the result is exactly that of the unpadded sequence."""
        pad = torch.zeros(zxbcdt.shape[-1], device=zxbcdt.device, dtype=zxbcdt.dtype)
        pad[-self.nheads:] = -1e4  # softplus(-1e4 + dt_bias) == 0 in float32
        return torch.where(mask[..., None], zxbcdt, pad)

    def conv(self, xBC, state=None):
        """Causal depthwise conv over time: (b, l, conv_dim) -> (b, l, conv_dim), without the SiLU.
        With a state, the window starts from its last inputs, and it keeps the new last ones."""
        l = xBC.shape[1]
        xBC = xBC.transpose(1, 2)
        if state is None:
            return self.conv1d(xBC)[..., :l].transpose(1, 2)
        window = torch.cat([state.conv[..., 1:].to(xBC.dtype), xBC], dim=-1)  # d_conv - 1 inputs of history
        state.conv.copy_(torch.cat([state.conv, xBC.to(state.conv.dtype)], dim=-1)[..., -self.d_conv:])
        return F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim).transpose(1, 2)

    def ssd(self, x, dt, B, C, initial_state=None):
        """The SSD with this layer's dt_bias, A and D, in fp32 or above: x (b, l, h, p), dt (b, l, h)
        before the softplus, B, C (b, l, g, n), initial_state (b, h, p, n) or None -> y (b, l, h, p)
        in x's dtype, and the final state."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            h0 = None if initial_state is None else initial_state.to(dtype)
            y, final = ssd_chunked(x.to(dtype), dt, self.A().to(dtype), B.to(dtype), C.to(dtype),
                                   self.chunk_size, D=self.D.to(dtype), initial_state=h0)
        return y.to(x.dtype), final

    def step(self, u, state):
        """One decoding step, O(1) in the position: u (b, 1, d_model) -> (b, 1, d_model). ValueError
        for more than one position (forward takes those)."""
        if u.shape[1] != 1:
            raise ValueError(f"Mamba2.step: u {tuple(u.shape)}: one position; forward with the state takes more")
        b = u.shape[0]
        z, xBC, dt = self.in_proj(u[:, 0]).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        state.conv.copy_(torch.cat([state.conv[..., 1:], xBC[..., None].to(state.conv.dtype)], dim=-1))
        xBC = F.silu((state.conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias).to(z.dtype)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        f32 = torch.promote_types(state.ssm.dtype, torch.float32)  # fp32 whatever h_t is stored in
        dt = F.softplus(dt.to(f32) + self.dt_bias.to(f32))
        x, B, C = (x.view(b, self.nheads, self.headdim), B.view(b, self.ngroups, self.d_state),
                   C.view(b, self.ngroups, self.d_state))
        y, h = ssd_step(*(t.to(f32) for t in (state.ssm, x, dt, self.A(), B, C, self.D)))
        state.ssm.copy_(h)
        return self.out_proj(self.norm(y.reshape(b, self.d_inner).to(z.dtype), z))[:, None]


# ------------------------------------------------------------------------------------------------
# 4. Feed-forward and attention


class FeedForward(nn.Module):
    """SiMBA's channel mixing, kept simple as in the paper: Linear d->2d, GELU, dropout, Linear 2d->d."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


@dataclass
class KVCache:
    k: torch.Tensor   # (b, heads, max_len, head_dim)
    v: torch.Tensor
    length: int = 0


def check_head_split(layer, d_model, n_heads):
    """ValueError unless n_heads (1 or more) splits d_model into heads of equal width; TypeError for an
    n_heads that is not an integer (2.0, True)."""
    check_integer(f"{layer}: n_heads", n_heads)
    if n_heads < 1 or d_model % n_heads:
        raise ValueError(f"{layer}: d_model {d_model} must split into n_heads = {n_heads} heads of equal width")


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (scaled_dot_product_attention), with a KV cache for decoding."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        check_head_split("SelfAttention", d_model, n_heads)
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout  # on the attention weights; the block drops the output

    def new_state(self, batch, max_len, device, dtype):
        shape = (batch, self.n_heads, max_len, self.qkv.in_features // self.n_heads)
        return KVCache(*(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2)))

    def forward(self, x, state=None):
        """x (b, s, d) -> (b, s, d). state: a KVCache to append to (decoding), None when training.
        ValueError when the cache has no room for the s new positions (new_state's max_len), or is of another
        batch than x (check_state_batch: a cache of b rows would take the keys of 1 row in each)."""
        b, s, d = x.shape
        if state is not None:
            check_state_batch("SelfAttention", state, ("k", "v"), b)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        if state is None:
            drop = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:  # append to the cache, attend to everything so far
            t0 = state.length
            if t0 + s > state.k.shape[2]:
                raise ValueError(f"SelfAttention: a KV cache of {state.k.shape[2]} positions holds {t0}; no room "
                                 f"for {s} more (make the InferenceCache with a larger max_len)")
            state.k[:, :, t0:t0 + s], state.v[:, :, t0:t0 + s] = k, v
            state.length = t0 + s
            k, v = state.k[:, :, :t0 + s], state.v[:, :, :t0 + s]
            causal = None
            if s > 1:  # query i (at position t0 + i) sees positions <= t0 + i
                positions = torch.arange(t0 + s, device=x.device)
                causal = positions <= positions[t0:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, s, d))


@dataclass
class TextKV:
    """Cross-attention's decoding state: the projected text, computed once at the prefill."""
    k: Optional[torch.Tensor] = None  # (b, heads, lt, head_dim)
    v: Optional[torch.Tensor] = None


class CrossAttention(nn.Module):
    """Multi-head attention from the audio to the text, which must not see padded text positions.
    A row without any text (the null condition of guidance) attends to nothing: its heads' output is
    zero, so the layer returns out_proj's bias."""

    def __init__(self, d_model, n_heads, dropout, d_memory=None):
        super().__init__()
        check_head_split("CrossAttention", d_model, n_heads)
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_memory or d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout  # on the attention weights; the block drops the output

    def new_state(self, batch, max_len, device, dtype):
        return TextKV()

    def forward(self, x, memory, memory_mask, state=None):
        """x (b, s, d), memory (b, lt, d_memory), memory_mask (b, lt) True at real text -> (b, s, d).
        state: a TextKV; filled from memory at the first call, read (memory unused) after. ValueError
        without memory to read, for memory or a filled TextKV of another batch than x (check_state_batch: a TextKV
        of 1 row would give every row its text) or memory of another width than d_memory, or for a
        memory_mask that is not bool (b, lt)."""
        b, s, d = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)
        if state is not None and state.k is not None:
            check_state_batch("CrossAttention", state, ("k", "v"), b)
            k, v = state.k, state.v
        elif memory is None:
            raise ValueError("CrossAttention: no memory (the text states) and no TextKV filled from it")
        elif memory.dim() != 3 or memory.shape[0] != b:
            raise ValueError(f"CrossAttention: memory {tuple(memory.shape)}: want ({b}, lt, d_memory), one text per "
                             "row of x")
        elif memory.shape[2] != self.kv_proj.in_features:
            raise ValueError(f"CrossAttention: memory {tuple(memory.shape)}: want d_memory = "
                             f"{self.kv_proj.in_features} values per text position")
        else:
            k, v = (t.view(b, memory.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)
                    for t in self.kv_proj(memory).split(d, dim=-1))
            if state is not None:
                state.k, state.v = k, v
        if memory_mask is None or memory_mask.dtype != torch.bool or memory_mask.shape != (b, k.shape[2]):
            raise ValueError(f"CrossAttention: memory_mask {None if memory_mask is None else tuple(memory_mask.shape)}"
                             f": want bool ({b}, {k.shape[2]}), True at real text")
        has_text = memory_mask.any(-1)[:, None, None, None]
        mask = memory_mask[:, None, None, :] | ~has_text  # a row with no text would be all -inf (NaN)
        drop = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop) * has_text
        return self.out_proj(y.transpose(1, 2).reshape(b, s, d))


# ------------------------------------------------------------------------------------------------
# 5. The block and the LM

# Each block is a sequence of pre-norm residual sublayers, x = x + Dropout(f(RMSNorm(x))) (paper, Fig. 1;
# the output's dropout as in the official code and MusicGen).
LAYOUTS = {
    "prefix_mamba": ("mamba", "mamba"),                       # (a) sequence mixing only
    "prefix_simba": ("mamba", "ff"),                          # (b) Mamba-2 + channel mixing (SiMBA)
    "cross_simba": ("mamba", "cross_attn", "ff"),             # (c) text through cross-attention
    "cross_transformer": ("self_attn", "cross_attn", "ff"),   # (d) the MusicGen-style baseline
}


class Block(nn.Module):
    """One LM block (paper, Fig. 1): x = x + Dropout(f(RMSNorm(x))) for each sublayer f of `layout`, a
    tuple of "mamba", "ff", "self_attn", "cross_attn". The SiMBA block is layout ("mamba", "ff").
    `dropout` is also the rate inside the feed-forward and on the attention weights (paper: 0.3)."""

    def __init__(self, layout, d_model, d_state=512, d_conv=4, expand=2, headdim=64, d_ff=2048, n_heads=8,
                 dropout=0.0, chunk_size=32):
        super().__init__()
        make = {
            "mamba": lambda: Mamba2(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                                    chunk_size=chunk_size),
            "ff": lambda: FeedForward(d_model, d_ff, dropout),
            "self_attn": lambda: SelfAttention(d_model, n_heads, dropout),
            "cross_attn": lambda: CrossAttention(d_model, n_heads, dropout),
        }
        self.layout = tuple(layout)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in self.layout)
        self.layers = nn.ModuleList(make[kind]() for kind in self.layout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, memory=None, memory_mask=None, states=None):
        """x (b, s, d) -> (b, s, d). mask (b, s): False at (left) padding, for Mamba-2; memory
        (b, lt, d) and memory_mask (b, lt): the text, for cross-attention; states: one decoding
        state per sublayer (Mamba2State, KVCache, TextKV or None), updated in place. ValueError for
        a mask with a self-attention sublayer, which has no padding to skip (its LM pads no row)."""
        for i, norm in enumerate(self.norms):
            y = self.sublayer(i, norm(x), mask, memory, memory_mask, None if states is None else states[i])
            x = x + self.dropout(y)
        return x

    def sublayer(self, i, h, mask=None, memory=None, memory_mask=None, state=None):
        """Sublayer i of the layout on its normed input h (b, s, d) -> (b, s, d), before the dropout of its
        output. ValueError for a mask with a self_attn sublayer (forward's)."""
        kind, layer = self.layout[i], self.layers[i]
        if kind == "mamba":
            return layer(h, mask=mask, state=state)
        if kind == "self_attn":
            if mask is not None:
                raise ValueError("Block: mask (left padding) is for Mamba-2; a self_attn sublayer would attend to "
                                 "the padding")
            return layer(h, state=state)
        if kind == "cross_attn":
            return layer(h, memory, memory_mask, state=state)
        return layer(h)


def position_frequencies(dim, device):
    """The dim // 2 frequencies of the sinusoidal position embedding: 10000^(-i / (dim // 2)), as in
    "Attention Is All You Need"; MusicGen's and the official code's divide by dim // 2 - 1 (README,
    "Differences")."""
    return torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=device) / (dim // 2))


def sinusoidal_positions(positions, dim):
    """(b, s) integer positions -> (b, s, dim) [cos | sin] embeddings, the halves' order of MusicGen and
    the official code, at position_frequencies. ValueError for an odd dim."""
    if dim % 2:
        raise ValueError(f"sinusoidal_positions: dim {dim} must be even (cos and sin halves)")
    angles = positions[..., None].float() * position_frequencies(dim, positions.device)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def check_text(text, text_mask, d_text, where):
    """ValueError naming `where` unless text is (b, lt, d_text) states and text_mask a bool (b, lt); TypeError
    for either that is no torch tensor (a numpy array), or integer text (ids, not states: their float
    conversion would run). Floating text of any precision is fine: the model converts it to its own."""
    for name, t in (("text", text), ("text_mask", text_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} {type(t).__name__}: want a torch tensor")
    if not text.is_floating_point():
        raise TypeError(f"{where}: text {text.dtype}: want floating-point states")
    if text.dim() != 3 or text.shape[-1] != d_text:
        raise ValueError(f"{where}: text {tuple(text.shape)}: want (b, lt, {d_text}) states")
    if text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]:
        raise ValueError(f"{where}: text_mask {tuple(text_mask.shape)} {text_mask.dtype}: want torch.bool "
                         f"{tuple(text.shape[:2])}, True at real tokens")


def pad_text(text, mask, multiple):
    """text (b, lt, d) and mask (b, lt) right-padded with masked zeros to a length that is a multiple of
    `multiple` (an int, 1 or more: 0 divided by zero, a negative one cut the text short). Masked positions
    leave no trace (left_align, Mamba2.mask_padding, the attention masks): the same logits up to rounding,
    so that captions of other lengths share one shape (train.py --compile's graphs, fast.Decoder's).
    ValueError for a mask that is not bool (b, lt) for text (b, lt, d) (check_text: a mask of 1 row for b
    texts would come back of 1 row)."""
    check_text(text, mask, text.shape[-1], "pad_text")
    check_integer("pad_text: multiple", multiple, least=1)
    extra = -text.shape[1] % multiple
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def check_tokens(tokens, b, K, where, row):
    """ValueError naming `where` unless tokens are (b, K, s) steps: a row of 1 or a stream of 1 would
    broadcast against the b rows' positions and states or the K codebooks' embedding offsets."""
    if tokens.dim() != 3 or tokens.shape[:2] != (b, K):
        raise ValueError(f"{where}: tokens {tuple(tokens.shape)}: want ({b}, {K}, s), a row per {row} and a "
                         "stream per codebook")


def left_align(text, mask):
    """Move each row's padding to the left: (b, lt, d), (b, lt) -> same shapes, real tokens last.
    With padding first, the masked Mamba-2 layers start the real text from a clean state. ValueError for
    a mask that is not bool (b, lt) for text (b, lt, d) (check_text: one mask row would reorder every text
    and come back of 1 row)."""
    check_text(text, mask, text.shape[-1], "left_align")
    order = torch.sort(mask.int(), dim=1, stable=True).indices  # pads (0) first, tokens keep their order
    return text.gather(1, order[..., None].expand_as(text)), mask.gather(1, order)


class InferenceCache:
    """Everything decoding carries besides the weights, in tensors updated in place: a state per
    sublayer (Mamba2State, KVCache, TextKV or None) and, per row, the position of the next token
    and which text positions are real (for cross-attention)."""

    def __init__(self, model, batch, max_len, device, dtype, ssm_dtype=None):
        def new_state(layer):
            if isinstance(layer, Mamba2):
                return layer.new_state(batch, max_len, device, dtype, ssm_dtype)
            return layer.new_state(batch, max_len, device, dtype) if hasattr(layer, "new_state") else None
        self.states = [[new_state(layer) for layer in block.layers] for block in model.blocks]
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.memory_mask = None


class TextToMusicLM(nn.Module):
    """Stage-1 LM: text -> K streams of DAC codes. The variant (cfg.variant) picks the block layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, K, V = cfg.d_model, cfg.n_codebooks, CODEBOOK_SIZE + 1
        self.text_proj = nn.Linear(cfg.d_text, d)
        self.text_norm = nn.LayerNorm(d)
        self.embed = nn.Embedding(K * V, d)  # K tables of 1025 rows, stacked; the K lookups are summed
        self.blocks = nn.ModuleList(
            Block(LAYOUTS[cfg.variant], d, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim, cfg.d_ff,
                  cfg.n_heads, cfg.dropout, cfg.chunk_size) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, K * V, bias=False)  # K heads of 1025 logits, stacked
        self.register_buffer("offsets", torch.arange(K) * V, persistent=False)
        # Residual-branch outputs start small so the sum over 2-3 N branches keeps unit scale (GPT-2).
        n_branches = len(LAYOUTS[cfg.variant]) * cfg.n_layers
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                p.data /= math.sqrt(n_branches)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed_steps(self, tokens):
        """tokens (b, K, s) ids -> (b, s, d): the sum of the K code embeddings of each step."""
        return self.embed(tokens + self.offsets[:, None]).sum(1)

    def heads(self, x):
        """(b, s, d) -> logits (b, K, s, 1025): the final norm and the K heads."""
        b, s, _ = x.shape
        return self.head(self.norm_f(x)).view(b, s, self.cfg.n_codebooks, CODEBOOK_SIZE + 1).transpose(1, 2)

    def logits(self, tokens, text, text_mask, cache=None):
        """A pass from the start. tokens (b, K, s) input steps (the first one the begin step),
        text (b, lt, d_text) T5 states, text_mask (b, lt) True at real tokens (any padding side).
        tokens must be ids 0..1024 (not checked, as a check would stop the GPU's CUDA graphs: an id past
        1024 reads the next codebook's table, a negative one the previous one's; past the last table or
        before the first, an IndexError on a CPU).
        Returns logits (b, K, s, 1025) for the step after each input step. With a cache, also
        leaves in it the states after the last step (the prefill of decoding): a new InferenceCache
        (zero Mamba-2 states, empty KV caches), as the pass starts from nothing; a used one is not
        reset, and the pass would carry on from its states. Whatever text holds at padding is never
        read. ValueError for text or a text_mask of other shapes (check_text), tokens that are not
        (b, n_codebooks, s) for b texts, and a cache of another batch; TypeError for tokens of another
        kind than int16/32/64 (as_codes) and text check_text refuses."""
        check_text(text, text_mask, self.cfg.d_text, "TextToMusicLM")
        tokens = as_codes("TextToMusicLM: tokens", tokens)
        check_tokens(tokens, text.shape[0], self.cfg.n_codebooks, "TextToMusicLM", "text")
        b, K, s = tokens.shape
        if cache is not None and cache.position.shape[0] != b:
            raise ValueError(f"TextToMusicLM: an InferenceCache of {cache.position.shape[0]} rows for {b} rows")
        text = text.masked_fill(~text_mask[..., None], 0)  # padding: never read, so NaN there must not leak
        x = self.embed_steps(tokens)  # (b, s, d)
        memory = self.text_norm(self.text_proj(text.to(self.text_proj.weight.dtype)))  # (b, lt, d)
        mask = None
        if self.cfg.prefix:  # prepend the text; positions count real tokens only
            memory, text_mask = left_align(memory, text_mask)
            x = torch.cat([memory.to(x.dtype), x], dim=1)
            mask = torch.cat([text_mask, text_mask.new_ones(b, s)], dim=1)
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            memory = None
        else:
            positions = torch.arange(s, device=x.device).expand(b, s)
        x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        if cache is not None:
            cache.memory_mask = text_mask
            cache.position.copy_(positions[:, -1] + 1 if positions.shape[1] else 0)  # (no text and no steps: 0)
        x = self.run_blocks(x, mask, memory, text_mask, None if cache is None else cache.states)
        return self.heads(x[:, x.shape[1] - s:])  # (x[:, -0:] would be all of it)

    def run_blocks(self, x, mask=None, memory=None, memory_mask=None, states=None):
        """The blocks in order, x (b, s, d) -> (b, s, d), the residual stream before norm_f. mask,
        memory, memory_mask: as Block's; states: a cache's states, one list per block, or None."""
        for i, block in enumerate(self.blocks):
            x = block(x, mask, memory, memory_mask, None if states is None else states[i])
        return x

    def step(self, tokens, cache):
        """Continue from a cache: tokens (b, K, s) the next input steps -> logits (b, K, s, 1025).
        For s = 1 this is one decoding step: its cost does not depend on the position for the SSM
        variants (the Mamba-2 states have a fixed size); attention reads its growing KV cache. ValueError
        for tokens that are not (b, n_codebooks, s) for a cache of b rows (check_tokens); TypeError for
        tokens as_codes refuses (Python checks of the shape and dtype: no sync)."""
        tokens = as_codes("step: tokens", tokens)
        check_tokens(tokens, cache.position.shape[0], self.cfg.n_codebooks, "TextToMusicLM.step", "cache row")
        s = tokens.shape[-1]
        x = self.embed_steps(tokens)
        positions = cache.position[:, None] + torch.arange(s, device=x.device)
        x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        cache.position.add_(s)
        return self.heads(self.run_blocks(x, memory_mask=cache.memory_mask, states=cache.states))

    def forward(self, codes, text, text_mask, counts=None):
        """Teacher-forced pass. codes (b, K, s): LM-layout targets (delayed when K > 1, special id
        where there is no token). Returns logits (b, K, s, 1025) and the loss (counts: lm_loss's).
        TypeError for codes as_codes refuses (a uint8 pad would overflow on the special id)."""
        codes = as_codes("TextToMusicLM: codes", codes)
        tokens = F.pad(codes[..., :-1], (1, 0), value=SPECIAL)  # the begin step, then shift right
        logits = self.logits(tokens, text, text_mask)
        return logits, lm_loss(logits, codes, self.cfg.label_smoothing, counts)

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        """AdamW; weight decay on matrices (and conv kernels) only: not on norms, biases, dt_bias,
        A_log or D."""
        return adamw(self, lr, weight_decay, betas, device_type)

    # --------------------------------------------------------------------------------------------
    # 6. Generation

    @torch.no_grad()
    def generate(self, text, text_mask, n_frames, cfg_scale=3.0, top_k=250, temperature=1.2, generator=None,
                 prompt=None, recurrent=True, ssm_dtype=None, decoder=None, progress=False):
        """Sample codes (b, K, n_frames) for b texts: text (b, lt, d_text), text_mask (b, lt).

        Guidance (cfg_scale != 1) runs the conditional rows and the null condition (no text at all,
        as seen in training when the caption is dropped) as one batch of 2b rows. The text (and the
        prompt, codes (b, K, T_p) to continue, kept exactly) is read once (the prefill); then each
        step costs O(1) from the Mamba-2 states (a KV cache for self-attention). recurrent=False
        recomputes the whole sequence at every step instead, as the official code does.
        ssm_dtype: how the Mamba-2 states are stored between steps (default fp32; Mamba2.new_state).
        generator: a torch.Generator, or a list of b, one per text: then each text's tokens are
        the same in any batch (up to the rounding of the logits, which may depend on the batch).
        decoder: an object whose new_cache() (as InferenceCache: the cache to decode on), prefill() (as
        self.logits with a cache) and decode() (the loop after the first step) run faster (fast.Decoder,
        CUDA); they must write the tokens this loop writes.
        Raises TypeError for an n_frames that is no integer; ValueError for n_frames below 0, no texts,
        text of other shapes (check_text), and a prompt longer than n_frames, of another batch or K, or
        of codes outside 0..1023 (1024, the special id: a slot to sample); ValueError (TypeError) for
        sampling settings check_sampling refuses, and a list of generators not one per text."""
        check_text(text, text_mask, self.cfg.d_text, "generate")
        steps, fixed = self.step_layout(text.shape[0], n_frames, prompt, text.device)
        was_training = self.training
        self.eval()
        try:  # the caller's mode comes back however this ends (Ctrl-C in a notebook too)
            if cfg_scale != 1.0:
                text, text_mask = torch.cat([text, text]), torch.cat([text_mask, torch.zeros_like(text_mask)])
            copies = text.shape[0] // steps.shape[0]  # 2 with guidance: both branches read the same tokens
            sampling = Sampling(cfg_scale, top_k, temperature, generator)
            new_cache = InferenceCache if decoder is None else decoder.new_cache
            cache = new_cache(self, text.shape[0], steps.shape[-1] + 1, text.device, next(self.parameters()).dtype,
                              ssm_dtype) if recurrent else None
            inputs = lambda s: F.pad(steps[..., :s], (1, 0), value=SPECIAL).repeat(copies, 1, 1)  # begin, < s
            start = 0 if prompt is None else prompt.shape[-1]  # the first step with a token to sample
            todo = range(start, steps.shape[-1])
            if decoder is not None and len(todo) > 1:
                logits = decoder.prefill(self, inputs(start), text, text_mask, cache)  # self.logits's
                write_step(steps, fixed, start, sampling(logits[:, :, -1]))
                decoder.decode(self, cache, steps, fixed, start + 1, copies, sampling, progress)
                todo = []
            for s in tqdm(todo, desc="stage 1", unit="step", leave=False, disable=not progress):
                if cache is not None and s > start:  # one step from the states
                    logits = self.step(steps[..., s - 1:s].repeat(copies, 1, 1), cache)
                else:  # the whole sequence so far: the prefill, or the recomputation
                    logits = self.logits(inputs(s), text, text_mask, cache)
                write_step(steps, fixed, s, sampling(logits[:, :, -1]))
        finally:
            self.train(was_training)
        return undelay_pattern(steps)

    def step_layout(self, b, n_frames, prompt, device):
        """The delayed layout generate fills: steps (b, K, n_frames + K - 1), special where there is no
        token yet, and fixed (bool, same shape): the slots sampling must leave alone (the delay
        pattern's empty slots, the prompt). generate's TypeError and its n_frames, texts and prompt ValueErrors
        come from here."""
        if not isinstance(n_frames, numbers.Integral) or isinstance(n_frames, bool):  # (F.pad takes no float)
            raise TypeError(f"generate: n_frames {n_frames!r}: want an int, a number of frames "
                            "(round(seconds * FRAME_RATE))")
        if n_frames < 0 or b == 0:
            raise ValueError(f"generate: n_frames {n_frames} for {b} texts: want 0 or more frames of 1 or more texts")
        K = self.cfg.n_codebooks
        if prompt is None:
            prompt = torch.zeros(b, K, 0, dtype=torch.long, device=device)
        if not (isinstance(prompt, torch.Tensor) and prompt.is_floating_point()):  # (floats: the ValueError below)
            prompt = as_codes("generate: prompt", prompt)  # int64: the codes come back int64 whatever it was
        if prompt.dim() != 3 or prompt.shape[:2] != (b, K) or prompt.shape[-1] > n_frames:
            raise ValueError(f"prompt {tuple(prompt.shape)}: want ({b}, {K}, at most n_frames = {n_frames})")
        if prompt.is_floating_point() or prompt.numel() and not 0 <= prompt.min() <= prompt.max() <= SPECIAL:
            raise ValueError(f"prompt {prompt.dtype}: want integer codes 0..{CODEBOOK_SIZE - 1} "
                             f"({SPECIAL}: a slot to sample)")
        steps = delay_pattern(F.pad(prompt, (0, n_frames - prompt.shape[-1]), value=SPECIAL))
        real = delay_pattern(torch.zeros(1, K, n_frames, dtype=torch.long, device=device)) != SPECIAL
        return steps, (steps != SPECIAL) | ~real


def write_step(steps, fixed, s, tokens):
    """Write tokens (b, K) into column s of steps (b, K, S) where the slot is not fixed (bool, steps'
    shape). ValueError for fixed or tokens of other shapes (tokens of 1 row would be written into every row)."""
    check_same_shape("write_step", "fixed", fixed, "steps", steps)
    if tokens.shape != steps.shape[:2]:
        raise ValueError(f"write_step: tokens {tuple(tokens.shape)} for steps {tuple(steps.shape)}: want "
                         f"{tuple(steps.shape[:2])}, one token per row and codebook")
    steps[..., s] = torch.where(fixed[..., s], steps[..., s], tokens)


def generate_in_windows(model, text, text_mask, n_frames, window, context=None, prompt=None, **sampling):
    """model.generate past the length it was trained on: codes (b, K, n_frames).

    In one recurrent pass, steps past the `window` frames of training run at positions and from
    states the model never saw, and the music drifts (on the synthetic set the caption score
    falls with the length: README, "Longer than the training length"). Here each further pass
    re-reads the text and the last `context` frames (default window // 2) as its prompt and
    continues to at most `window` frames, as MusicGen extends past 30 s: every step stays in the
    trained range, and memory stays that of one window. Up to `window` frames this is one generate
    call. A pass that does not reach n_frames drops its last K - 1 frames: the delay pattern
    samples their codebooks 2..K before the codebook-1 frames that follow, which the next pass
    provides. prompt: codes (b, K, T_p), kept exactly; the first pass reads all of it if it leaves
    room in the window (then a continuation of a generation's first frames meets the same passes),
    else its last `context` frames, like every later pass. sampling: generate's other arguments
    (a generator carries on from pass to pass). TypeError for an n_frames, window or context that is
    not an integer; ValueError for a context outside 0..window - K and, past one window, a prompt longer
    than n_frames (within one window, generate's errors)."""
    for name, value in (("n_frames", n_frames), ("window", window), ("context", context)):
        if value is not None:
            check_integer(f"generate_in_windows: {name}", value)
    K = model.cfg.n_codebooks
    if n_frames <= window:  # one pass: no context is read, so any window will do (more passes: context <= window - K)
        return model.generate(text, text_mask, n_frames, prompt=prompt, **sampling)
    context = window // 2 if context is None else context
    if not 0 <= context <= window - K:
        raise ValueError(f"context {context}: want 0 <= context <= window - K = {window - K}")
    if prompt is not None and prompt.shape[-1] > n_frames:
        raise ValueError(f"prompt {tuple(prompt.shape)}: longer than n_frames = {n_frames}")
    codes = prompt if prompt is not None else text.new_zeros(text.shape[0], K, 0, dtype=torch.long)
    first = True
    while codes.shape[-1] < n_frames:
        T = codes.shape[-1]
        read = T if first and T <= window - K else min(T, context)  # a prompt that fits is read whole
        length = min(window, read + n_frames - T)  # frames of this pass, the read ones included
        seen = codes[..., T - read:] if read else None
        out = model.generate(text, text_mask, length, prompt=seen, **sampling)
        end = length if T - read + length == n_frames else length - (K - 1)
        codes, first = torch.cat([codes, out[..., read:end]], dim=-1), False
    return codes


def adamw(model, lr, weight_decay, betas, device_type):
    """AdamW with weight decay on matrices and conv kernels only (not on norms, biases, or the
    parameters marked _no_weight_decay: Mamba-2's dt_bias, A_log, D); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decays = lambda p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
    groups = [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
              {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def classifier_free_guidance(cond, uncond, cfg_scale):
    """Classifier-free guidance, uncond + scale * (cond - uncond), written as
    cond + (scale - 1) * (cond - uncond) so that scale 1 is exactly the conditional model (where both
    are finite, as the model's logits are). A logit at -inf in either (a code a caller ruled out)
    stays -inf, where the formula gives NaN or +inf. ValueError for uncond of another shape than cond (a null
    row of batch 1 would guide every row)."""
    check_same_shape("classifier_free_guidance", "uncond", uncond, "cond", cond)
    guided = cond + (cfg_scale - 1) * (cond - uncond)
    return guided.masked_fill(cond.isneginf() | uncond.isneginf(), -torch.inf)


# The lowest temperature above 0 (greedy): far below it, logits / temperature overflow to inf and
# softmax gives NaN, where the limit is the argmax.
MIN_TEMPERATURE = 1e-4


def check_sampling(cfg_scale, top_k, temperature):
    """ValueError for a guidance scale that is not finite, a top_k below 0, or a temperature that is
    neither 0 (greedy) nor finite from MIN_TEMPERATURE on; TypeError for a top_k that is not an integer, and
    a cfg_scale or temperature that is not a real number ("3", None)."""
    check_integer("top_k", top_k)
    for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature)):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name} {value!r}: want a number")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale {cfg_scale}: want a finite number")
    if top_k < 0:
        raise ValueError(f"top_k {top_k}: 0 (every code) or more")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature {temperature}: 0 (greedy) or from {MIN_TEMPERATURE} on")


def sample_next(logits, uncond=None, cfg_scale=1.0, top_k=250, temperature=1.0, generator=None, noise=None):
    """logits (b, K, 1025) of one step -> tokens (b, K). With uncond (the null condition's logits,
    same shape), guidance combines the two first. Then temperature and top-k; top_k = 1 or
    temperature = 0 is greedy, top_k = 0 keeps every code. Top-k keeps each code whose logit is at
    least the k-th largest, so codes tied with the k-th all stay (as MusicGen's sampling does; the
    GPU kernel draws the same). The special id is never sampled.
    generator: a torch.Generator, None (the default one), or one per row (exponential_noise).
    noise: the Exp(1) draws (b, K, 1024) to use, drawn before from generator (exponential_noise),
    instead of drawing them here. ValueError for settings check_sampling refuses (TypeError for those it
    refuses as no number), for uncond of another shape than logits (it would broadcast: a null row
    of batch 1 would guide every row) and noise that is not (b, K, 1024) (one row's draws would make
    every row's); TypeError for logits, uncond or noise that are no floating-point torch tensor (a numpy array
    would fail on a missing method; check_numbers). (Shapes and dtypes only: no GPU sync.)"""
    check_sampling(cfg_scale, top_k, temperature)
    for name, t in (("logits", logits), ("uncond", uncond), ("noise", noise)):
        if t is not None:
            check_numbers("sample_next", name, t)
    if uncond is not None:
        check_same_shape("sample_next", "uncond", uncond, "logits", logits)
    if noise is not None and noise.shape != (*logits.shape[:-1], SPECIAL):
        raise ValueError(f"sample_next: noise {tuple(noise.shape)} for logits {tuple(logits.shape)}: want "
                         f"{(*logits.shape[:-1], SPECIAL)}, a draw per real code")
    logits = logits[..., :SPECIAL].float()  # only real codes can be sampled; the indices stay the ids
    if uncond is not None:
        logits = classifier_free_guidance(logits, uncond[..., :SPECIAL].float(), cfg_scale)
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    V = logits.shape[-1]
    logits = logits / temperature
    kth = torch.topk(logits, min(top_k, V) if top_k else V, dim=-1).values[..., -1:]
    probs = F.softmax(logits.masked_fill(logits < kth, -torch.inf), dim=-1)
    # A draw from the categorical p: argmax of p_i / E_i with E_i ~ Exp(1) independent (the first
    # of competing exponential clocks to ring; what torch.multinomial does for one sample). Unlike
    # multinomial it never synchronises with the host, so a CUDA graph can hold it.
    return (probs / (exponential_noise(probs, generator) if noise is None else noise)).argmax(-1)


def exponential_noise(like, generator=None, out=None):
    """Exp(1) draws shaped like `like` (b, ...): from one generator, or, given a list of b generators,
    row i from generator[i], so that a prompt draws the same numbers in any batch. out: a contiguous
    tensor like `like` to draw into (default: a new one); returns it. ValueError for a list of
    generators that is not one per row, and an out of another shape than like."""
    if out is not None:
        check_same_shape("exponential_noise", "out", out, "like", like)
    out = torch.empty_like(like) if out is None else out
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(out):
            raise ValueError(f"{len(generator)} generators for {len(out)} rows: give one per row")
        for row, g in zip(out, generator):  # a contiguous row draws what a tensor of its own would
            row.exponential_(generator=g)
        return out
    return out.exponential_(generator=generator)


@dataclass
class Sampling:
    """generate's sampling settings; called on the logits of one step's rows (b * copies, K, 1025),
    [conditional; null] with guidance, it returns the tokens (b, K). ValueError for the settings
    check_sampling refuses, and for an odd number of rows with guidance."""
    cfg_scale: float = 3.0
    top_k: int = 250
    temperature: float = 1.2
    generator: object = None  # a torch.Generator, None (the default one), or a list, one per row

    def __post_init__(self):
        check_sampling(self.cfg_scale, self.top_k, self.temperature)

    def __call__(self, logits, noise=None):
        if self.cfg_scale != 1.0 and logits.shape[0] % 2:
            raise ValueError(f"Sampling: {logits.shape[0]} rows with guidance; want [conditional; null], 2b rows")
        cond, uncond = logits.chunk(2) if self.cfg_scale != 1.0 else (logits, None)
        return sample_next(cond, uncond, self.cfg_scale, self.top_k, self.temperature, self.generator, noise)

    @property
    def greedy(self):
        """Whether sampling draws nothing (top_k 1 or temperature 0: the argmax)."""
        return self.top_k == 1 or self.temperature == 0
