"""Objective evaluation of generated music (paper, section IV-B), and the convergence comparison of
the four LM variants in miniature (the paper's Table I and Figure 2 / RQ1, on the synthetic set).

    python evaluate.py --generated outputs/musiccaps --reference data/musiccaps --prompts musiccaps.csv
    OMP_NUM_THREADS=1 python evaluate.py --convergence runs/rq1 --layers 2 --steps 200 --batch-size 8 --eval-every 20

Metrics, as defined by Stability-AI/stable-audio-metrics (the paper follows its ref. [16], Stable
Audio) with audiocraft's KL direction. Every file is read as mono (channels averaged), resampled
with soxr (HQ) to the model's rate and peak-normalised to -1 dBFS (for OpenL3, as stable-audio-metrics'
openl3_fd, peak-normalised at the file's own rate before resampling).

  FD_openl3   Frechet distance between two Gaussians fitted (mean, covariance with ddof 1) to the
              OpenL3 embeddings (content "music", input "mel256", 512-d, 48 kHz) of all the 1 s
              frames, 0.5 s apart, of the generated and of the reference files:
                  FD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2)),
              in float64, the trace of the square root as the singular values of S_r^(1/2) S_g^(1/2),
              each square root from the eigenvalues of a symmetric positive semi-definite matrix
              (exact for rank-deficient covariances). Lower is better.
  KL_passt    PaSST (AudioSet, 527 tags) at 32 kHz on 10 s windows every 5 s; the logits of a
              file's windows are averaged, then softmax gives p. A window shorter than 10 s is
              zero-padded; a clip of 1.5 s or less (15 % of a window, stable-audio-metrics'
              padding threshold; audiocraft drops only segments of 0.15 s or less) has no window
              and its pair is left out (reported). Per pair of files with the same name:
                  KL(p_ref || p_gen) = sum_i p_ref,i (log p_ref,i - log(p_gen,i + 1e-6)),
              averaged over the pairs (audiocraft's `kld`). The JSON also gives KL(p_gen || p_ref),
              eps on p_ref, the direction stable-audio-metrics' code computes. Lower is better.
  CLAP        Cosine between the CLAP text embedding of a file's prompt (LAION tokenisation: at most
              77 tokens) and the CLAP audio embedding of the generated file (48 kHz, int16-rounded as
              LAION does), averaged over the generated files. Higher is better.

Weights are never downloaded here: --openl3 and --passt take local files, --clap a local folder or a
name already in the Hugging Face cache; README (Evaluation) says where to fetch them. Bad input
stops with one line naming the flag or file, exit code 2: a missing folder or weight file, an
empty folder, a generated file without a reference (with kl) or a prompt (with clap), a weights
file or CLAP name that does not load (all before any audio is read), an unreadable audio file
(when it is read).

Output: a table on stdout and a JSON (default GENERATED/evaluation.json, written atomically) with
the three numbers, counts, per-file values, the clips too short for a model's window, and the
settings.

--cache DIR keeps each file's model output (OpenL3 frames, PaSST tags, CLAP audio embedding) in DIR,
so that a run stopped part way (Ctrl-C, a kill) goes on where it stopped, and the reference set is
embedded once for all the generated sets scored against it (ResultCache says when an entry is used).

--convergence OUT trains the four variants (train.py, in this process) with one budget: the same
--layers, --steps, --batch-size, --seed and --eval-every, on the synthetic set, then writes
OUT/convergence.csv and OUT/convergence.png (loss and caption score against the step and against
the training time, evaluation excluded). --plot-only redraws from the runs already in OUT.
"""
import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
import types
import unicodedata
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import data as datamod
from data import AUDIO_EXTENSIONS, atomic_write_text

OPENL3_SR, OPENL3_HOP_S = 48000, 0.5                   # stable-audio-metrics: 48 kHz, hop 0.5 s (window 1 s)
PASST_SR, PASST_WINDOW_S, PASST_HOP_S = 32000, 10.0, 5.0
PASST_MIN_WINDOW = 0.15                                # fraction of a window below which it is dropped
KL_EPS = 1e-6
CLAP_MAX_TOKENS = 77                                   # LAION-CLAP's text length
PEAK_DB = -1.0
DEFAULT_OPENL3 = "weights/torchopenl3_mel256_music_512.pth.tar"
DEFAULT_PASST = "weights/passt-s-f128-p16-s10-ap.476-swa.pt"
DEFAULT_CLAP = "laion/clap-htsat-fused"  # LAION-CLAP, HTSAT with fusion (as stable-audio-metrics' default)
VARIANTS = ("prefix_mamba", "prefix_simba", "cross_simba", "cross_transformer")  # paper, Figure 1 (a)-(d)
# the settings equal for all variants
BUDGET = ("layers", "steps", "batch_size", "grad_accum", "seed", "eval_every", "d_model", "frames", "lr")


