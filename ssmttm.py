"""ssmttm: text-to-music generation with state-space models.

After "Training-Efficient Text-to-Music Generation with State-Space Modeling" (Lee et al., 2026).
One file, read top to bottom:

  1. configuration                                    ModelConfig
  2. the delay pattern and the LM loss                delay_pattern, undelay_pattern, lm_loss
  3. Mamba-2 (same parameters as mamba_ssm.Mamba2)    Mamba2, GatedRMSNorm, Mamba2State
  4. the other sublayers                              FeedForward, SelfAttention, CrossAttention
  5. blocks and the four LM variants                  Block, LAYOUTS, TextToMusicLM
  6. sampling with classifier-free guidance           classifier_free_guidance, sample_next, .generate
  7. stage 2: codebooks 2..9 by latent diffusion       Stage2Config, DiffusionUNet, Stage2Diffusion

Audio is K streams of DAC codes (1024 entries each, 86.13 frames/s); text is the sequence of
Flan-T5 encoder states (768-d). The sequence the LM reads (prefix variants):

    [ text_1 ... text_Lt | begin | x_0 ... x_{S-2} ]      ->  logits for x_0 ... x_{S-1}
      Linear+LayerNorm     all K   sum of K embeddings        K heads, one per codebook
      of the T5 states     special

Cross variants read only [begin | x_0 ... x_{S-2}] and look at the text through cross-attention.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd_reference import ssd_chunked, ssd_step

# The fused Mamba-2 kernels need CUDA; mamba-ssm cannot even be imported without it. Every use is
# guarded, and without them the same parameters run through ssd_reference.
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
except Exception:  # ImportError, or a CUDA extension that fails to load
    mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = selective_state_update = None
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except Exception:
    causal_conv1d_fn = causal_conv1d_update = None
import kernels  # GPU fast paths: the training layer (mamba2_train) and decoding kernels (linear_rows, ...)
# Under torch.compile these two are graph breaks, and a break inside the loop over blocks makes it
# run the whole model eagerly. The default training path, kernels.mamba2_train, is an op it traces.
if mamba_chunk_scan_combined is not None:
    mamba_chunk_scan_combined = torch.compiler.disable(mamba_chunk_scan_combined)
    mamba_split_conv1d_scan_combined = torch.compiler.disable(mamba_split_conv1d_scan_combined)

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
    chunk_size: int = 256          # SSD chunk length Q
    label_smoothing: float = 0.1   # as in the official code

    def __post_init__(self):
        if self.variant not in LAYOUTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(LAYOUTS)}")

    @property
    def prefix(self):
        return self.variant.startswith("prefix")


# ------------------------------------------------------------------------------------------------
# 2. Delay pattern (MusicGen) and loss


def delay_pattern(codes, special=SPECIAL):
    """(b, K, T) codes -> (b, K, T + K - 1): codebook k shifted right by k steps, empty slots special.
    Step s then holds codebook k of frame s - k, so one step predicts all K codebooks at once while
    codebook k still sees codebooks < k of its own frame (they were generated k steps earlier)."""
    b, K, T = codes.shape
    out = codes.new_full((b, K, T + K - 1), special)
    for k in range(K):
        out[:, k, k:k + T] = codes[:, k]
    return out


def undelay_pattern(delayed):
    """Exact inverse of delay_pattern: (b, K, T + K - 1) -> (b, K, T)."""
    b, K, S = delayed.shape
    T = S - K + 1
    return torch.stack([delayed[:, k, k:k + T] for k in range(K)], dim=1)


def lm_loss(logits, targets, label_smoothing=0.0):
    """Cross-entropy per codebook, averaged over codebooks; special targets (padding and the empty
    slots of the delay pattern) are ignored. logits (b, K, s, V), targets (b, K, s)."""
    b, K, s, V = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits -> fp32 loss
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=SPECIAL,
                         label_smoothing=label_smoothing, reduction="none").view(b, K, s)
    valid = (targets != SPECIAL).float()
    per_codebook = (ce * valid).sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)
    return per_codebook.mean()


# ------------------------------------------------------------------------------------------------
# 3. Mamba-2


@dataclass
class Mamba2State:
    """What one Mamba-2 layer carries from step to step while decoding (updated in place)."""
    conv: torch.Tensor  # (b, conv_dim, d_conv): the last d_conv inputs of the causal conv
    ssm: torch.Tensor   # (b, nheads, headdim, d_state): h_t
    A: torch.Tensor     # (nheads,) -exp(A_log), fixed while decoding: two kernels per layer fewer per step


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight over each of `groups` channel groups, in float32: Mamba-2's
    norm before out_proj."""

    def __init__(self, d, groups=1, eps=1e-5):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z):
        y = (y.float() * F.silu(z.float())).unflatten(-1, (self.groups, -1))
        y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (y * self.weight.float()).to(z.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 layer, with the parameter names, shapes and initialisation of mamba_ssm.Mamba2
    (ngroups 1, no D per channel, gate after the norm), so a state_dict loads into either.

    u (b, l, d_model) -> in_proj -> [z | xBC | dt] -> causal depthwise conv + SiLU on xBC -> x, B, C
    -> SSD with dt = softplus(dt + dt_bias), A = -exp(A_log) -> y + D x -> norm(y, z) -> out_proj.

    On CUDA with mamba-ssm installed it runs the fused Triton kernels; elsewhere ssd_reference."""

    use_kernels = True       # False (on an instance or the class) forces the reference path
    use_mem_eff_path = True  # training: conv, SSD, norm and out_proj as one fused op (one autograd node)
    # That op keeps the SSD's chunk states for its backward (kernels.mamba2_train): 6% off a
    # step for 0.7 GB per layer at batch 16 x 30 s. False: mamba-ssm's own, which recomputes them.
    keep_chunk_states = True
    # The kernels use chunk_size (256, what they are tuned for). ssd_chunked's quadratic intra-chunk
    # form is fastest on a CPU with short chunks; the result does not depend on the chunk size.
    reference_chunk_size = 32

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 A_init_range=(1, 16), dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.ngroups, self.chunk_size = ngroups, chunk_size
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)  # z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
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

    def _A(self):
        """A = -exp(A_log) (nheads,), in float32 or above: it sets the decay rates."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def _kernels(self, t):
        return self.use_kernels and t.is_cuda and mamba_chunk_scan_combined is not None

    def new_state(self, batch, max_len, device, dtype, ssm_dtype=None):
        """ssm_dtype: how h_t is stored between steps; each step computes in fp32 or above. By default
        never below fp32. bf16 halves the bytes a decoding step moves (mamba-ssm keeps the state in
        the weights' dtype), at a cost in accuracy that BENCHMARKS.md measures."""
        return Mamba2State(conv=torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                           ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                           dtype=ssm_dtype or torch.promote_types(dtype, torch.float32)),
                           A=self._A().detach())

    def _mask_padding(self, zxbcdt, mask):
        """Make padded positions leave no trace: xBC = 0 (the conv then sees zeros, as at the start
        of a sequence) and dt -> 0, so exp(dt A) = 1 and dt x B = 0: the state passes unchanged.
        With the padding on the left, the result is exactly that of the unpadded sequence."""
        pad = torch.zeros(zxbcdt.shape[-1], device=zxbcdt.device, dtype=zxbcdt.dtype)
        pad[-self.nheads:] = -1e4  # softplus(-1e4 + dt_bias) == 0 in float32
        return torch.where(mask[..., None], zxbcdt, pad)

    def forward(self, u, mask=None, state=None):
        """u (b, l, d_model) -> (b, l, d_model). mask (b, l): False at padding, which must come first
        in its row (left padding). state: a Mamba2State to continue from and update in place
        (prefill and decoding); None when training."""
        if state is not None and u.shape[1] == 1 and mask is None:
            return self.step(u, state)
        zxbcdt = self.in_proj(u)
        A = self._A()
        if state is None and self._kernels(u) and causal_conv1d_fn is not None and self.use_mem_eff_path:
            # The mem-efficient path: conv, scan, gated norm and out_proj in one autograd function
            # that recomputes the conv and norm in the backward pass. Padding is sequence 0 and the
            # text and audio sequence 1, so the kernel starts them from a clean state and conv:
            # the same result as _mask_padding, without a pass over zxbcdt.
            seq_idx = None if mask is None else mask.to(torch.int32)
            # Keeping the chunk states pays only when a backward follows: without grad, mamba-ssm's own.
            if self.keep_chunk_states and kernels.HAS_TRAIN_KERNELS and torch.is_grad_enabled():
                return kernels.mamba2_train(zxbcdt, self, A, seq_idx)
            return mamba_split_conv1d_scan_combined(
                zxbcdt, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, A, self.D, self.chunk_size,
                seq_idx=seq_idx, rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=None,
                headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False)
        if mask is not None:
            zxbcdt = self._mask_padding(zxbcdt, mask)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.silu(self._conv(xBC, state))
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b, l, _ = u.shape
        y, final_state = self._ssd(x.view(b, l, self.nheads, self.headdim), dt, A,
                                   B.view(b, l, self.ngroups, -1), C.view(b, l, self.ngroups, -1),
                                   None if state is None else state.ssm)
        if state is not None:
            state.ssm.copy_(final_state)
        return self.out_proj(self.norm(y.reshape(b, l, self.d_inner), z))

    def _conv(self, xBC, state):
        """Causal depthwise conv over time: (b, l, conv_dim) -> (b, l, conv_dim), without the SiLU."""
        l = xBC.shape[1]
        xBC = xBC.transpose(1, 2)
        if state is None:
            if self._kernels(xBC) and causal_conv1d_fn is not None:
                return causal_conv1d_fn(xBC, self.conv1d.weight[:, 0], self.conv1d.bias).transpose(1, 2)
            return self.conv1d(xBC)[..., :l].transpose(1, 2)
        window = torch.cat([state.conv[..., 1:].to(xBC.dtype), xBC], dim=-1)  # d_conv - 1 inputs of history
        state.conv.copy_(torch.cat([state.conv, xBC.to(state.conv.dtype)], dim=-1)[..., -self.d_conv:])
        return F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim).transpose(1, 2)

    def _ssd(self, x, dt, A, B, C, initial_state):
        """y (b, l, h, p) and the final state, by the Triton kernel or by ssd_reference (in fp32)."""
        if self._kernels(x):
            return mamba_chunk_scan_combined(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                                             dt_softplus=True, initial_states=initial_state, return_final_states=True)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            y, final = ssd_chunked(x.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype), self.reference_chunk_size,
                                   D=self.D.to(dtype), initial_state=None if initial_state is None else initial_state.to(dtype))
        return y.to(x.dtype), final

    def step(self, u, state):
        """One decoding step, O(1) in the position: u (b, 1, d_model) -> (b, 1, d_model)."""
        zxbcdt = self.in_proj(u[:, 0])
        y, z = self._step_ssm(zxbcdt, state)
        return self.out_proj(self.norm(y.to(z.dtype), z))[:, None]

    def fused_step(self, x, norm, state):
        """x + self(norm(x)) for one decoding step, x (b, 1, d_model), in three kernels: norm + in_proj
        + conv, the SSD step + gate (y * silu(z)), norm + out_proj + residual (kernels.py). CUDA only."""
        if self.ngroups != 1:  # the kernels normalise y * silu(z) as one group
            raise ValueError(f"Mamba2.fused_step: ngroups must be 1 (the LM's), got {self.ngroups}")
        conv = (state.conv, self.conv1d.weight[:, 0], self.conv1d.bias, self.d_inner)
        zxbcdt = kernels.linear_rows(x[:, 0], self.in_proj.weight, norm_weight=norm.weight, eps=norm.eps, conv=conv)
        gated = kernels.ssm_step(zxbcdt, state.ssm, state.A, self.dt_bias, self.D, self.d_inner, self.ngroups, z_start=0)
        out = kernels.linear_rows(gated, self.out_proj.weight, norm_weight=self.norm.weight, eps=self.norm.eps,
                                  residual=x[:, 0])
        return out[:, None]

    def _step_ssm(self, zxbcdt, state):
        """The middle of a step: zxbcdt (b, in_proj outputs) -> y (b, d_inner) before the gated norm,
        and the gate z (b, d_inner). Updates the conv and SSM states in place."""
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        w = self.conv1d.weight[:, 0]  # (conv_dim, d_conv)
        # Under torch.compile the plain ops below fuse into a few kernels; eager, the fused ones win.
        fused = self._kernels(zxbcdt) and not torch.compiler.is_compiling()
        if fused and causal_conv1d_update is not None:
            xBC = causal_conv1d_update(xBC, state.conv, w, self.conv1d.bias, "silu")
        else:
            state.conv.copy_(torch.cat([state.conv[..., 1:], xBC[..., None].to(state.conv.dtype)], dim=-1))
            xBC = F.silu((state.conv * w).sum(-1) + self.conv1d.bias).to(zxbcdt.dtype)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = zxbcdt.shape[0]
        x, B, C = x.view(b, self.nheads, self.headdim), B.view(b, self.ngroups, -1), C.view(b, self.ngroups, -1)
        A = state.A
        if fused:
            h, p, n = self.nheads, self.headdim, self.d_state  # the kernel wants per-channel views
            y = selective_state_update(state.ssm, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n),
                                       B, C, D=self.D[:, None].expand(h, p), dt_bias=self.dt_bias[:, None].expand(h, p),
                                       dt_softplus=True)
        else:
            dtype = torch.promote_types(state.ssm.dtype, torch.float32)  # computed in fp32 whatever h_t is stored in
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            y, new = ssd_step(state.ssm.to(dtype), x.to(dtype), dt, A.to(dtype), B.to(dtype), C.to(dtype), self.D.to(dtype))
            state.ssm.copy_(new)
        return y.reshape(b, self.d_inner), z


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

    def fused_step(self, x, norm, state=None):
        """x + self(norm(x)) for one decoding step, x (b, 1, d_model), in two kernels. CUDA only."""
        h = kernels.linear_rows(x[:, 0], self.fc1.weight, self.fc1.bias, norm.weight, norm.eps, gelu=True)
        return kernels.linear_rows(h, self.fc2.weight, self.fc2.bias, residual=x[:, 0])[:, None]


