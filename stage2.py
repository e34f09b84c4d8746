"""Stage 2 of the two-stage system: codebooks 2..9 from codebook 1 and the text, by latent diffusion.

The paper's best system, "Prefix SiMBA/Diffusion", lets the LM (ssmttm.py) write codebook 1 and a
diffusion model g write the rest, p(x^(2:K) | x^(1), c) (paper, eq. 4). The paper uses the frozen
1.2 B DiscoDiff; its weights are not usable here, so this is a compact model of the same kind,
trained by `train.py --stage 2`:

- Each DAC code stands for an 8-d vector of its codebook (`quantizer.from_codes`); the 9 codebooks
  give 72 channels at 86 Hz, each 8-channel block normalised by statistics of the training data.
- A 1-D U-Net denoises the 64 fine channels given the clean 8 coarse ones, the text (masked
  cross-attention and a pooled vector) and the step.
- Cosine schedule, v-prediction, caption dropout in training, DDPM ancestral sampling with
  classifier-free guidance (the conditional and null rows as one batch).
- Back to codes: per fine codebook, the entry of highest cosine similarity (DAC's `decode_latents`,
  what `quantizer.from_latents` does inside: both sides L2-normalised, so not the Euclidean nearest);
  codebook 1 is copied through, so it cannot change.
- Continuation: frames whose codes are known (an audio prompt) are kept exactly and the others
  sampled around them, by replacing the known frames at every step (RePaint; `generate(known=)`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ssmttm import (CODEBOOK_SIZE, SPECIAL, CrossAttention, adamw, as_codes, check_integer, check_numbers,
                    check_text, classifier_free_guidance, sinusoidal_positions)

LATENT_DIM = 8  # DAC's codebook_dim


@dataclass
class Stage2Config:
    channels: tuple = (256, 512, 768)  # U-Net widths, halving the frame rate between levels
    d_cond: int = 512                  # projected text width
    n_heads: int = 8
    d_text: int = 768
    n_codebooks: int = 9
    diffusion_steps: int = 100

    def __post_init__(self):
        """ValueError naming the field: a size below 1, n_codebooks below 2 (stage 2 makes codebooks
        2..K), no U-Net level, or a width the GroupNorms (min(32, width // 4) groups) cannot split;
        TypeError for a size or width that is not an integer (64.0, True), and channels that are not a
        tuple or list of widths."""
        if not isinstance(self.channels, (tuple, list)):
            raise TypeError(f"Stage2Config.channels {self.channels!r}: want a tuple of widths, e.g. (256, 512, 768)")
        for i, c in enumerate(self.channels):
            check_integer(f"Stage2Config.channels[{i}]", c)
        for name, least in (("d_cond", 1), ("n_heads", 1), ("d_text", 1), ("n_codebooks", 2), ("diffusion_steps", 1)):
            check_integer(f"Stage2Config.{name}", getattr(self, name), least)
        if not self.channels or any(c < 4 or c % min(32, c // 4) for c in self.channels):
            raise ValueError(f"Stage2Config.channels {tuple(self.channels)}: want one or more widths of 4 or more, "
                             "each a multiple of its GroupNorms' min(32, width // 4) groups")

    @staticmethod
    def small():
        """The settings of a tiny U-Net for tests and the synthetic demo, a dict to combine with others:
        Stage2Config(**Stage2Config.small(), d_text=24)."""
        return dict(channels=(32, 64), d_cond=32, n_heads=4)


def masked_group_norm(x, norm, mask):
    """nn.GroupNorm `norm` of x (b, C, T) with its statistics over the frames where mask (b, 1, T) is 1 only
    (the others are normalised too, with the same statistics; what they hold does not matter). ValueError for
    a mask of another shape than (b, 1, T) (a (b, T) mask would broadcast against the groups, a (1, 1, T) one
    against every row, silently)."""
    b, C, T = x.shape
    if mask.shape != (b, 1, T):
        raise ValueError(f"masked_group_norm: mask {tuple(mask.shape)} for x {tuple(x.shape)}: want ({b}, 1, {T})")
    xg, m = x.view(b, norm.num_groups, C // norm.num_groups, T), mask[:, None]    # (b, G, C/G, T), (b, 1, 1, T)
    n = (m.sum(-1, keepdim=True) * xg.shape[2]).clamp(min=1)   # a row with no real frame: 0, not NaN
    mean = (xg * m).sum((2, 3), keepdim=True) / n
    var = ((xg - mean) ** 2 * m).sum((2, 3), keepdim=True) / n
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, C, T)
    return y * norm.weight[:, None] + norm.bias[:, None]


class ResBlock1d(nn.Module):
    """GroupNorm-SiLU-Conv twice; the step and pooled text enter as a scale and shift (FiLM). mask (b, 1, T),
    1 at real frames and 0 past a clip's end: the norms count the real frames only and each 3-wide conv sees
    zeros past the end (the 1x1 skip conv works frame by frame), so that the real frames' output does not
    depend on what lies there. ValueError for an emb that is not (b, d_emb) for x (b, c_in, T) (one row's
    would scale and shift every row), and a mask masked_group_norm refuses."""

    def __init__(self, c_in, c_out, d_emb):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, c_in // 4), c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(d_emb, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(32, c_out // 4), c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb, mask):
        if emb.shape != (x.shape[0], self.film.in_features):
            raise ValueError(f"ResBlock1d: emb {tuple(emb.shape)} for x {tuple(x.shape)}: want "
                             f"({x.shape[0]}, {self.film.in_features})")
        h = self.conv1(F.silu(masked_group_norm(x, self.norm1, mask)) * mask)
        scale, shift = self.film(emb)[..., None].chunk(2, dim=1)
        h = self.conv2(F.silu(masked_group_norm(h, self.norm2, mask) * (1 + scale) + shift) * mask)
        return self.skip(x) + h


class Level(nn.Module):
    """Two ResBlocks, then (optionally) cross-attention from every frame to the text."""

    def __init__(self, c_in, c_out, d_emb, cfg, attention):
        super().__init__()
        self.res = nn.ModuleList([ResBlock1d(c_in, c_out, d_emb), ResBlock1d(c_out, c_out, d_emb)])
        self.attn = CrossAttention(c_out, cfg.n_heads, 0.0, d_memory=cfg.d_cond) if attention else None
        self.attn_norm = nn.LayerNorm(c_out) if attention else None

    def forward(self, x, emb, text, text_mask, mask):
        for block in self.res:
            x = block(x, emb, mask)
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x.transpose(1, 2)), text, text_mask).transpose(1, 2)
        return x


class DiffusionUNet(nn.Module):
    """(b, 72, T) noisy fine latents + clean coarse latent, step t in (0, 1], text -> v (b, 64, T). lengths
    (b,): each row's real frames, the rest padding (None: all T). Every layer that mixes frames (the
    3-wide convs, the down- and up-sampling, the norms) sees zeros past a row's real frames (and past T,
    where the length is padded to one the down/up path can halve), or counts the real frames only; the
    others (the skip convs, the text cross-attention) work frame by frame. So a clip's v is the same
    whatever padding follows it; the padded frames' v means nothing, and so is whatever text holds at
    padding. ValueError for no frames (T = 0), text of other shapes (ssmttm.check_text), x not of
    n_codebooks * 8 channels, and x, t, text and lengths not of one batch b: x (b, C, T), t (b,), lengths (b,)."""

    def __init__(self, cfg):
        super().__init__()
        C, d_emb = cfg.channels, 4 * cfg.channels[0]
        fine = (cfg.n_codebooks - 1) * LATENT_DIM
        self.text_proj, self.text_norm = nn.Linear(cfg.d_text, cfg.d_cond), nn.LayerNorm(cfg.d_cond)
        self.time_mlp = nn.Sequential(nn.Linear(C[0], d_emb), nn.SiLU(), nn.Linear(d_emb, d_emb))
        self.pool_proj = nn.Linear(cfg.d_cond, d_emb)
        self.inp = nn.Conv1d(cfg.n_codebooks * LATENT_DIM, C[0], 3, padding=1)
        self.down = nn.ModuleList(Level(C[max(i - 1, 0)], c, d_emb, cfg, attention=i > 0)
                                  for i, c in enumerate(C))
        self.downsample = nn.ModuleList(nn.Conv1d(c, c, 3, stride=2, padding=1) for c in C[:-1])
        self.mid = Level(C[-1], C[-1], d_emb, cfg, attention=True)
        self.upsample = nn.ModuleList(nn.Conv1d(C[i + 1], C[i], 3, padding=1) for i in range(len(C) - 1))
        self.up = nn.ModuleList(Level(2 * c, c, d_emb, cfg, attention=i > 0) for i, c in enumerate(C))
        self.out_norm, self.out = nn.GroupNorm(min(32, C[0] // 4), C[0]), nn.Conv1d(C[0], fine, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start by predicting v = 0
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, text, text_mask, lengths=None):
        T = x.shape[-1]
        check_text(text, text_mask, self.text_proj.in_features, "DiffusionUNet")
        if T == 0:
            raise ValueError(f"DiffusionUNet: x {tuple(x.shape)}: no frames")
        if x.dim() != 3 or t.shape != x.shape[:1] or text.shape[0] != x.shape[0]:
            raise ValueError(f"DiffusionUNet: x {tuple(x.shape)}, t {tuple(t.shape)}, text {tuple(text.shape)}: "
                             "want (b, channels, T), (b,) and (b, lt, d_text), one row each")
        if x.shape[1] != self.inp.in_channels:
            raise ValueError(f"DiffusionUNet: x {tuple(x.shape)}: want {self.inp.in_channels} channels "
                             "(n_codebooks * 8: the noisy fine latents, then the coarse one)")
        if lengths is not None and lengths.shape != x.shape[:1]:
            raise ValueError(f"DiffusionUNet: lengths {tuple(lengths.shape)} for x {tuple(x.shape)}: want "
                             f"({x.shape[0]},), one per row")
        text = text.masked_fill(~text_mask[..., None], 0)  # padding: never read, so NaN there must not leak
        x = F.pad(x, (0, -T % 2 ** (len(self.down) - 1)))  # a length the down/up path can halve
        real = torch.full((x.shape[0],), T, device=x.device) if lengths is None else lengths
        # per level, 1 at the frames that start inside a row's real frames: (b, 1, T / 2^i)
        masks = [(torch.arange(0, x.shape[-1], 2 ** i, device=x.device) < real[:, None])[:, None].to(x.dtype)
                 for i in range(len(self.down))]
        x = x * masks[0]
        memory = self.text_norm(self.text_proj(text.to(x.dtype)))
        pooled = (memory * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        steps = sinusoidal_positions(t[:, None] * 1000, self.time_mlp[0].in_features)[:, 0]
        emb = self.time_mlp(steps.to(x.dtype)) + self.pool_proj(pooled)
        h, skips = self.inp(x), []
        for i, level in enumerate(self.down):
            h = level(h, emb, memory, text_mask, masks[i])
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h * masks[i])
        h = self.mid(h, emb, memory, text_mask, masks[-1])
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest") * masks[i])
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb, memory, text_mask, masks[i])
        return self.out(F.silu(masked_group_norm(h, self.out_norm, masks[0])) * masks[0])[..., :T]


def gaussian_noise(shape, device, generator=None):
    """N(0, 1) draws (b, ...): from one generator, or, given a list of b generators, row i from
    generator[i], so that a prompt draws the same numbers in any batch. ValueError for a list of
    generators that is not one per row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows: give one per row")
        return torch.stack([torch.randn(shape[1:], device=device, generator=g) for g in generator])
    return torch.randn(shape, device=device, generator=generator)