def fail(message):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def note(message):
    print(f"note: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Files


def list_audio(folder, flag):
    """{name without extension: path} of the audio files directly in `folder`, the names in Unicode's
    composed form (NFC): a file system may give "é" decomposed (macOS's HFS+), and the names pair with
    the other folder's and with the prompts' ids by how they read."""
    if not os.path.isdir(folder):
        fail(f"{flag} {folder}: not a folder")
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        stem = unicodedata.normalize("NFC", stem)
        if ext.lower() in AUDIO_EXTENSIONS and os.path.isfile(os.path.join(folder, entry)):
            if stem in files:
                fail(f"{flag} {folder}: two files are named {stem} ({os.path.basename(files[stem])}, {entry})")
            files[stem] = os.path.join(folder, entry)
    if not files:
        fail(f"{flag} {folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return files


def read_prompts(path):
    """{id: prompt} from JSONL ({"id": ..., "caption": ...} per line) or CSV with a header row
    (data.read_prompts). The id may be called id or ytid (MusicCaps' CSV), the text caption, prompt
    or text."""
    problem = datamod.file_problem(path)
    if problem:
        fail(f"--prompts {path}: file not found" if problem == "not found" else f"--prompts {path}: {problem}")
    if not path.lower().endswith((".jsonl", ".csv")):
        fail(f"--prompts {path}: want a .jsonl or .csv file with an id and a text per entry")
    prompts = {}
    for key, prompt in datamod.read_prompts(path):
        name = unicodedata.normalize("NFC", key)  # as list_audio names the files
        if name in prompts:
            fail(f"--prompts {path}: two ids read {name!r} (one with accents composed, one not)")
        prompts[name] = prompt
    return prompts


def load_mono(path, sample_rate, peak_first=False):
    """Audio file -> float32 mono at `sample_rate` (channels averaged, soxr HQ), peak at -1 dBFS.
    peak_first: normalise the peak at the file's own rate, then resample (stable-audio-metrics'
    openl3_fd order; the resampled peak may then differ from -1 dBFS). A silent file stays silent.
    One line, exit 2, for a file that cannot be read, is empty, is sampled below
    datamod.MIN_SAMPLE_RATE or has NaN or infinite samples."""
    import soxr
    try:
        audio, sr = datamod.read_sound(path)
    except Exception as e:  # libsndfile's message names the problem
        fail(f"{path}: unreadable audio ({datamod.first_line(e)})")
    if audio.size == 0:
        fail(f"{path}: no audio samples (an empty or damaged file)")
    try:
        datamod.check_sample_rate(sr)  # (resampling a file of 1 Hz to the metrics' rates would take all memory)
        mono = datamod.finite(audio).mean(axis=1, dtype=np.float64)  # (float32 sums of 3e38 overflow to inf)
    except datamod.AudioError as e:  # NaN would run through every metric and come out as NaN
        fail(f"{path}: {e}")
    if peak_first:
        mono = peak_normalise(mono)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return (mono if peak_first else peak_normalise(mono)).astype(np.float32)


def peak_normalise(mono):
    """Scale to a peak of PEAK_DB dBFS; silence stays silent."""
    peak = np.abs(mono).max()
    return mono * (10 ** (PEAK_DB / 20) / peak) if peak > 0 else mono


def progress(items, desc, unit="file"):
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# The three measures, on arrays


def float64_array(a):
    """a (a numpy array, a list, a torch tensor of any floating dtype, on any device) as a float64 numpy
    array. numpy cannot read a bf16 tensor (TypeError "unsupported ScalarType BFloat16"), a CUDA one, or one
    that requires grad; their values convert to float64 exactly in torch."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def gaussian_stats(embeddings):
    """embeddings (N, D) -> mean (D,), covariance (D, D) with ddof 1, both float64 (a torch tensor of any
    floating dtype too: float64_array). ValueError for fewer than 2 embeddings, another shape, or NaN or
    infinite values (they would make every statistic NaN)."""
    x = float64_array(embeddings)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 embeddings of shape (N, D), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings with NaN or infinite values ({int((~np.isfinite(x)).sum())} of {x.size})")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_eigvals(s, vectors=False):
    """Eigenvalues (and vectors) of a symmetric PSD matrix; those at round-off level (below
    n * eps * the largest, numpy's matrix_rank tolerance), negative ones included, are set to 0, so
    a singular matrix keeps its exact zeros (their square roots would otherwise add up)."""
    s = (s + s.T) / 2
    w, v = np.linalg.eigh(s) if vectors else (np.linalg.eigvalsh(s), None)
    w = np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0), w, 0.0)
    return (w, v) if vectors else w


def _psd_sqrt(s):
    """S^(1/2) of a symmetric PSD matrix, its round-off eigenvalues 0 (_psd_eigvals)."""
    w, v = _psd_eigvals(s, vectors=True)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(s1, s2):
    """tr((S1 S2)^(1/2)) for covariances S1, S2: S1 S2 is similar to S1^(1/2) S2 S1^(1/2) = M^T M with
    M = S2^(1/2) S1^(1/2), so the trace is the sum of M's singular values. No inverse, no complex
    parts: exact for singular (rank-deficient) covariances too; and since M is on the data's scale,
    not its square (as S1^(1/2) S2 S1^(1/2) is), a small eigenvalue beside a large one keeps its
    digits (the eigenvalues of the product squared would fall below round-off). S1, S2: numpy arrays or
    torch tensors (float64_array); ValueError unless both are (D, D) of one D."""
    s1, s2 = float64_array(s1), float64_array(s2)
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1] or s2.shape != s1.shape:
        raise ValueError(f"trace_sqrt_product: S1 {s1.shape} and S2 {s2.shape}: want covariances (D, D) of one D")
    return float(np.linalg.svd(_psd_sqrt(s2) @ _psd_sqrt(s1), compute_uv=False).sum())


def frechet_distance(mu1, s1, mu2, s2):
    """Frechet distance between N(mu1, S1) and N(mu2, S2):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64. Symmetric; >= 0 up to round-off.
    ValueError unless mu1, mu2 are (D,) and S1, S2 (D, D) of one D. Numpy arrays or torch tensors (float64_array)."""
    mu1, mu2, s1, s2 = (float64_array(a) for a in (mu1, mu2, s1, s2))
    D = mu1.shape[-1] if mu1.ndim == 1 else None
    if D is None or mu2.shape != (D,) or s1.shape != (D, D) or s2.shape != (D, D):
        raise ValueError(f"want means (D,) and covariances (D, D) of one D; got mu1 {mu1.shape}, S1 {s1.shape}, "
                         f"mu2 {mu2.shape}, S2 {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def kl_divergence(p_ref, p_gen, eps=KL_EPS):
    """KL(p_ref || p_gen) = sum_i p_ref_i (log p_ref_i - log(p_gen_i + eps)), with 0 log 0 = 0, over
    the last axis (audiocraft's metrics/kld.py). eps keeps a zero in p_gen finite; for identical
    inputs it gives about -eps per class instead of 0. ValueError for p_ref and p_gen of other shapes."""
    p_ref = torch.as_tensor(p_ref, dtype=torch.float64)
    p_gen = torch.as_tensor(p_gen, dtype=torch.float64)
    if p_ref.shape != p_gen.shape:
        raise ValueError(f"p_ref {tuple(p_ref.shape)} and p_gen {tuple(p_gen.shape)}: want one shape")
    return (torch.xlogy(p_ref, p_ref) - p_ref * torch.log(p_gen + eps)).sum(-1)


def passt_windows(audio, sample_rate=PASST_SR):
    """(n,) -> (W, window) float32: 10 s windows starting every 5 s (stable-audio-metrics: starts
    0, 5, ... < max(5 s, length - 5 s)); a short window is zero-padded, or dropped if it lasts at
    most 15 % of a window (stable-audio-metrics' padding threshold, below which it feeds the window
    unpadded; audiocraft drops only segments of 0.15 s or less). So a clip of 5 s or more has
    windows of 5 to 10 s of audio, a shorter one a single window, and one of 1.5 s or less none
    (W = 0). ValueError for audio that is not 1-D (a stereo clip: load_mono averages its channels)."""
    if np.ndim(audio) != 1:
        raise ValueError(f"want mono audio (n,), got shape {np.shape(audio)}")
    size, hop = int(PASST_WINDOW_S * sample_rate), int(PASST_HOP_S * sample_rate)
    windows = []
    for start in range(0, max(hop, len(audio) - hop), hop):
        w = audio[start:start + size]
        if len(w) <= PASST_MIN_WINDOW * size:
            continue
        windows.append(np.pad(w, (0, size - len(w))))
    return np.stack(windows).astype(np.float32) if windows else np.zeros((0, size), np.float32)


def passt_has_window(samples, sample_rate=PASST_SR):
    """Whether passt_windows gives a clip of `samples` samples a window: its first window, the longest,
    is kept (a clip of more than 1.5 s at 32 kHz)."""
    return samples > PASST_MIN_WINDOW * int(PASST_WINDOW_S * sample_rate)


def cosine(a, b):
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,). ValueError for a and b of other shapes
    (torch would broadcast one row, or a (D,) vector, against the N rows of the other: N scores against
    the one embedding, not a pair per row)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine: a {tuple(a.shape)} and b {tuple(b.shape)}: want one shape (N, D)")
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


# ------------------------------------------------------------------------------------------------
# OpenL3 (torchopenl3)


def load_openl3(path, device):
    """torchopenl3's PytorchOpenl3 (music, mel256, 512-d) with the weights file at `path`
    (torchopenl3_mel256_music_512.pth.tar, a state dict), in eval mode."""
    if not os.path.isfile(path):
        fail(f"--openl3 {path}: no such weights file "
             "(fetch torchopenl3_mel256_music_512.pth.tar; see README, Evaluation)")
    try:
        from torchopenl3.models import PytorchOpenl3
    except ImportError as e:
        fail(f"--openl3: torchopenl3 is not installed ({e}); see requirements-eval.txt")
    with warnings.catch_warnings():  # librosa: the lowest of the 256 HTK mel bands catch no FFT bin (as in OpenL3)
        warnings.filterwarnings("ignore", message="Empty filters detected")
        model = PytorchOpenl3(content_type="music", input_repr="mel256", embedding_size=512)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as e:
        fail(f"--openl3 {path}: not OpenL3 mel256/music/512 weights ({datamod.first_line(e)[:200]})")
    return model.eval().to(device)


def openl3_frame_count(samples):
    """The number of frames openl3_embeddings gives a clip of `samples` samples at 48 kHz, as torchopenl3's
    preprocess_audio_batch (center=True, hop 0.5 s) cuts it: half a window of zeros in front, then the
    end padded to a whole hop past the first window, so ceil(samples / hop) frames, at least 1. It
    rounds the hop count up in float32: from 1024 hops on (a clip of 512.5 s or more) a last part of a
    hop that float32 cannot tell from 0 there (a few samples) is rounded away, and the frames end at
    the last whole hop."""
    frame, hop = OPENL3_SR, int(OPENL3_HOP_S * OPENL3_SR)
    past = samples + frame // 2 - frame                # the centred clip past its first window
    if past <= 0:
        return 1
    hops = math.ceil(np.float32(past / hop))           # torch.ceil of a float32 tensor in torchopenl3
    return 1 + (hops if hops * hop >= past else past // hop)


@torch.no_grad()
def openl3_embeddings(model, audio, device, batch_size=32):
    """Mono audio at 48 kHz (n,) -> OpenL3 embeddings (frames, 512) float64: 1 s frames every 0.5 s,
    the first centred on t = 0 (torchopenl3's framing, as openl3's center=True; zero-padded)."""
    from torchopenl3.utils import preprocess_audio_batch
    frames = preprocess_audio_batch(torch.from_numpy(audio)[None], OPENL3_SR, center=True, hop_size=OPENL3_HOP_S)
    out = [model(frames[i:i + batch_size].float().to(device)).double().cpu() for i in range(0, len(frames), batch_size)]
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------
# PaSST (hear21passt)


def kaldi_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq,
                    vtln_low=100.0, vtln_high=-500.0, vtln_warp_factor=1.0):
    """Kaldi's triangular mel filterbank (num_bins, window_length_padded / 2) float32, and the centre
    frequencies (num_bins, 1): mel(f) = 1127 ln(1 + f / 700); num_bins triangles equally spaced in
    mel between low_freq and high_freq (<= 0: relative to Nyquist), evaluated at the FFT bin
    frequencies k * sample_freq / window_length_padded. The signature and float32 arithmetic of
    torchaudio.compliance.kaldi.get_mel_banks, without VTLN warping (factor 1: what PaSST uses)."""
    if vtln_warp_factor != 1.0:
        raise NotImplementedError("VTLN warping")
    nyquist = 0.5 * sample_freq
    high_freq = high_freq + nyquist if high_freq <= 0 else high_freq
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    i = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left, center, right = mel_low + i * delta, mel_low + (i + 1.0) * delta, mel_low + (i + 2.0) * delta
    freqs = sample_freq / window_length_padded * torch.arange(window_length_padded // 2, dtype=torch.float32)
    mel = (1127.0 * (1.0 + freqs / 700.0).log())[None]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    bins = torch.clamp(torch.minimum(up, down), min=0.0)
    return bins, 700.0 * ((center / 1127.0).exp() - 1.0)


class _TrainingOnly(torch.nn.Module):
    """Stands in for torchaudio's SpecAugment masks, which PaSST applies only in training."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        raise RuntimeError("SpecAugment masking is for training; evaluate.py runs PaSST in eval mode")


def _stand_ins():
    """Modules hear21passt imports that cannot be imported here (see requirements-eval.txt):
    timm (for its download helper only) and torchaudio (Kaldi's mel filterbank, training-time masks)."""
    mods = {}
    try:
        import timm.models._hub  # noqa: F401
    except Exception:
        hub = types.ModuleType("timm.models._hub")

        def download_cached_file(url, *args, **kwargs):
            raise RuntimeError(f"evaluate.py reads PaSST weights from a local file (--passt), not {url}")

        hub.download_cached_file = download_cached_file
        mods.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                     "timm.models._hub": hub})
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
        import torchaudio.transforms  # noqa: F401
    except Exception:  # not installed, or its CUDA-only extension fails to load (OSError)
        names = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi", "torchaudio.transforms")
        ta, compliance, kaldi, transforms = (types.ModuleType(n) for n in names)
        kaldi.get_mel_banks = kaldi_mel_banks
        transforms.FrequencyMasking = transforms.TimeMasking = _TrainingOnly
        ta.compliance, compliance.kaldi, ta.transforms = compliance, kaldi, transforms
        mods.update({"torchaudio": ta, "torchaudio.compliance": compliance, "torchaudio.compliance.kaldi": kaldi,
                     "torchaudio.transforms": transforms})
    return mods


def import_passt():
    """(PaSST, checkpoint_filter_fn, AugmentMelSTFT, PasstBasicWrapper) from hear21passt, with the
    stand-ins in sys.modules only while it is imported."""
    mods = _stand_ins()
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        from hear21passt.models.passt import PaSST, checkpoint_filter_fn
        from hear21passt.models.preprocess import AugmentMelSTFT
        from hear21passt.wrapper import PasstBasicWrapper
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return PaSST, checkpoint_filter_fn, AugmentMelSTFT, PasstBasicWrapper


@contextlib.contextmanager
def _quiet():
    """PaSST prints shapes and warns about its 998-frame input size on every call; hide both."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _real_stft():
    """hear21passt asks torch.stft for return_complex=False (older releases omit the argument, which
    current torch refuses; the real-valued form is deprecated). Compute the complex STFT and return
    it as (..., 2) real/imaginary pairs, the same numbers."""
    stft = torch.stft

    def real_stft(*args, return_complex=None, **kwargs):
        out = stft(*args, return_complex=True, **kwargs)
        return out if return_complex else torch.view_as_real(out)

    torch.stft = real_stft
    try:
        yield
    finally:
        torch.stft = stft


def load_passt(path, device):
    """hear21passt's PaSST tagger (AudioSet, 527 classes), logits mode, in eval mode, with the
    weights file at `path` (passt-s-f128-p16-s10-ap.476-swa.pt, the checkpoint
    hear21passt.base.get_basic_model downloads). The network is built as hear21passt builds
    "passt_s_swa_p16_128_ap476" (16x16 patches, stride 10, 128 mel x 998 frames, distilled), its
    width and depth read from the checkpoint (768, 12 for PaSST-S; heads = width / 64); the mel
    front end has get_basic_model's settings."""
    if not os.path.isfile(path):
        fail(f"--passt {path}: no such weights file (fetch passt-s-f128-p16-s10-ap.476-swa.pt; see README, Evaluation)")
    try:
        PaSST, checkpoint_filter_fn, AugmentMelSTFT, PasstBasicWrapper = import_passt()
    except ImportError as e:
        fail(f"--passt: hear21passt is not installed ({e}); see requirements-eval.txt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # a training checkpoint keeps the weights under "model"
        width = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        with _quiet():
            net = PaSST(img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
                        embed_dim=width, depth=depth, num_heads=max(1, width // 64), distilled=True)
            net.load_state_dict(checkpoint_filter_fn(state, net))
    except Exception as e:
        fail(f"--passt {path}: not PaSST weights ({datamod.first_line(e)[:200]})")
    with _quiet():
        mel = AugmentMelSTFT(n_mels=128, sr=PASST_SR, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
    return PasstBasicWrapper(mel=mel, net=net, mode="logits").eval().to(device)


@torch.no_grad()
def passt_probabilities(model, audio, device):
    """Mono audio at 32 kHz (n,) -> tag probabilities (527,) float64: softmax of the logits averaged
    over the windows of passt_windows; None when the clip has no window (1.5 s or less)."""
    windows = passt_windows(audio)
    if len(windows) == 0:
        return None
    with _quiet(), _real_stft():
        logits = model(torch.from_numpy(windows).to(device))
    return torch.softmax(logits.double().mean(0), dim=-1).cpu()


# ------------------------------------------------------------------------------------------------
# CLAP (transformers.ClapModel)


def load_clap(name, device):
    """(ClapModel, its feature extractor, its tokenizer) from a local folder or a hub name already in
    the Hugging Face cache (local_files_only: the hub is never reached, nothing is downloaded)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel
    datamod.check_model_folder(name, ClapModel.config_class.model_type, "the CLAP model", "--clap")
    try:
        # local_files_only: a name must be in the cache already; nothing is downloaded here
        model = ClapModel.from_pretrained(name, local_files_only=True)
        extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:
        where = "folder" if os.path.isdir(name) else "name (not a local folder, not in the Hugging Face cache)"
        fail(f"--clap {name}: cannot load a CLAP model from this {where}: {datamod.first_line(e)[:160]}")
    return model.eval().to(device), extractor, tokenizer


def _pooled(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 4 returns the tensor, 5 an output


@torch.no_grad()
def clap_text_embeddings(model, tokenizer, prompts, device, batch_size=64):
    """list of N prompts -> (N, P) text embeddings (the text projection, unit length)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=CLAP_MAX_TOKENS,
                        return_tensors="pt").to(device)
        out.append(_pooled(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])))
    return F.normalize(torch.cat(out).double().cpu(), dim=-1)


def clap_audio_input(extractor, audio):
    """Mono audio at the extractor's rate (n,) -> the feature extractor's tensors for one clip,
    after LAION's int16 rounding. A clip longer than the extractor's window is cropped (rand_trunc)
    or fused from random crops (fusion) by the extractor, with numpy's global RNG."""
    audio = (np.clip(audio, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
    return extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")


@torch.no_grad()
def clap_audio_embedding(model, extractor, audio, device):
    """One clip (n,) -> (P,) audio embedding (the audio projection, unit length). One clip per call,
    as stable-audio-metrics: the extractor's fusion flag depends on the batch."""
    inputs = clap_audio_input(extractor, audio)
    kwargs = {"input_features": inputs["input_features"].to(device)}
    if "is_longer" in inputs:
        kwargs["is_longer"] = inputs["is_longer"].to(device)
    return F.normalize(_pooled(model.get_audio_features(**kwargs)).double().cpu()[0], dim=-1)


# ------------------------------------------------------------------------------------------------
# Each file's model output, kept between runs (--cache)


def weights_digest(model):
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): the weights' identity,
    wherever they were loaded from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# What a cached output must be besides its shape (ResultCache.read's valid): an entry that loads with the
# right shape but other values (another program's .npz under its name) gave NaN (a negative "probability":
# the report's json.dumps raised ValueError), or a KL or cosine of 0 from zeros, without a word.

def is_distribution(p):
    """Whether p holds probabilities, none negative and summing to 1, as passt_probabilities' softmax does."""
    return bool((p >= 0).all() and abs(p.sum() - 1) < 1e-6)


def is_unit(v):
    """Whether v has length 1, as an embedding of clap_audio_embedding (normalised) has."""
    return bool(abs(np.linalg.norm(v) - 1) < 1e-6)


class ResultCache:
    """One model's output per audio file, in folder/<metric>/ (None: no cache, every file computed).

    An entry's name is the SHA-256 of the file's bytes together with the model's weights_digest,
    the settings that shape the output (rates, windows, peak level, the CLAP extractor's config)
    and the device type (a GPU rounds otherwise than a CPU): a changed file, other weights or other
    settings never read an old entry. An entry is an .npz (the output, and the file's length in
    samples at the model's rate), written to a temporary file and renamed, so that a run stopped at
    any point leaves whole entries only, and two runs sharing the folder at once do not mix theirs.
    An entry that does not load is computed again (a note says so). ResultCache(): no folder."""

    def __init__(self, folder=None, metric="", model=None, settings=None, device="cpu"):
        self.folder = folder and os.path.join(folder, metric)
        self.read_count, self.unwritable = 0, False
        if folder:
            identity = {"metric": metric, "weights": weights_digest(model), "settings": settings,
                        "device": torch.device(device).type}
            self.prefix = json.dumps(identity, sort_keys=True).encode()
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self, age_s=3600):
        """Remove the temporary files of writes that a kill stopped (older than age_s; a write in flight
        in another run sharing the folder takes milliseconds)."""
        for name in glob.glob(os.path.join(glob.escape(self.folder), "*", "*.tmp")):
            with contextlib.suppress(OSError):  # (gone meanwhile, a read-only folder)
                if time.time() - os.path.getmtime(name) > age_s:
                    os.remove(name)

    def entry(self, path):
        """The entry's path for the audio file at `path`, or None without a folder."""
        if not self.folder:
            return None
        h = hashlib.sha256(self.prefix)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        key = h.hexdigest()
        return os.path.join(self.folder, key[:2], key + ".npz")

    def read(self, entry, valid=lambda output, samples: True):
        """(output array, samples) kept at entry, or None: also, with a note, for an entry that does not
        load, whose length is not 1 sample or more (load_mono's), or whose output is not finite floats
        that valid(output, samples) takes (of another shape, or not the shape of a clip of that length)."""
        if entry is None or not os.path.exists(entry):
            return None
        try:
            with np.load(entry) as z:
                output, samples = z["output"], int(z["samples"])
            problem = (None if samples > 0 and output.dtype.kind == "f" and np.isfinite(output).all()
                       and valid(output, samples)
                       else f"not this metric's output: {output.dtype} {output.shape} for {samples} samples")
        except OSError as e:
            problem = datamod.first_line(e)[:100]
        except Exception:  # np.load's errors are of many kinds (zip, pickle, a key missing); none says more
            problem = "not an .npz of an output and its length"
        if problem:
            note(f"{entry}: a damaged cache entry ({problem}); computing it again")
            return None
        self.read_count += 1
        return output, samples

    def output(self, path, compute, valid, keep=lambda samples: True):
        """(output array, samples) of the audio file at path: its entry's if there is a valid one (read),
        else compute(path)'s, kept if keep(samples)."""
        entry = self.entry(path)
        found = self.read(entry, valid)
        if found is None:
            found = compute(path)
            if keep(found[1]):
                self.write(entry, *found)
        return found

    def write(self, entry, output, samples):
        """Keep output (an array) and the file's length in samples at entry (nothing without a folder).
        A folder that takes no more files (read-only, a full disk) ends the keeping with a note: the run
        goes on, reading what the folder holds and computing the rest."""
        if entry is None or self.unwritable:
            return
        tmp = None
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(entry), suffix=".tmp", delete=False) as f:
                tmp = f.name
                np.savez(f, output=output, samples=samples)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, entry)
        except BaseException as e:
            if tmp:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            if not isinstance(e, OSError):
                raise
            self.unwritable = True
            note(f"--cache: cannot keep {entry} ({e.strerror or datamod.first_line(e)}); "
                 "this run keeps no more outputs")


# ------------------------------------------------------------------------------------------------
# The evaluation command


def check_inputs(args):
    """Everything evaluate() reads, checked before any model loads (one line, exit 2 on a problem):
    the metrics, the generated and reference files by name, the prompts, the weights files."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics or set(metrics) - {"fd", "kl", "clap"}:
        fail(f"--metrics {args.metrics}: choose from fd, kl, clap (comma-separated)")
    generated = list_audio(args.generated, "--generated")
    reference = list_audio(args.reference, "--reference")
    unpaired = [name for name in generated if name not in reference]
    if unpaired and "kl" in metrics:
        fail(f"--reference {args.reference}: no file named like {len(unpaired)} generated file(s), "
             f"e.g. {os.path.basename(generated[unpaired[0]])} (KL pairs files by name)")
    prompts = {}
    if "clap" in metrics:
        if not args.prompts:
            fail("--prompts FILE is needed for the CLAP score (or leave it out: --metrics fd,kl)")
        prompts = read_prompts(args.prompts)
        missing = [name for name in generated if name not in prompts]
        if missing:
            fail(f"--prompts {args.prompts}: no prompt for {len(missing)} generated file(s), e.g. id {missing[0]}")
        problem = datamod.model_folder_problem(args.clap, "clap", "--clap")
        if problem:
            fail(f"--clap {args.clap}: {problem}")
    for flag, path, metric in (("--openl3", args.openl3, "fd"), ("--passt", args.passt, "kl")):
        if metric in metrics and not os.path.isfile(path):
            fail(f"{flag} {path}: no such weights file (see README, Evaluation, for where to fetch it)")
    extra = [name for name in reference if name not in generated]
    if extra:
        note(f"{len(extra)} reference file(s) have no generated file of the same name: "
             + ("used for FD only" if "fd" in metrics else "not used"))
    return metrics, generated, reference, prompts


def check_output_file(path, flag="--out", keys=()):
    """path, once it is known that a report can be written there: its folder exists and takes new
    files, it is not a folder itself, and it is new or a report of this kind (a JSON object with keys,
    which a rerun replaces); else one line naming it, before any work: a file of anything else is kept."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder; give the report's file name")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = datamod.parse_json(f.read())
        except (OSError, ValueError):
            old = None
        if not (isinstance(old, dict) and set(keys) <= set(old)):
            fail(f"{flag} {path}: exists and is not a report of evaluate.py; give a new file name")
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: cannot write in {folder}")
    return path