@dataclass
class KVCache:
    k: torch.Tensor   # (b, heads, max_len, head_dim)
    v: torch.Tensor
    length: int = 0


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (scaled_dot_product_attention), with a KV cache for decoding."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def new_state(self, batch, max_len, device, dtype):
        shape = (batch, self.n_heads, max_len, self.qkv.in_features // self.n_heads)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x, state=None):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        if state is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout.p if self.training else 0)
        else:  # append to the cache, attend to everything so far
            t0 = state.length
            state.k[:, :, t0:t0 + s], state.v[:, :, t0:t0 + s] = k, v
            state.length = t0 + s
            k, v = state.k[:, :, :t0 + s], state.v[:, :, :t0 + s]
            causal = None if s == 1 else torch.arange(t0 + s, device=x.device) <= t0 + torch.arange(s, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(b, s, d)))


class CrossAttention(nn.Module):
    """Multi-head attention from the audio to the text, which must not see padded text positions.
    A row without any text (the null condition of guidance) gets zero output."""

    def __init__(self, d_model, n_heads, dropout, d_memory=None):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_memory or d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def new_state(self, batch, max_len, device, dtype):
        return {}  # the projected text, filled at the first call

    def forward(self, x, memory, memory_mask, state=None):
        b, s, d = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, -1).transpose(1, 2)
        if state:
            k, v = state["k"], state["v"]
        else:
            k, v = (t.view(b, -1, self.n_heads, d // self.n_heads).transpose(1, 2)
                    for t in self.kv_proj(memory).split(d, dim=-1))
            if state is not None:
                state.update(k=k, v=v)
        has_text = memory_mask.any(-1)[:, None, None, None]
        mask = memory_mask[:, None, None, :] | ~has_text  # a row with no text would be all -inf (NaN)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0)
        y = y * has_text
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(b, s, d)))