def cosine_schedule(t):
    """alpha_t, sigma_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), t in [0, 1]:
    x_t = alpha x_0 + sigma eps, alpha^2 = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2, s = 0.008.
    So alpha_0 = 1 and sigma_0 = 0: the last sampling step returns the model's clean estimate."""
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = (f(t) / f(torch.zeros_like(t))).clamp(0, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


class Stage2Diffusion(nn.Module):
    """p(codebooks 2..9 | codebook 1, text) (paper, eq. 4). attach_codec(dac) before use: the DAC
    model whose quantizer maps codes to latents and back (frozen, not part of this model's weights)."""

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
        """codes (b, n, T), n <= 9 -> normalised latents (b, 8n, T). Special ids (padding) -> 0. TypeError
        for codes that ssmttm.as_codes refuses (bool ones were read as codes 0 and 1; int16 failed in DAC's
        embedding)."""
        codes = as_codes("Stage2Diffusion: codes", codes)
        _, lat, _ = self.codec.quantizer.from_codes(codes.clamp(max=CODEBOOK_SIZE - 1))
        mean, std = self._block_stats(codes.shape[1])
        lat = (lat.float() - mean) / std
        return lat.masked_fill((codes == SPECIAL).repeat_interleave(LATENT_DIM, dim=1), 0.0)

    @torch.no_grad()
    def set_latent_stats(self, codes):
        """Measure the per-codebook mean and std of the latents of training codes (b, 9, T). ValueError for
        codes of another number of codebooks than cfg.n_codebooks; TypeError (before the statistics are reset)
        for codes ssmttm.as_codes refuses."""
        codes = as_codes("set_latent_stats: codes", codes)
        if codes.dim() != 3 or codes.shape[1] != self.cfg.n_codebooks:  # (else a view fails on the size)
            raise ValueError(f"set_latent_stats: codes {tuple(codes.shape)}: want (b, {self.cfg.n_codebooks}, T)")
        self.latent_mean.zero_()
        self.latent_std.fill_(1.0)
        lat = self.latents(codes).view(codes.shape[0], self.cfg.n_codebooks, LATENT_DIM, codes.shape[-1])
        valid = (codes != SPECIAL)[:, :, None, :].expand_as(lat)
        for k in range(self.cfg.n_codebooks):
            v = lat[:, k][valid[:, k]]
            self.latent_mean[k], self.latent_std[k] = v.mean(), v.std().clamp(min=1e-5)

    @torch.no_grad()
    def codes_from_latents(self, fine, coarse_codes):
        """Normalised fine latents (b, 64, T) -> codes (b, 9, T), codebook 1 = coarse_codes. The entries
        (DAC's lookup: nearest after L2 normalisation) are found in the codec's precision (fp32) even under
        autocast: a product in bf16 moves them."""
        mean, std = self._block_stats(self.cfg.n_codebooks)
        fine = fine.float() * std[:, LATENT_DIM:] + mean[:, LATENT_DIM:]
        codes = [coarse_codes]
        with torch.autocast(fine.device.type, enabled=False):
            for k in range(1, self.cfg.n_codebooks):
                block = fine[:, (k - 1) * LATENT_DIM:k * LATENT_DIM].to(self.codec.dtype)
                codes.append(self.codec.quantizer.quantizers[k].decode_latents(block)[1])
        return torch.stack(codes, dim=1)

    def forward(self, codes, text, text_mask, count=None):
        """Training loss (v-prediction, MSE over real frames) for codes (b, 9, T), each clip's real frames
        followed by padding (SPECIAL). The U-Net sees every frame at once (not causally); it is told each
        clip's length, so that the padding does not change what it makes of the real frames (generation never
        shows it any). count: the real frames of the whole batch this one is a part of (a training step's
        micro-batches on every process): the loss is then this part's share of that batch's (ssmttm.lm_loss's
        counts; None: the whole batch is this one). ValueError for a count that is not a scalar (one of shape (b,)
        would broadcast into a loss per row); TypeError for one that is no torch tensor of integers or floats
        (check_numbers: a Python int fails on .shape, a bool tensor would count 1 frame)."""
        if count is not None:
            check_numbers("Stage2Diffusion", "count", count, integer=True)
        if count is not None and count.shape != ():
            raise ValueError(f"Stage2Diffusion: count {tuple(count.shape)}: want a scalar (), the real frames of the "
                             "whole batch")
        frames = (codes[:, :1] != SPECIAL).float()                         # (b, 1, T): 1 at real frames
        x0 = self.latents(codes)
        coarse, fine = x0[:, :LATENT_DIM], x0[:, LATENT_DIM:]
        steps = self.cfg.diffusion_steps
        t = torch.randint(1, steps + 1, (codes.shape[0],), device=codes.device).float() / steps
        alpha, sigma = (s[:, None, None] for s in cosine_schedule(t))
        noise = torch.randn_like(fine)
        v_target = alpha * noise - sigma * fine
        v = self.unet(torch.cat([alpha * fine + sigma * noise, coarse], dim=1), t, text, text_mask,
                      frames.sum(-1)[:, 0].long())
        count = frames.sum() if count is None else count
        return ((v.float() - v_target) ** 2 * frames).sum() / (count * v.shape[1]).clamp(min=1)

    def predict_v(self, x_t, coarse, t, text, text_mask, cfg_scale):
        """v for one step; with guidance the conditional and null (no text) rows run as one batch."""
        if cfg_scale == 1.0:
            return self.unet(torch.cat([x_t, coarse], 1), t, text, text_mask).float()
        both = lambda z: torch.cat([z, z])
        v = self.unet(torch.cat([both(x_t), both(coarse)], 1), both(t), both(text),
                      torch.cat([text_mask, torch.zeros_like(text_mask)])).float()
        return classifier_free_guidance(*v.chunk(2), cfg_scale)

    @torch.no_grad()
    def sample_latents(self, coarse, text, text_mask, steps=None, cfg_scale=3.0, generator=None,
                       progress=False, known=None, known_frames=None):
        """DDPM ancestral sampling: normalised coarse latent (b, 8, T) -> fine latents (b, 64, T).
        generator: a torch.Generator, None, or a list of b (gaussian_noise).

        Inpainting (RePaint, Lugmayr et al. 2022, without its resampling jumps): known (b, 64, T),
        normalised fine latents, and known_frames (b, T) bool, True at the frames to keep (the
        values of known elsewhere are ignored). After each step, the known frames of x are replaced
        by the known latents noised to that step's level, alpha_s x_0 + sigma_s eps, so the model
        denoises the other frames next to a context that agrees with them; after the last step they
        are the known latents exactly. (x starts as noise everywhere: at t = 1, alpha is 0.)
        steps: DDPM steps (default cfg.diffusion_steps); TypeError if not an integer. ValueError for steps
        below 1, for coarse that is not (b, 8, T), for no frames (T = 0), for text of other shapes
        (ssmttm.check_text) or another batch than coarse, a cfg_scale that is not finite, a list of
        generators not one per row, known without known_frames or the reverse, and known or known_frames
        of other shapes than coarse's (b, 64, T) and (b, T), or known_frames not bool."""
        steps = self.cfg.diffusion_steps if steps is None else steps
        check_integer("sample_latents: steps", steps)
        if steps < 1:
            raise ValueError(f"sample_latents: steps {steps}, want 1 or more")
        if coarse.dim() != 3 or coarse.shape[1] != LATENT_DIM:  # (else the U-Net names its doubled, widened input)
            raise ValueError(f"sample_latents: coarse {tuple(coarse.shape)}: want (b, {LATENT_DIM}, T), codebook 1's "
                             "normalised latent")
        if coarse.shape[-1] == 0:
            raise ValueError(f"sample_latents: coarse {tuple(coarse.shape)}: no frames")
        if not math.isfinite(cfg_scale):
            raise ValueError(f"sample_latents: cfg_scale {cfg_scale}: want a finite number")
        if (known is None) != (known_frames is None):
            raise ValueError("sample_latents: known and known_frames go together (the latents and the frames to keep)")
        fine_channels = (self.cfg.n_codebooks - 1) * LATENT_DIM
        if known is not None and (known.shape != (coarse.shape[0], fine_channels, coarse.shape[-1]) or
                                  known_frames.dtype != torch.bool or known_frames.shape != known.shape[::2]):
            b, T = coarse.shape[0], coarse.shape[-1]
            raise ValueError(f"sample_latents: known {tuple(known.shape)}, known_frames {tuple(known_frames.shape)} "
                             f"{known_frames.dtype}: want ({b}, {fine_channels}, {T}) and torch.bool ({b}, {T}) "
                             f"for coarse {tuple(coarse.shape)}")
        check_text(text, text_mask, self.cfg.d_text, "sample_latents")  # before guidance doubles the rows
        if coarse.shape[0] != text.shape[0]:
            raise ValueError(f"sample_latents: coarse {tuple(coarse.shape)} for text {tuple(text.shape)}: one row per "
                             "text")
        b, _, T = coarse.shape
        x = gaussian_noise((b, fine_channels, T), coarse.device, generator)
        for i in tqdm(range(steps, 0, -1), desc="stage 2", unit="step", leave=False, disable=not progress):
            t = torch.full((b,), i / steps, device=x.device)  # from step t to step s, one earlier
            s = torch.full((b,), (i - 1) / steps, device=x.device)
            alpha_t, sigma_t = (v[:, None, None] for v in cosine_schedule(t))
            alpha_s, sigma_s = (v[:, None, None] for v in cosine_schedule(s))
            v = self.predict_v(x.to(coarse.dtype), coarse, t, text, text_mask, cfg_scale)
            x0 = alpha_t * x - sigma_t * v                                     # the model's clean estimate
            alpha_ts = alpha_t / alpha_s                                       # q(x_t | x_s)
            var_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
            x = alpha_ts * sigma_s ** 2 / sigma_t ** 2 * x + alpha_s * var_ts / sigma_t ** 2 * x0
            if i > 1:
                noise = gaussian_noise(x.shape, x.device, generator)
                x = x + (var_ts * sigma_s ** 2 / sigma_t ** 2).sqrt() * noise
            if known is not None:  # the known frames, at the noise level of step s
                if i > 1:
                    noise = gaussian_noise(x.shape, x.device, generator)
                    x = torch.where(known_frames[:, None], alpha_s * known + sigma_s * noise, x)
                else:  # s = 0: alpha_0 = 1, the known latents as they are
                    x = torch.where(known_frames[:, None], known.to(x.dtype), x)
        return x

    @torch.no_grad()
    def generate(self, coarse_codes, text, text_mask, steps=None, cfg_scale=3.0, generator=None,
                 progress=False, known=None):
        """Codebook 1 (b, T) and the text -> all codes (b, 9, T), codebook 1 unchanged.

        known: codes (b, 9, T) of frames to keep (e.g. an audio prompt being continued), the special
        id in codebooks 2..9 at the frames to sample; the kept frames come back exactly, and the
        others are sampled around them (sample_latents' inpainting). ValueError for coarse_codes that
        are not integer codes 0..1023 (b, T >= 1) (stage 1's (b, 1, T) output is codes[:, 0]), a frame
        with some fine codes known and some not, a kept frame whose codebook 1 is not coarse_codes', or
        known that are not integer codes 0..1024 (1024, the special id: a code to sample)."""
        if not (isinstance(coarse_codes, torch.Tensor) and coarse_codes.is_floating_point()):  # (floats: below)
            coarse_codes = as_codes("generate: coarse_codes", coarse_codes)
        if coarse_codes.dim() != 2 or coarse_codes.shape[1] == 0 or coarse_codes.is_floating_point() or (
                coarse_codes.numel() and not 0 <= coarse_codes.min() <= coarse_codes.max() < CODEBOOK_SIZE):
            raise ValueError(f"generate: coarse_codes {tuple(coarse_codes.shape)} {coarse_codes.dtype}: want codebook "
                             f"1, (b, T >= 1) codes 0..{CODEBOOK_SIZE - 1} (stage 1's codes (b, 1, T): codes[:, 0])")
        coarse = self.latents(coarse_codes[:, None])
        keep = fine_known = None
        if known is not None:
            if not (isinstance(known, torch.Tensor) and known.is_floating_point()):  # (floats: the ValueError below)
                known = as_codes("generate: known", known)
            if known.dim() != 3 or known.shape[1] != self.cfg.n_codebooks:
                raise ValueError(f"known {tuple(known.shape)}: want (b, {self.cfg.n_codebooks}, T) codes")
            if known.is_floating_point() or known.numel() and not 0 <= known.min() <= known.max() <= SPECIAL:
                raise ValueError(f"known {known.dtype}: want integer codes 0..{CODEBOOK_SIZE - 1} ({SPECIAL}: a code "
                                 "to sample)")
            keep = self.known_frames(known, coarse_codes)
            fine_known = self.latents(known)[:, LATENT_DIM:]  # special ids (frames to sample) -> 0
        fine = self.sample_latents(coarse, text, text_mask, steps, cfg_scale, generator, progress,
                                   fine_known, keep)
        codes = self.codes_from_latents(fine, coarse_codes)
        if known is not None:  # the nearest entry to a code's own latent could be an equally near twin
            codes = torch.where(keep[:, None], known, codes)
        return codes

    @staticmethod
    def known_frames(known, coarse_codes):
        """The frames of known (b, 9, T) whose fine codes are given -> bool (b, T); see generate."""
        if known.dim() != 3 or known.shape[::2] != coarse_codes.shape:
            raise ValueError(f"known {tuple(known.shape)}: want (b, 9, T) for coarse_codes {tuple(coarse_codes.shape)}")
        given = known[:, 1:] != SPECIAL
        keep = given.all(1)
        if (given.any(1) & ~keep).any():
            raise ValueError("known: a frame has some of codebooks 2..9 and not the others")
        if (keep & (known[:, 0] != coarse_codes)).any():
            raise ValueError("known: codebook 1 of a kept frame differs from coarse_codes")
        return keep

    def configure_optimizers(self, lr, weight_decay, betas, device_type):
        return adamw(self, lr, weight_decay, betas, device_type)