def fd_openl3(model, generated, reference, args, device, report, cache=None):
    """FD between the OpenL3 frame embeddings of the two sets (all files of each)."""
    cache = ResultCache() if cache is None else cache

    def compute(path):
        audio = load_mono(path, OPENL3_SR, peak_first=True)  # stable-audio-metrics: peak, then resample
        return openl3_embeddings(model, audio, device), len(audio)

    width = getattr(model, "embedding_size", None)  # PytorchOpenl3's (512); a stand-in without one: any width

    def valid(output, samples):  # the model's width, and the frames torchopenl3 cuts a clip of that length into
        return output.ndim == 2 and output.shape == (openl3_frame_count(samples), width or output.shape[1])

    stats, short = {}, []
    for side, files in (("generated", generated), ("reference", reference)):
        emb = []
        for name, path in progress(files.items(), f"OpenL3 {side}"):
            frames, samples = cache.output(path, compute, valid)
            if samples < OPENL3_SR:
                short.append(f"{side}/{os.path.basename(path)}")
            emb.append(frames)
        emb = np.concatenate(emb)
        if len(emb) < 2:
            fail(f"--{side} {args.generated if side == 'generated' else args.reference}: one OpenL3 frame in all "
                 f"(a clip under 1 s); a covariance needs at least 2")
        report["counts"][f"openl3_frames_{side}"] = len(emb)
        stats[side] = gaussian_stats(emb)
    if short:
        note(f"{len(short)} clip(s) shorter than OpenL3's 1 s window, zero-padded: {', '.join(short[:5])}")
    report["short_clips"]["openl3"] = short
    report["fd_openl3"] = frechet_distance(*stats["generated"], *stats["reference"])