# ------------------------------------------------------------------------------------------------
# 5. Blocks and the LM

# Each block is a sequence of pre-norm residual sublayers, x = x + f(RMSNorm(x)) (paper, Fig. 1).
LAYOUTS = {
    "prefix_mamba": ("mamba", "mamba"),                       # (a) sequence mixing only
    "prefix_simba": ("mamba", "ff"),                          # (b) Mamba-2 + channel mixing (SiMBA)
    "cross_simba": ("mamba", "cross_attn", "ff"),             # (c) text through cross-attention
    "cross_transformer": ("self_attn", "cross_attn", "ff"),   # (d) the MusicGen-style baseline
}


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kinds = LAYOUTS[cfg.variant]
        make = {
            "mamba": lambda: Mamba2(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim,
                                    chunk_size=cfg.chunk_size),
            "ff": lambda: FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout),
            "self_attn": lambda: SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout),
            "cross_attn": lambda: CrossAttention(cfg.d_model, cfg.n_heads, cfg.dropout),
        }
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=1e-5) for _ in self.kinds)
        self.layers = nn.ModuleList(make[kind]() for kind in self.kinds)
        self.width = max(cfg.d_model, cfg.expand * cfg.d_model, cfg.d_ff)  # the widest matrix input

    use_decode_kernels = True  # one-token steps on CUDA through kernels.linear_rows (False: plain ops)

    def forward(self, x, cond, states=None):
        """x (b, s, d); cond: dict with mask (b, s) or None, memory (b, lt, d), memory_mask (b, lt)."""
        fused = states is not None and x.shape[1] == 1 and fused_decoding(self, x[:, 0], self.width)
        for i, (kind, norm, layer) in enumerate(zip(self.kinds, self.norms, self.layers)):
            state = None if states is None else states[i]
            if fused and kind in ("mamba", "ff"):
                x = layer.fused_step(x, norm, state)
                continue
            h = norm(x)
            if kind == "mamba":
                h = layer(h, mask=cond["mask"], state=state)
            elif kind == "self_attn":
                h = layer(h, state=state)
            elif kind == "cross_attn":
                h = layer(h, cond["memory"], cond["memory_mask"], state=state)
            else:
                h = layer(h)
            x = x + h
        return x