def kl_passt(model, generated, reference, device, report, cache=None):
    """KL(reference || generated) of PaSST's tag distributions, per pair of files, averaged."""
    cache = ResultCache() if cache is None else cache

    def compute(path):  # None, a clip without a window, is kept as an empty array
        audio = load_mono(path, PASST_SR)
        p = passt_probabilities(model, audio, device)
        return (np.zeros(0) if p is None else p.numpy()), len(audio)

    def valid(output, samples):  # the 527 tags' distribution for a clip with a window, (0,) for one without
        return ((output.shape == (527,) and is_distribution(output)) if passt_has_window(samples)
                else output.shape == (0,))

    def probabilities(path):  # (527,) float64, or None for a clip without a window
        p = cache.output(path, compute, valid)[0]
        return torch.from_numpy(p) if p.size else None

    kl, kl_back, skipped = [], [], []
    for name in progress(list(generated), "PaSST pairs"):
        p_gen, p_ref = probabilities(generated[name]), probabilities(reference[name])
        if p_gen is None or p_ref is None:
            skipped.append(name)
            continue
        kl.append(float(kl_divergence(p_ref, p_gen)))
        kl_back.append(float(kl_divergence(p_gen, p_ref)))
        report["per_file"][name]["kl_passt"] = kl[-1]
    if skipped:
        note(f"{len(skipped)} pair(s) left out of KL, a clip of 1.5 s or less (PaSST window 10 s): "
             f"{', '.join(skipped[:5])}")
    report["short_clips"]["passt"] = skipped
    report["counts"]["kl_pairs"] = len(kl)
    report["kl_passt"] = float(np.mean(kl)) if kl else None
    report["kl_passt_gen_ref"] = float(np.mean(kl_back)) if kl else None