def fused_decoding(module, rows, width):
    """Whether a one-token step of rows (b, d) runs through kernels.linear_rows: on CUDA, for the
    few rows and widths it handles, in eval mode (the kernels have no dropout), not under
    torch.compile (which fuses on its own), and unless switched off (Block.use_decode_kernels)."""
    return (Block.use_decode_kernels and not module.training and kernels.available(rows, width)
            and not torch.compiler.is_compiling())


def position_frequencies(dim, device):
    """The dim // 2 frequencies of the sinusoidal position embedding: 10000^(-i / (dim // 2))."""
    return torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=device) / (dim // 2))


def sinusoidal_positions(positions, dim):
    """(b, s) integer positions -> (b, s, dim) [cos | sin] embeddings (as MusicGen and the official code)."""
    angles = positions[..., None].float() * position_frequencies(dim, positions.device)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def left_align(text, mask):
    """Move each row's padding to the left: (b, lt, d), (b, lt) -> same shapes, real tokens last.
    With padding first, the masked Mamba-2 layers start the real text from a clean state."""
    order = torch.sort(mask.int(), dim=1, stable=True).indices  # pads (0) first, tokens keep their order
    return text.gather(1, order[..., None].expand_as(text)), mask.gather(1, order)


class InferenceCache:
    """Everything decoding carries besides the weights, all in tensors updated in place: a state per
    sublayer (Mamba2State, KVCache, or the projected text for cross-attention) and, per row, the
    position of the next token and which text positions are real."""

    def __init__(self, model, batch, max_len, device, dtype, ssm_dtype=None):
        def new_state(layer):
            if isinstance(layer, Mamba2):
                return layer.new_state(batch, max_len, device, dtype, ssm_dtype)
            return layer.new_state(batch, max_len, device, dtype) if hasattr(layer, "new_state") else None
        self.states = [[new_state(layer) for layer in block.layers] for block in model.blocks]
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.position_frequencies = position_frequencies(model.cfg.d_model, device)
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
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
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

    def _run(self, x, cond, cache, s):
        """Blocks, then final norm and heads on the last s positions (the audio steps):
        (b, L, d) -> (b, K, s, 1025)."""
        for i, block in enumerate(self.blocks):
            x = block(x, cond, None if cache is None else cache.states[i])
        if s == 1 and cache is not None and fused_decoding(self, x[:, -1], self.cfg.d_model):
            logits = kernels.linear_rows(x[:, -1], self.head.weight, norm_weight=self.norm_f.weight, eps=self.norm_f.eps)
        else:
            logits = self.head(self.norm_f(x[:, -s:]))
        return logits.view(x.shape[0], s, self.cfg.n_codebooks, -1).transpose(1, 2)

    def logits(self, tokens, text, text_mask, cache=None):
        """A pass from the start. tokens (b, K, s) input steps (the first one the begin step),
        text (b, lt, d_text) T5 states, text_mask (b, lt) True at real tokens (any padding side).
        Returns logits (b, K, s, 1025) for the step after each input step. With a cache, also
        leaves in it the states after the last step (the prefill of decoding)."""
        b, K, s = tokens.shape
        x = self.embed(tokens + self.offsets[:, None]).sum(1)  # (b, s, d)
        memory = self.text_norm(self.text_proj(text.to(self.text_proj.weight.dtype)))  # (b, lt, d)
        if self.cfg.prefix:  # prepend the text; positions count real tokens only
            memory, text_mask = left_align(memory, text_mask)
            x = torch.cat([memory.to(x.dtype), x], dim=1)
            mask = torch.cat([text_mask, text_mask.new_ones(b, s)], dim=1)
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            cond = {"mask": mask, "memory": None, "memory_mask": None}
        else:
            positions = torch.arange(s, device=x.device).expand(b, s)
            cond = {"mask": None, "memory": memory, "memory_mask": text_mask}
        x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        if cache is not None:
            cache.memory_mask = text_mask
            cache.position.copy_(positions[:, -1] + 1)
        return self._run(x, cond, cache, s)

    def step(self, tokens, cache):
        """Continue from a cache: tokens (b, K, s) the next input steps -> logits (b, K, s, 1025).
        For s = 1 this is one decoding step: its cost does not depend on the position for the SSM
        variants (the Mamba-2 states have a fixed size); attention reads its growing KV cache."""
        b, K, s = tokens.shape
        if s == 1 and fused_decoding(self, tokens[:, :, 0], self.cfg.d_model):  # the two lines below, one kernel
            x = kernels.embed_rows(tokens[..., 0], self.offsets, self.embed.weight, cache.position,
                                   cache.position_frequencies, advance=True)[:, None]  # and position += 1
        else:
            x = self.embed(tokens + self.offsets[:, None]).sum(1)
            positions = cache.position[:, None] + torch.arange(s, device=x.device)
            x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
            cache.position.add_(s)
        cond = {"mask": None, "memory": None, "memory_mask": cache.memory_mask}
        return self._run(x, cond, cache, s)

    def forward(self, codes, text, text_mask):
        """Teacher-forced pass. codes (b, K, s): LM-layout targets (delayed when K > 1, special id
        where there is no token). Returns logits (b, K, s, 1025) and the loss."""
        tokens = F.pad(codes[..., :-1], (1, 0), value=SPECIAL)  # the begin step, then shift right
        logits = self.logits(tokens, text, text_mask)
        return logits, lm_loss(logits, codes, self.cfg.label_smoothing)

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        """AdamW; weight decay on matrices (and conv kernels) only: not on norms, biases, dt_bias,
        A_log or D."""
        return adamw(self, lr, weight_decay, betas, device_type)

    # --------------------------------------------------------------------------------------------
    # 6. Generation

    @torch.no_grad()
    def generate(self, text, text_mask, n_frames, cfg_scale=3.0, top_k=250, temperature=1.2, generator=None,
                 prompt=None, recurrent=True, cuda_graph=False, compile=False, ssm_dtype=None,
                 progress=False):
        """Sample (b, K, n_frames) codes for b texts (text (b, lt, d_text), text_mask (b, lt)).

        Classifier-free guidance runs the conditional rows and the null condition (no text at all,
        as seen in training when the caption is dropped) as one batch of 2b rows.
        recurrent=True reads the text (+ prompt) once, then does O(1) work per step from the
        Mamba-2 states (a KV cache for self-attention); recurrent=False recomputes the whole sequence
        at every step, as the official code does. prompt (b, K, T_p): codes to continue.
        cuda_graph=True records one frame (step, guidance, sampling, writing the tokens) as a CUDA
        graph and replays it (SSM variants, on CUDA). On CUDA the step runs kernels.linear_rows;
        compile=True runs torch.compile's fusion instead (slower on an H200: BENCHMARKS.md).
        ssm_dtype: how the Mamba-2 states are stored between steps (default: fp32; Mamba2.new_state)."""
        was_training = self.training
        self.eval()
        K, b, dev = self.cfg.n_codebooks, text.shape[0], text.device
        if cfg_scale != 1.0:
            text, text_mask = torch.cat([text, text]), torch.cat([text_mask, torch.zeros_like(text_mask)])
        copies = text.shape[0] // b  # 2 with guidance: both branches read the same tokens
        n_steps = n_frames + K - 1
        # steps (b, K, n_steps): the delayed layout being filled, special where there is no token.
        # fixed: the slots sampling must leave alone (the delay pattern's special ids, the prompt).
        prompt = torch.zeros(b, K, 0, dtype=torch.long, device=dev) if prompt is None else prompt
        n_prompt = prompt.shape[-1]
        steps = delay_pattern(F.pad(prompt, (0, n_frames - n_prompt), value=SPECIAL))
        real = delay_pattern(torch.zeros(1, K, n_frames, dtype=torch.long, device=dev)) != SPECIAL
        fixed = (steps != SPECIAL) | ~real
        sampling = dict(cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, generator=generator)
        begin = torch.full((b * copies, K, 1), SPECIAL, dtype=torch.long, device=dev)
        cache = (InferenceCache(self, b * copies, n_steps + 1, dev, next(self.parameters()).dtype, ssm_dtype)
                 if recurrent else None)
        pos = torch.full((1,), n_prompt, device=dev)  # the step to sample next, kept on the device
        decode_frame = None
        iterator = range(n_prompt, n_steps)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="stage 1", unit="step", leave=False)
        for s in iterator:
            if cache is None or s == n_prompt:  # the whole sequence so far: the prefill, or recompute
                logits = self.logits(torch.cat([begin, steps[..., :s].repeat(copies, 1, 1)], -1), text, text_mask, cache)
                self._sample_into(steps, pos, logits, fixed, sampling)
            else:  # one step from the states
                if decode_frame is None:
                    decode_frame = self._decoder(cache, steps, pos, fixed, copies, sampling, cuda_graph, compile)
                decode_frame()
        self.train(was_training)
        return undelay_pattern(steps)

    @staticmethod
    def _sample_into(steps, pos, logits, fixed, sampling, next_input=None):
        """Sample step `pos` from the logits of its input step (b*copies, K, s, 1025), write it into
        steps (b, K, n_steps) where the slot is not fixed (and into next_input), and advance pos.
        Device tensors only, no host synchronisation: a CUDA graph can hold this."""
        sample_next(logits[:, :, -1], **sampling, into=(steps, pos, fixed, next_input))
        pos.add_(1)

    def _decoder(self, cache, steps, pos, fixed, copies, sampling, cuda_graph, compile):
        """The function generate calls per frame after the prefill: read input step pos - 1, run
        self.step (optionally compiled), sample step pos into steps. With cuda_graph, all of it is
        recorded once as one CUDA graph on these tensors, and each call replays it: no Python and
        no launches per kernel."""
        step = self.step
        if compile:
            if not hasattr(self, "_compiled_step"):
                self._compiled_step = torch.compile(self.step, dynamic=False)
            step = self._compiled_step

        # The input step (b*copies, K, 1): step pos - 1 for every guidance copy. Each frame's
        # sampling writes the next one here, in its own kernel on CUDA.
        tokens = steps.index_select(2, pos - 1).repeat(copies, 1, 1)

        def frame(cache=cache, steps=steps, pos=pos, tokens=tokens):
            self._sample_into(steps, pos, step(tokens, cache), fixed, sampling, next_input=tokens)

        if not cuda_graph:
            return frame
        if "self_attn" in LAYOUTS[self.cfg.variant]:
            raise ValueError("cuda_graph needs fixed-size decoding state; self-attention's KV cache grows")
        # Capturing records kernels without running them, so warm up (compile, autotune, allocate)
        # on copies first, then put the random generator back where it was: the graph's tokens
        # are then the ones eager decoding would sample.
        generator = sampling["generator"]
        if generator is None:
            index = steps.device.index if steps.device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        rng = generator.get_state()
        scratch = copy.deepcopy((cache, steps, pos, tokens))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                scratch[2].copy_(pos)
                frame(*scratch)
        torch.cuda.current_stream().wait_stream(stream)
        generator.set_state(rng)
        graph = torch.cuda.CUDAGraph()
        if sampling["generator"] is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            frame()
        return graph.replay