def clap_score(clap, generated, prompts, args, device, report, cache=None):
    """The cosine of each generated file's CLAP audio embedding with its prompt's, averaged. A clip
    longer than the extractor's window is never taken from the cache: its crops come from numpy's RNG,
    carried from one long clip to the next, so each run draws them all again in the same order."""
    model, extractor, tokenizer = clap
    cache = ResultCache() if cache is None else cache
    names = list(generated)
    text = clap_text_embeddings(model, tokenizer, [prompts[n] for n in names], device)
    window = getattr(extractor, "nb_max_samples", None)

    def longer_than_window(samples):  # cropped at random: its crops depend on the long clips before it
        return bool(window) and samples > window

    def compute(path):
        audio = load_mono(path, extractor.sampling_rate)
        return clap_audio_embedding(model, extractor, audio, device).numpy(), len(audio)

    def valid(output, samples):  # the projection's width; never a clip longer than the window (keep refuses it)
        return output.shape == text.shape[1:] and is_unit(output) and not longer_than_window(samples)

    np.random.seed(args.seed)  # the extractor's crops of clips longer than its window
    scores, longer = [], []
    for i, name in enumerate(progress(names, "CLAP")):
        embedding, samples = cache.output(generated[name], compute, valid,
                                          keep=lambda samples: not longer_than_window(samples))
        if longer_than_window(samples):  # (never read from the cache: computed, with its crops, in this run)
            longer.append(name)
        scores.append(float(cosine(torch.from_numpy(embedding)[None], text[i][None])[0]))
        report["per_file"][name]["clap"] = scores[-1]
    if longer:
        note(f"{len(longer)} clip(s) longer than CLAP's {window / extractor.sampling_rate:g} s window, "
             f"{extractor.truncation} (seed {args.seed}): {datamod.some(longer)}")
    report["counts"]["clap_clips"] = len(scores)
    report["clap_score"] = float(np.mean(scores))


def evaluate(args):
    """--generated/--reference: the three metrics into a JSON report and a table."""
    metrics, generated, reference, prompts = check_inputs(args)
    out_path = check_output_file(args.out or os.path.join(args.generated, "evaluation.json"),
                                 keys=("generated", "reference", "settings"))
    if args.cache:
        try:
            os.makedirs(args.cache, exist_ok=True)
        except OSError as e:
            fail(f"--cache {args.cache}: cannot make this folder ({e.strerror or datamod.first_line(e)})")
    device = datamod.resolve_device(args.device)
    # every model now, so that a bad weights file or CLAP name stops the run before any audio is read
    openl3 = load_openl3(args.openl3, device) if "fd" in metrics else None
    passt = load_passt(args.passt, device) if "kl" in metrics else None
    clap = load_clap(args.clap, device) if "clap" in metrics else None
    report = {"generated": os.path.abspath(args.generated), "reference": os.path.abspath(args.reference),
              "counts": {"generated": len(generated), "reference": len(reference)}, "short_clips": {},
              "per_file": {name: {} for name in generated}}
    caches = {}

    def cache(metric, model, settings):  # settings: a function, called only with a --cache folder
        caches[metric] = (ResultCache(args.cache, metric, model, {**settings(), "peak_dbfs": PEAK_DB}, device)
                          if args.cache else ResultCache())
        return caches[metric]

    if "fd" in metrics:
        fd_openl3(openl3, generated, reference, args, device, report,
                  cache("openl3", openl3, lambda: {"sr": OPENL3_SR, "hop_s": OPENL3_HOP_S,
                                                    "peak": "before_resampling"}))
    if "kl" in metrics:
        kl_passt(passt, generated, reference, device, report,
                 cache("passt", passt, lambda: {"sr": PASST_SR, "window_s": PASST_WINDOW_S, "hop_s": PASST_HOP_S,
                                                "min_window": PASST_MIN_WINDOW}))
    if "clap" in metrics:
        clap_score(clap, generated, prompts, args, device, report,
                   cache("clap", clap[0], lambda: {"extractor": clap[1].to_json_string()}))
    if args.cache:
        report["counts"]["from_cache"] = {name: cache.read_count for name, cache in caches.items()}
        note(f"--cache {args.cache}: outputs read from it, not computed: "
             + ", ".join(f"{name} {n}" for name, n in report["counts"]["from_cache"].items()))
    report["settings"] = {"metrics": metrics, "openl3": args.openl3 if "fd" in metrics else None,
                          "passt": args.passt if "kl" in metrics else None,
                          "clap": args.clap if "clap" in metrics else None,
                          "prompts": args.prompts, "seed": args.seed, "device": device, "cache": args.cache,
                          "openl3_sr": OPENL3_SR, "openl3_hop_s": OPENL3_HOP_S, "passt_sr": PASST_SR,
                          "passt_window_s": PASST_WINDOW_S, "passt_hop_s": PASST_HOP_S, "kl_eps": KL_EPS,
                          "peak_dbfs": PEAK_DB}
    atomic_write_text(out_path, json.dumps(report, indent=1, allow_nan=False) + "\n")
    print_table(report)
    print(f"wrote {out_path}")
    return report