def adamw(model, lr, weight_decay, betas, device_type):
    """AdamW with weight decay on matrices and conv kernels only (not on norms, biases, or the
    parameters marked _no_weight_decay: Mamba-2's dt_bias, A_log, D); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decays = lambda p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
    groups = [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
              {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def for_inference(model, dtype):
    """Cast a model for decoding: weights in dtype (bf16 halves the bytes each step reads), except
    Mamba-2's dt_bias, A_log and D, which set the decay rates and stay in fp32 like the state."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Mamba2):
            for p in (m.dt_bias, m.A_log, m.D):
                p.data = p.data.float()
    return model.eval()


def classifier_free_guidance(cond, uncond, cfg_scale):
    """Classifier-free guidance, uncond + scale * (cond - uncond), written as
    cond + (scale - 1) * (cond - uncond) so that scale 1 is exactly the conditional model."""
    return cond + (cfg_scale - 1) * (cond - uncond)


def sample_next(logits, cfg_scale=1.0, top_k=250, temperature=1.0, generator=None, into=None):
    """logits (rows, K, 1025) of one step -> tokens (b, K). With cfg_scale != 1 the rows are
    [conditional; null] and are combined by guidance first. Then temperature and top-k; top_k = 1
    or temperature = 0 is greedy. The special id is never sampled.

    into: (steps, col, fixed, next_input) for generate: also write the tokens into steps (b, K, n)
    at column col (a (1,) device tensor) where fixed (bool, like steps) is False, and, if given,
    that column into next_input (b * copies, K, 1), the next step's input. The sampling kernel
    does it in the same launch: a frame of decoding is a few kernels shorter."""
    logits = logits[..., :SPECIAL]  # only real codes can be sampled; the indices stay the ids
    if top_k == 1 or temperature == 0:
        logits = logits.float()
        tokens = (classifier_free_guidance(*logits.chunk(2), cfg_scale) if cfg_scale != 1.0 else logits).argmax(-1)
        return _write_step(tokens, into)
    rows, K, V = logits.shape
    top_k = min(top_k, V) if top_k else V
    # A draw from the categorical p: argmax of p_i / E_i with E_i ~ Exp(1) independent (the first
    # of competing exponential clocks to ring; what torch.multinomial does for one sample). Unlike
    # multinomial it never synchronises with the host, so a CUDA graph can hold it.
    noise = torch.empty(rows // 2 if cfg_scale != 1.0 else rows, K, V, device=logits.device)
    noise.exponential_(generator=generator)
    if Block.use_decode_kernels and logits.is_cuda and kernels.triton is not None:
        # the lines below and _write_step, in one kernel
        return kernels.sample_top_k(logits, noise, cfg_scale, top_k, temperature, into)
    logits = logits.float()
    if cfg_scale != 1.0:
        logits = classifier_free_guidance(*logits.chunk(2), cfg_scale)
    logits = logits / temperature
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    probs = F.softmax(logits.masked_fill(logits < kth, -torch.inf), dim=-1)
    return _write_step((probs / noise).argmax(-1), into)


def _write_step(tokens, into):
    """sample_next's `into`: tokens (b, K) into column col of steps where not fixed, and that
    column into next_input. Returns what was written."""
    if into is None:
        return tokens
    steps, col, fixed, next_input = into
    tokens = torch.where(fixed.index_select(2, col)[..., 0], steps.index_select(2, col)[..., 0], tokens)
    steps.index_copy_(2, col, tokens[..., None])
    if next_input is not None:
        next_input.copy_(tokens[..., None].repeat(next_input.shape[0] // tokens.shape[0], 1, 1))
    return tokens


# ------------------------------------------------------------------------------------------------
# 7. Stage 2: codebooks 2..9 from codebook 1 and the text, by latent diffusion (after DiscoDiff)
#
# Each DAC code stands for an 8-d vector of its codebook (`quantizer.from_codes`); the 9 codebooks
# give 72 channels at 86 Hz, each 8-channel block normalised by statistics of the training data.
# A 1-D U-Net denoises the 64 fine channels given the clean 8 coarse ones, the text (masked
# cross-attention and a pooled vector) and the step; cosine schedule, v-prediction, DDPM ancestral
# sampling with guidance. Back to codes: the nearest codebook entry, per fine codebook (what
# `quantizer.from_latents` does inside); codebook 1 is copied through, so it cannot change.

LATENT_DIM = 8  # DAC's codebook_dim


@dataclass
class Stage2Config:
    channels: tuple = (256, 512, 768)  # U-Net widths, halving the frame rate between levels
    d_cond: int = 512                  # projected text width
    n_heads: int = 8
    d_text: int = 768
    n_codebooks: int = 9
    diffusion_steps: int = 100

    @staticmethod
    def small():
        """A tiny U-Net for tests and the synthetic demo."""
        return dict(channels=(32, 64), d_cond=32, n_heads=4)


class ResBlock1d(nn.Module):
    """GroupNorm-SiLU-Conv twice; the step and pooled text enter as a scale and shift (FiLM)."""

    def __init__(self, c_in, c_out, d_emb):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(32, c_in // 4), c_in), nn.Conv1d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(d_emb, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(32, c_out // 4), c_out), nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[..., None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class Level(nn.Module):
    """Two ResBlocks, then (optionally) cross-attention from every frame to the text."""

    def __init__(self, c_in, c_out, d_emb, cfg, attention):
        super().__init__()
        self.res = nn.ModuleList([ResBlock1d(c_in, c_out, d_emb), ResBlock1d(c_out, c_out, d_emb)])
        self.attn = CrossAttention(c_out, cfg.n_heads, 0.0, d_memory=cfg.d_cond) if attention else None
        self.attn_norm = nn.LayerNorm(c_out) if attention else None

    def forward(self, x, emb, text, text_mask):
        for block in self.res:
            x = block(x, emb)
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x.transpose(1, 2)), text, text_mask).transpose(1, 2)
        return x


class DiffusionUNet(nn.Module):
    """(b, 72, T) noisy fine latents + clean coarse latent, step t in (0, 1], text -> v (b, 64, T)."""

    def __init__(self, cfg):
        super().__init__()
        C, d_emb = cfg.channels, 4 * cfg.channels[0]
        fine = (cfg.n_codebooks - 1) * LATENT_DIM
        self.text_proj, self.text_norm = nn.Linear(cfg.d_text, cfg.d_cond), nn.LayerNorm(cfg.d_cond)
        self.time_mlp = nn.Sequential(nn.Linear(C[0], d_emb), nn.SiLU(), nn.Linear(d_emb, d_emb))
        self.pool_proj = nn.Linear(cfg.d_cond, d_emb)
        self.inp = nn.Conv1d(cfg.n_codebooks * LATENT_DIM, C[0], 3, padding=1)
        self.down = nn.ModuleList(Level(C[max(i - 1, 0)], c, d_emb, cfg, attention=i > 0) for i, c in enumerate(C))
        self.downsample = nn.ModuleList(nn.Conv1d(c, c, 3, stride=2, padding=1) for c in C[:-1])
        self.mid = Level(C[-1], C[-1], d_emb, cfg, attention=True)
        self.upsample = nn.ModuleList(nn.Conv1d(C[i + 1], C[i], 3, padding=1) for i in range(len(C) - 1))
        self.up = nn.ModuleList(Level(2 * c, c, d_emb, cfg, attention=i > 0) for i, c in enumerate(C))
        self.out_norm, self.out = nn.GroupNorm(min(32, C[0] // 4), C[0]), nn.Conv1d(C[0], fine, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start by predicting v = 0
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, text, text_mask):
        T = x.shape[-1]
        x = F.pad(x, (0, -T % 2 ** (len(self.down) - 1)))  # a length the down/up path can halve
        memory = self.text_norm(self.text_proj(text.to(x.dtype)))
        pooled = (memory * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        emb = self.time_mlp(sinusoidal_positions(t[:, None] * 1000, self.time_mlp[0].in_features)[:, 0].to(x.dtype))
        emb = emb + self.pool_proj(pooled)
        h, skips = self.inp(x), []
        for i, level in enumerate(self.down):
            h = level(h, emb, memory, text_mask)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb, memory, text_mask)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb, memory, text_mask)
        return self.out(F.silu(self.out_norm(h)))[..., :T]


def cosine_schedule(t):
    """alpha_t, sigma_t of the cosine schedule (Nichol & Dhariwal 2021): x_t = alpha x_0 + sigma eps."""
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


class Stage2Diffusion(nn.Module):
    """p(codebooks 2..9 | codebook 1, text). attach_codec(dac) before use: the DAC model whose
    quantizer maps codes to latents and back (frozen, and not part of this model's weights)."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        self.cfg = cfg
        self.unet = DiffusionUNet(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.n_codebooks))
        self.register_buffer("latent_std", torch.ones(cfg.n_codebooks))

    def attach_codec(self, codec):
        object.__setattr__(self, "codec", codec)  # a plain attribute: not a submodule, not in state_dict
        return self

    def _block_stats(self, n):
        """Per-codebook mean and std, repeated over each codebook's 8 channels: (1, 8n, 1)."""
        expand = lambda v: v[:n].repeat_interleave(LATENT_DIM)[None, :, None]
        return expand(self.latent_mean), expand(self.latent_std)

    @torch.no_grad()
    def latents(self, codes):
        """codes (b, n, T), n <= 9 -> normalised latents (b, 8n, T). Special ids (padding) -> 0."""
        _, lat, _ = self.codec.quantizer.from_codes(codes.clamp(max=CODEBOOK_SIZE - 1))
        mean, std = self._block_stats(codes.shape[1])
        lat = (lat.float() - mean) / std
        return lat.masked_fill((codes == SPECIAL).repeat_interleave(LATENT_DIM, dim=1), 0.0)

    @torch.no_grad()
    def set_latent_stats(self, codes):
        """Measure the per-codebook mean and std of the latents of training codes (b, 9, T)."""
        self.latent_mean.zero_()
        self.latent_std.fill_(1.0)
        lat = self.latents(codes).view(codes.shape[0], self.cfg.n_codebooks, LATENT_DIM, -1)
        valid = (codes != SPECIAL)[:, :, None, :].expand_as(lat)
        for k in range(self.cfg.n_codebooks):
            v = lat[:, k][valid[:, k]]
            self.latent_mean[k], self.latent_std[k] = v.mean(), v.std().clamp(min=1e-5)

    @torch.no_grad()
    def codes_from_latents(self, fine, coarse_codes):
        """Normalised fine latents (b, 64, T) -> codes (b, 9, T), codebook 1 = coarse_codes."""
        mean, std = self._block_stats(self.cfg.n_codebooks)
        fine = fine.float() * std[:, LATENT_DIM:] + mean[:, LATENT_DIM:]
        codes = [coarse_codes]
        for k in range(1, self.cfg.n_codebooks):
            block = fine[:, (k - 1) * LATENT_DIM:k * LATENT_DIM].to(self.codec.dtype)
            codes.append(self.codec.quantizer.quantizers[k].decode_latents(block)[1])
        return torch.stack(codes, dim=1)

    def forward(self, codes, text, text_mask):
        """Training loss (v-prediction, MSE over real frames) for codes (b, 9, T)."""
        x0 = self.latents(codes)
        coarse, fine = x0[:, :LATENT_DIM], x0[:, LATENT_DIM:]
        steps = self.cfg.diffusion_steps
        t = torch.randint(1, steps + 1, (codes.shape[0],), device=codes.device).float() / steps
        alpha, sigma = (s[:, None, None] for s in cosine_schedule(t))
        noise = torch.randn_like(fine)
        v_target = alpha * noise - sigma * fine
        v = self.unet(torch.cat([alpha * fine + sigma * noise, coarse], dim=1), t, text, text_mask)
        frames = (codes[:, :1] != SPECIAL).float()
        return ((v.float() - v_target) ** 2 * frames).sum() / (frames.sum() * v.shape[1]).clamp(min=1)

    def predict_v(self, x_t, coarse, t, text, text_mask, cfg_scale):
        """v for one step; with guidance the conditional and null (no text) rows run as one batch."""
        if cfg_scale == 1.0:
            return self.unet(torch.cat([x_t, coarse], 1), t, text, text_mask).float()
        both = lambda z: torch.cat([z, z])
        v = self.unet(torch.cat([both(x_t), both(coarse)], 1), both(t), both(text),
                      torch.cat([text_mask, torch.zeros_like(text_mask)])).float()
        return classifier_free_guidance(*v.chunk(2), cfg_scale)

    @torch.no_grad()
    def sample_latents(self, coarse, text, text_mask, steps=None, cfg_scale=3.0, generator=None, progress=False):
        """DDPM ancestral sampling: normalised coarse latent (b, 8, T) -> fine latents (b, 64, T)."""
        steps = steps or self.cfg.diffusion_steps
        b, _, T = coarse.shape
        fine_ch = (self.cfg.n_codebooks - 1) * LATENT_DIM
        x = torch.randn(b, fine_ch, T, device=coarse.device, generator=generator)
        iterator = range(steps, 0, -1)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="stage 2", unit="step", leave=False)
        for i in iterator:
            t, s = torch.full((b,), i / steps, device=x.device), torch.full((b,), (i - 1) / steps, device=x.device)
            (alpha_t, sigma_t), (alpha_s, sigma_s) = [[v[:, None, None] for v in cosine_schedule(u)] for u in (t, s)]
            v = self.predict_v(x.to(coarse.dtype), coarse, t, text, text_mask, cfg_scale)
            x0 = alpha_t * x - sigma_t * v                                     # the model's clean estimate
            alpha_ts = alpha_t / alpha_s                                       # q(x_t | x_s)
            var_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
            mean = alpha_ts * sigma_s ** 2 / sigma_t ** 2 * x + alpha_s * var_ts / sigma_t ** 2 * x0
            x = mean
            if i > 1:
                x = x + (var_ts * sigma_s ** 2 / sigma_t ** 2).sqrt() * torch.randn(x.shape, device=x.device, generator=generator)
        return x

    @torch.no_grad()
    def generate(self, coarse_codes, text, text_mask, steps=None, cfg_scale=3.0, generator=None, progress=False):
        """Codebook 1 (b, T) and the text -> all codes (b, 9, T), codebook 1 unchanged."""
        coarse = self.latents(coarse_codes[:, None])
        fine = self.sample_latents(coarse, text, text_mask, steps, cfg_scale, generator, progress)
        return self.codes_from_latents(fine, coarse_codes)

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        return adamw(self, lr, weight_decay, betas, device_type)