def print_table(report):
    c = report["counts"]
    rows = [("metric", "value", "over")]
    if "fd_openl3" in report:
        rows.append(("FD_openl3 (lower is better)", f"{report['fd_openl3']:.4f}",
                     f"{c['generated']} generated files ({c['openl3_frames_generated']} frames) vs "
                     f"{c['reference']} reference files ({c['openl3_frames_reference']} frames)"))
    if "kl_passt" in report:
        kl = report["kl_passt"]
        rows.append(("KL_passt (lower is better)", "n/a" if kl is None else f"{kl:.4f}",
                     f"{c['kl_pairs']} pairs, KL(reference || generated)"
                     + ("" if kl is None else f"; KL(generated || reference) {report['kl_passt_gen_ref']:.4f}")))
    if "clap_score" in report:
        rows.append(("CLAP (higher is better)", f"{report['clap_score']:.4f}",
                     f"{c['clap_clips']} generated files and their prompts"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}")


# ------------------------------------------------------------------------------------------------
# The convergence comparison (paper, Table I and Figure 2 / RQ1, in miniature on the synthetic set)


def read_run(folder):
    """A train.py run folder -> (rows of metrics.csv as dicts of floats, config.json's args, its number
    of processes: 1 for runs saved before train.py kept it). One line naming the file, exit code 2, if
    either file is missing or damaged, or no step was logged."""
    import train
    metrics, config = os.path.join(folder, "metrics.csv"), os.path.join(folder, "config.json")
    if not (os.path.isfile(metrics) and os.path.isfile(config)):
        fail(f"--convergence: {folder} has no finished run (metrics.csv, config.json)")
    rows = [{k: float(v) if v != "" else None for k, v in r.items()} for r in train.read_metrics(metrics, math.inf)]
    if not rows:
        fail(f"--convergence: {metrics} has no logged step")
    try:
        with open(config) as f:
            saved = datamod.parse_json(f.read())
        complete = set(BUDGET) <= set(saved["args"])
        processes = saved.get("processes", 1)  # runs saved before train.py kept it had one
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if not complete:
        fail(f"--convergence: {config}: not a train.py config (with {', '.join(BUDGET)})")
    if type(processes) is not int or processes < 1:
        fail(f"--convergence: {config}: processes {processes!r}, want a whole number of 1 or more")
    return rows, saved["args"], processes


def training_time(rows, args, processes=1):
    """Seconds of training up to each logged step, evaluation excluded: the step time is a step's
    tokens (every micro-batch of every process) over tokens_per_s, which train.py measures over each
    step's time, evaluation after it. processes: config.json's (runs saved before it was kept: 1)."""
    tokens = args["batch_size"] * args["grad_accum"] * processes * args["frames"]
    return np.cumsum([tokens / r["tokens_per_s"] for r in rows])


def convergence(args):
    """--convergence OUT: the four variants' train.py runs with one budget (checked before any trains or
    OUT is made), then the table and the plot; one evaluate.py at a time in OUT (OUT/.lock: two wrote
    the table and the plot at once), one line and exit 2 for a second."""
    out = args.convergence
    argvs = {}
    if not args.plot_only:
        import train
        datamod.check_out_folder(out, "--convergence")
        budget = ["--layers", str(args.layers), "--steps", str(args.steps), "--seed", str(args.seed),
                  "--eval-every", str(args.eval_every), "--log-every", "1"]
        for flag, value in (("--batch-size", args.batch_size), ("--d-model", args.d_model),
                            ("--frames", args.frames)):
            if value is not None:
                budget += [flag, str(value)]
        argvs = {variant: ["--variant", variant, "--out", os.path.join(out, variant)] + budget for variant in VARIANTS}
        for variant, argv in argvs.items():  # every variant's settings, before the first one trains
            # its folder first: train.py's check names --out, a flag not typed to evaluate.py
            datamod.check_out_folder(os.path.join(out, variant), "--convergence")
            train.parse_args(argv, prog="evaluate.py")
        datamod.make_folder(out, "--convergence")
    if not os.path.isdir(out):  # --plot-only of a folder that is not there: train_and_plot says so
        return train_and_plot(args, argvs)
    with datamod.exclusive_lock(os.path.join(out, ".lock"), f"--convergence {out}: another evaluate.py is using "
                                "this folder"):
        return train_and_plot(args, argvs)


def train_and_plot(args, argvs):
    """The runs of argvs (variant -> train.py's arguments) trained, resumed or skipped as done, then
    OUT/convergence.csv, the plot and the summary from every variant's run."""
    out = args.convergence
    if argvs:
        import train
        done = {}  # every variant's earlier run checked before the first one trains
        for variant, argv in argvs.items():
            run = os.path.join(out, variant)
            ckpt = os.path.join(run, "ckpt.pt")
            if os.path.exists(ckpt):  # an earlier invocation: finished (skip) or interrupted (resume)
                saved = train.load_checkpoint(ckpt, keys=("args", "step"))
                want = vars(train.parse_args(argv, prog="evaluate.py")[0])
                if any(saved["args"].get(k) != want[k] for k in BUDGET):
                    fail(f"--convergence {out}: {run} was trained with other settings "
                         f"(choose another folder, or --plot-only to redraw it)")
                if saved["step"] >= args.steps:
                    done[variant] = saved["step"]
                    continue
                argv.append("--resume")
        for variant, argv in argvs.items():
            if variant in done:
                print(f"== {variant}: done earlier ({done[variant]} steps)")
                continue
            # the whole command, as the shell reads it back: without --variant it trained the default variant
            print(f"== {variant}: train.py {shlex.join(argv)}")
            # its errors are its own one line and exit code (2; 130 on Ctrl-C, naming this command to go on)
            train.main(argv, resume_with="the same evaluate.py --convergence command", prog="evaluate.py")

    table = []
    runs = {variant: read_run(os.path.join(out, variant)) for variant in VARIANTS}
    for variant, (rows, run_args, processes) in runs.items():
        n_params = None
        ckpt = os.path.join(out, variant, "ckpt.pt")
        if os.path.exists(ckpt):
            import train
            state = train.load_checkpoint(ckpt, keys=("model",))["model"]
            n_params = sum(v.numel() for v in state.values())
        for r, t in zip(rows, training_time(rows, run_args, processes)):
            table.append({"variant": variant, "params": n_params, "step": int(r["step"]), "loss": r["loss"],
                          "caption_score": r["caption_score"], "train_time_s": round(float(t), 2),
                          "elapsed_s": r["elapsed_s"], "tokens_per_s": r["tokens_per_s"]})
    budgets = {json.dumps({k: run_args[k] for k in BUDGET}, sort_keys=True) for _, run_args, _ in runs.values()}
    if len(budgets) != 1:
        fail(f"--convergence {out}: the four runs were not trained with the same budget")
    budget_args = json.loads(budgets.pop())

    csv_path = os.path.join(out, "convergence.csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(table[0]), lineterminator="\n")
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in table)
    atomic_write_text(csv_path, buf.getvalue())
    png_path = os.path.join(out, "convergence.png")
    plot_convergence(table, budget_args, png_path)
    for variant in VARIANTS:
        rows = [r for r in table if r["variant"] == variant]
        scores = [r for r in rows if r["caption_score"] is not None]
        tail = rows[-min(20, len(rows)):]
        curve = " ".join(f"{r['caption_score']:.2f}" for r in scores)
        print(f"{variant:<18} loss (mean of the last {len(tail)} steps) {np.mean([r['loss'] for r in tail]):.3f}  "
              f"caption score {curve}  "
              f"training {rows[-1]['train_time_s']:.0f} s")
    print(f"wrote {csv_path} and {png_path}")
    return table


def plot_convergence(table, budget, path, smooth=10):
    """2 x 2 figure: loss (running mean over `smooth` steps) and caption score, against the step and
    against the training time. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, variant in enumerate(VARIANTS):
        rows = [r for r in table if r["variant"] == variant]
        params = rows[0]["params"]
        label = variant.replace("_", " ") + (f" ({params / 1e6:.2f} M)" if params else "")
        loss = np.array([r["loss"] for r in rows])
        k = min(smooth, len(loss))
        mean = np.convolve(loss, np.ones(k) / k, mode="valid")
        scored = [r for r in rows if r["caption_score"] is not None]
        for col, x in ((0, "step"), (1, "train_time_s")):
            xs = np.array([r[x] for r in rows])
            axes[0, col].plot(xs[k - 1:], mean, color=f"C{i}", label=label)
            axes[1, col].plot([r[x] for r in scored], [r["caption_score"] for r in scored], "o-", color=f"C{i}",
                              label=label)
    for col, xlabel in ((0, "training step"), (1, "training time (s, evaluation excluded)")):
        axes[0, col].set(xlabel=xlabel, ylabel=f"loss (mean of {smooth} steps)")
        axes[1, col].set(xlabel=xlabel, ylabel="caption score of samples")
        axes[1, col].axhline(0.26, color="gray", ls=":", lw=1, label="chance (random codes)")  # K = 1
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(f"The four LM variants with one budget, synthetic set: {budget['layers']} blocks, "
                 f"d_model {budget['d_model']}, batch {budget['batch_size']} x {budget['frames']} frames, "
                 f"lr {budget['lr']:g}, seed {budget['seed']}", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    datamod.atomic_write_bytes(path, png.getvalue())


# ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


# ------------------------------------------------------------------------------------------------
# Past the training length (README, "Longer than the training length"), on the synthetic set


class StateNorms:
    """A generate() decoder: the plain loop of TextToMusicLM.generate, one step at a time, keeping
    after each step the mean norm ||h_t|| of the Mamba-2 states (over layers, rows and heads)."""

    def __init__(self):
        self.norms = []

    @staticmethod
    def new_cache(*args):
        from ssmttm import InferenceCache
        return InferenceCache(*args)

    def prefill(self, model, tokens, text, text_mask, cache):
        return model.logits(tokens, text, text_mask, cache)

    def decode(self, model, cache, steps, fixed, start, copies, sampling, progress=False):
        from ssmttm import Mamba2State, write_step
        for s in range(start, steps.shape[-1]):
            logits = model.step(steps[..., s - 1:s].repeat(copies, 1, 1), cache)
            write_step(steps, fixed, s, sampling(logits[:, :, -1]))
            h = [state.ssm for states in cache.states for state in states if isinstance(state, Mamba2State)]
            self.norms.append(float(np.mean([x.norm(dim=(-2, -1)).mean().item() for x in h])) if h else 0.0)


def window_scores(model, captions, frames, times, seed, windows):
    """Caption scores (prompts, times) of codes of times x frames, scored `frames` at a time, and
    the state norm after the step that writes each window's last frame (one pass only).
    windows: generate_in_windows, or one pass."""
    from ssmttm import generate_in_windows
    text, mask = datamod.WordEncoder()(captions)
    sampling = dict(cfg_scale=3.0, top_k=50, temperature=0.3, generator=torch.Generator().manual_seed(seed))
    probe = StateNorms()
    if windows:
        codes = generate_in_windows(model, text, mask, times * frames, frames, **sampling)
    else:
        codes = model.generate(text, mask, times * frames, decoder=probe, **sampling)
    scores = [[datamod.caption_score(c[:, w * frames:(w + 1) * frames], caption) for w in range(times)]
              for c, caption in zip(codes.cpu().numpy(), captions)]
    # probe.norms[j] follows loop step j + 1. In the delay pattern step s writes codebook k of frame
    # s - k, so a window's last frame, (w + 1) frames - 1, is whole after step (w + 1) frames + K - 2
    K = model.cfg.n_codebooks
    norms = [probe.norms[(w + 1) * frames + K - 3] for w in range(times)] if probe.norms else None
    return np.array(scores), norms


def past_training_length(args):
    """--long CKPT: a synthetic-set checkpoint trained on F frames generates --times x F frames for
    --n-prompts held-out captions and --seeds seeds, in one recurrent pass and in windows of F
    (generate_in_windows); the caption score per window of F frames, and the state norm."""
    import generate as genmod
    from ssmttm import ModelConfig, TextToMusicLM
    ckpt = genmod.read_checkpoint(args.long, "stage1", hint=False)
    if ckpt["text_encoder"]["kind"] != "words":
        fail(f"--long {args.long}: not trained on the synthetic set (its captions are what is scored)")
    frames, K = ckpt["args"]["frames"], ckpt["config"]["n_codebooks"]
    if frames < genmod.min_window(K):
        fail(f"--long {args.long}: trained on {datamod.plural(frames, 'frame')}; a window needs at least "
             f"{genmod.min_window(K)} with K = {K}")
    out = check_output_file(args.out or os.path.join(os.path.dirname(args.long) or ".", "long.json"),
                            keys=("ckpt", "one_pass", "windows"))
    model = genmod.build_model(ckpt, args.long, ModelConfig, TextToMusicLM)
    captions = datamod.SyntheticMusic(frames, seed=0).captions(args.n_prompts)
    report = {"ckpt": args.long, "step": ckpt["step"], "trained_frames": frames, "times": args.times,
              "prompts": args.n_prompts, "seeds": args.seeds,
              "sampling": {"cfg_scale": 3.0, "top_k": 50, "temperature": 0.3}}
    for name, windows in (("one_pass", False), ("windows", True)):
        runs = [window_scores(model, captions, frames, args.times, seed, windows)
                for seed in progress(range(args.seeds), name, unit="seed")]
        scores = np.concatenate([r[0] for r in runs])
        report[name] = {"mean": scores.mean(0).round(4).tolist(), "std": scores.std(0).round(4).tolist()}
        if not windows:
            report[name]["state_norm"] = np.mean([r[1] for r in runs], 0).round(3).tolist()
    print(f"\n{args.long} (step {ckpt['step']}), trained on {frames} frames: caption score per window of "
          f"{frames} frames ({args.n_prompts} prompts x {args.seeds} seeds, mean ± std)\n")
    print("| frames | one pass | state norm | in windows |\n|---|---|---|---|")
    one, win = report["one_pass"], report["windows"]
    for w in range(args.times):
        print(f"| {w * frames}-{(w + 1) * frames} | {one['mean'][w]:.3f} ± {one['std'][w]:.3f} | "
              f"{one['state_norm'][w]:.2f} | {win['mean'][w]:.3f} ± {win['std'][w]:.3f} |")
    atomic_write_text(out, json.dumps(report, indent=1, allow_nan=False))
    print(f"\nwrote {out}")
    return report


def parse_args(argv=None):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", type=datamod.path_name, help="folder of generated audio files (wav, flac, ogg, mp3)")
    ap.add_argument("--reference", type=datamod.path_name,
                    help="folder of reference audio; KL pairs files by name (without extension)")
    ap.add_argument("--prompts", type=datamod.path_name,
                    help="JSONL or CSV: an id (file name without extension) and its prompt, for CLAP")
    ap.add_argument("--metrics", default="fd,kl,clap", help="which of fd, kl, clap (default: all three)")
    ap.add_argument("--openl3", default=DEFAULT_OPENL3, type=datamod.path_name,
                    help="torchopenl3 weights file (mel256, music, 512)")
    ap.add_argument("--passt", default=DEFAULT_PASST, type=datamod.path_name,
                    help="PaSST weights file (AudioSet, passt-s ... ap.476-swa)")
    ap.add_argument("--clap", default=DEFAULT_CLAP, type=datamod.path_name,
                    help="CLAP model: local folder or name in the Hugging Face cache")
    ap.add_argument("--out", type=datamod.path_name, help="JSON report (default: GENERATED/evaluation.json)")
    ap.add_argument("--device", type=datamod.device_name, default="auto",
                    help="auto (cuda when available), cpu, cuda or cuda:N")
    ap.add_argument("--seed", type=datamod.SEED, default=0,
                    help="numpy seed for CLAP's crops of long clips; training seed")
    ap.add_argument("--cache", metavar="DIR", type=datamod.path_name,
                    help="keep each file's model output in DIR: a rerun (after a stop, or of another generated set "
                    "against the same reference) reads it instead of running the model again")
    conv = ap.add_argument_group("convergence comparison (paper, Figure 2 / RQ1, in miniature)")
    conv.add_argument("--convergence", metavar="OUT", type=datamod.path_name,
                      help="train the four variants into OUT/<variant>, plot OUT/convergence.png")
    conv.add_argument("--layers", type=int, default=2, help="LM blocks per variant")
    conv.add_argument("--steps", type=int, default=300)
    conv.add_argument("--eval-every", type=int, help="steps between caption scores (default: 25, or --steps if fewer)")
    conv.add_argument("--batch-size", type=int, help="default: train.py's synthetic preset (16)")
    conv.add_argument("--d-model", type=int, help="default: train.py's synthetic preset (256)")
    conv.add_argument("--frames", type=int, help="default: train.py's synthetic preset (128)")
    conv.add_argument("--plot-only", action="store_true", help="redraw from the runs already in OUT")
    long = ap.add_argument_group("past the training length (on the synthetic set)")
    long.add_argument("--long", metavar="CKPT", type=datamod.path_name,
                      help="caption score in windows of the checkpoint's training length, "
                      "one recurrent pass against generate_in_windows; JSON to --out (default: beside CKPT)")
    long.add_argument("--times", type=datamod.whole_number(1, 1000), default=16,
                      help="generate this many training lengths")
    long.add_argument("--n-prompts", type=datamod.whole_number(1, 10000), default=16, help="held-out captions")
    long.add_argument("--seeds", type=datamod.whole_number(1, 1000), default=2)
    args = ap.parse_args(argv)
    if args.long:
        if args.cache:
            fail("--cache keeps the metrics' model outputs (--generated/--reference); --long takes none")
        if not os.path.isfile(args.long):
            fail(f"--long {args.long}: no such file")
        return args
    if args.convergence:
        if args.generated or args.reference or args.cache:
            fail("--convergence trains and plots; it takes no --generated/--reference/--cache")
        for flag in ("layers", "steps", "eval_every", "batch_size", "d_model", "frames"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                fail(f"--{flag.replace('_', '-')} must be at least 1")
        if args.eval_every is None:  # 25 past --steps scored no step at all, as --eval-every 0 would
            args.eval_every = min(25, args.steps)
        elif args.eval_every > args.steps and not args.plot_only:
            fail(f"--eval-every {args.eval_every}: more than --steps {args.steps}, so no step would be scored; "
                 f"pass at most {args.steps}")
    elif not (args.generated and args.reference):
        fail("give --generated DIR and --reference DIR (or --convergence OUT)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.long:
            return past_training_length(args)
        return convergence(args) if args.convergence else evaluate(args)
    except (MemoryError, RuntimeError) as e:  # the metrics' models on a GPU, long audio, generate_in_windows
        memory = datamod.out_of_memory(e)
        if memory is None:
            raise
        fail(f"out of memory ({memory}); try --device cpu, or fewer or shorter files")


if __name__ == "__main__":
    datamod.run_command(main, "evaluate.py")
