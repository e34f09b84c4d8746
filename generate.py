"""Generate music from text with a trained ssmttm checkpoint.

    python generate.py "a calm piano piece" "an energetic drum and bass track"
    python generate.py --prompts prompts.txt --ckpt runs/stage1-prefix_simba-24L-k1/ckpt.pt \\
        --stage2 runs/stage2/ckpt.pt --seconds 25 --out outputs/

Stage 1 samples codebook 1 (K = 1) or all 9 codebooks (K = 9, delay pattern). With a K = 1
checkpoint, --stage2 fills codebooks 2..9 by diffusion (the paper's two-stage design); without it
codebook 1 is decoded alone (as in the paper's RQ1). Per prompt, OUT gets the codes (.npy), a
44.1 kHz WAV decoded by DAC (peak-normalised to -1 dBFS, never clipped), a mel-spectrogram PNG,
and then a line in OUT/generations.jsonl with the prompt, seed, settings and timings: the commit
point of that prompt. Each prompt has its own seed, --seed + its place in the list, and draws from
its own generator: its draws do not depend on the batch it is in (nor its tokens, but where the
rounding of the logits does: the prefill pads the texts of a batch to one length). Its files are named
s<seed>-<place>-<its first words> (output_name), or by its id when --prompts is an evaluation set
(.jsonl or .csv with ids: the names evaluate.py pairs with the reference files). A rerun of the
same command resumes: prompts already written with the same settings are skipped; a name taken by
a generation with other settings stops the run before any work, naming the file (nothing is ever
overwritten). Text encoder and codec run in fp32, whatever dtype their folders store.

On CUDA the LM decodes in bf16 through fast.py (fused kernels, one CUDA graph per frame; the
Mamba-2 layers on mamba-ssm's kernels when installed); on a CPU, the plain model in fp32.

Checkpoints trained on the synthetic set have no audio behind their tokens: for them the codes are
scored against the caption rules (data.caption_score) instead of decoded.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time
import unicodedata
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data as datamod
import fast
import ssmttm
import stage2
from ssmttm import FRAME_RATE, LAYOUTS, MIN_TEMPERATURE, SPECIAL, ModelConfig, TextToMusicLM, pad_text


MAX_SECONDS = 3600
MAX_CFG = 100  # guidance scales run from 1 to about 10; far past that, cond + scale (cond - uncond) overflows
MAX_ID_BYTES = 200  # an id names its files: <id>.npy and a temporary .<id>.npy.<pid>.tmp within 255 bytes
MIN_SECONDS = math.ceil(0.5 / FRAME_RATE * 1e4) / 1e4  # 0.0059 s, the shortest that rounds to one frame


def prompt_seconds(frames):
    """The shortest --continue-seconds, to 4 decimals, that keeps `frames` whole frames (continue_frames): what a
    record's prompt_seconds says, so that passing it back as --continue-seconds keeps the same prompt (the
    nearest 4 decimals, round(frames / FRAME_RATE, 4), fall up to 2.2 samples short and keep a frame fewer)."""
    seconds = math.ceil((frames * datamod.HOP - 0.5) / datamod.SAMPLE_RATE * 1e4) / 1e4
    while continue_frames(seconds) < frames:  # S * 44100 a hair under a half sample (4.435 s): 1e-4 s more
        seconds = round(seconds + 1e-4, 4)
    return seconds


def continue_frames(seconds):
    """--continue-seconds S -> the whole frames of the last S seconds: round(S * 44100) samples // 512."""
    return round(seconds * datamod.SAMPLE_RATE) // datamod.HOP


# --continue-seconds: the shortest whose round(S * 44100) samples hold one frame (512), 0.0116 s; the parser's least
MIN_AUDIO_SECONDS = prompt_seconds(1)


def _is_control(c):
    """A control character (C0, DEL, C1) or a line or paragraph separator: no part of a file name."""
    import unicodedata
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


def _encodable(text):
    try:
        text.encode()
        return True
    except UnicodeEncodeError:  # a lone surrogate: a command line's byte that is not UTF-8
        return False


def temperature(text):
    """An argparse type: 0 (greedy) or a finite number from ssmttm.MIN_TEMPERATURE on."""
    value = datamod.number(0)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or at least {MIN_TEMPERATURE:g}, not {text!r}")
    return value


def parse_args(argv=None):
    """The settings. A bad value stops here with one line naming it and exit code 2 (data.fail)."""
    ap = datamod.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    guidance = datamod.number(0, MAX_CFG)
    ap.add_argument("prompts", nargs="*", help="text prompts")
    ap.add_argument("--prompts", dest="prompts_file", type=datamod.path_name,
                    help="file of prompts (UTF-8): one per line, or an evaluation set, .jsonl or .csv with an "
                         "id and a text per entry (MusicCaps' csv works as it is): each output is named by its id")
    ap.add_argument("--ckpt", type=datamod.path_name, help="stage-1 checkpoint (default: the newest under runs/)")
    ap.add_argument("--stage2", type=datamod.path_name,
                    help="stage-2 checkpoint: fills codebooks 2..9 of a K = 1 model")
    ap.add_argument("--seconds", type=datamod.number(MIN_SECONDS, MAX_SECONDS), default=10.0,
                    help=f"length of each sample, from one frame ({MIN_SECONDS} s) to an hour")
    ap.add_argument("--out", default="outputs")
    ap.add_argument("--cfg", type=guidance, default=3.0,
                    help="classifier-free guidance scale (stage 1): 1 is the conditional model, 0 the null condition")
    ap.add_argument("--top-k", type=datamod.whole_number(0), default=250, help="0: every code")
    ap.add_argument("--temperature", type=temperature, default=1.2,
                    help=f"0: greedy; else at least {MIN_TEMPERATURE:g}")
    ap.add_argument("--stage2-steps", type=datamod.whole_number(1, 1000), default=100,
                    help="DDPM steps of stage 2 (trained on 100)")
    ap.add_argument("--stage2-cfg", type=guidance, default=3.0)
    ap.add_argument("--seed", type=datamod.SEED, default=0)
    ap.add_argument("--batch-size", type=datamod.positive_int,
                    help="prompts generated at once (default: on CUDA as many as fit, up to 64; on a CPU 16); "
                         "a prompt gets the same music in any batch")
    ap.add_argument("--device", type=datamod.device_name, default="auto", help="auto, cpu, cuda")
    ap.add_argument("--t5", type=datamod.path_name,
                    help="local Flan-T5 folder, instead of the name saved in the checkpoint")
    ap.add_argument("--dac", type=datamod.path_name,
                    help="DAC name or local folder (default: the one the data was encoded with)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode step by step without a CUDA graph")
    ap.add_argument("--continue", dest="continue_from", metavar="FILE", type=datamod.path_name,
                    help="continue this audio (wav, flac, ogg, mp3) or these codes (a .npy written by "
                         "generate.py): the output is the prompt, then new music up to --seconds in all")
    ap.add_argument("--continue-seconds", type=datamod.number(MIN_AUDIO_SECONDS, MAX_SECONDS), metavar="S",
                    help=f"continue from the whole frames of the last S seconds of --continue only, from one frame "
                         f"({MIN_AUDIO_SECONDS} s; default: all of it)")
    ap.add_argument("--window", type=datamod.number(0, MAX_SECONDS), metavar="S",
                    help="past S seconds, generate in windows of S seconds, each re-reading the last S/2 "
                         "(generate_in_windows; default: the length the checkpoint was trained on, at most "
                         f"{datamod.CLIP_SECONDS:g} s, data.py's clip length; 0: one recurrent pass, however long)")
    ap.add_argument("--ssm-state", choices=["fp32", "bf16"], default="fp32",
                    help="how the Mamba-2 states are kept between steps: bf16 decodes faster on a GPU, at a small "
                         "cost in accuracy (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    prompts = [(None, p) for p in args.prompts] + (datamod.read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        ap.error("no prompt given (as arguments or with --prompts FILE)")
    for i, (key, p) in enumerate(prompts, 1):
        if not p.strip():
            ap.error(f"prompt {i} is empty")
        if not _encodable(p):  # a command line's byte that is not UTF-8 (files' texts are checked as read)
            ap.error(f"prompt {i} is not UTF-8 text: {p[:40]!r}")
        if key is not None and (os.sep in key or key.startswith(".") or any(_is_control(c) for c in key)
                                or len(key.encode(errors="replace")) > MAX_ID_BYTES):
            datamod.fail(f"{args.prompts_file}: the id {key[:40]!r}{'...' * (len(key) > 40)} cannot name a file "
                         f"(no {os.sep}, no leading dot, no control characters, at most {MAX_ID_BYTES} bytes of "
                         "UTF-8)")
    args.prompts = [(key, p.strip()) for key, p in prompts]
    last = args.seed + len(prompts) - 1  # each prompt's seed, --seed + its place, is a --seed that gives it again
    if last > datamod.MAX_SEED:
        ap.error(f"argument --seed: {args.seed} + {len(prompts) - 1} (the last of {len(prompts)} prompts' seeds) is "
                 f"past {datamod.MAX_SEED}, which --seed cannot give back; pass --seed "
                 f"{datamod.MAX_SEED - len(prompts) + 1} or less")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        datamod.fail(f"{args.out}: exists and is not a folder")
    datamod.check_out_folder(args.out)  # here, before any model is loaded or any prompt generated
    if args.continue_seconds is not None and args.continue_from is None:
        datamod.fail(f"--continue-seconds {args.continue_seconds:g}: needs --continue FILE")
    problem = args.continue_from and datamod.file_problem(args.continue_from)
    if problem:  # before any model is loaded
        datamod.fail(f"--continue {args.continue_from}: {problem}")
    args.device = datamod.resolve_device(args.device)
    # settings of the records: one local folder, however it is typed, from any working directory
    args.t5, args.dac = (None if v is None else datamod.model_location(v) for v in (args.t5, args.dac))
    return args


def newest_checkpoint(kind="stage1", root="runs"):
    """The newest ROOT/*/ckpt.pt of this kind. One that cannot be read is skipped with a warning, so
    a damaged newer run does not hide an older good one (a dangling link, or a run removed meanwhile, too)."""
    def mtime(path):
        try:
            return os.path.getmtime(path)
        except OSError:  # gone: last, and skipped as not found
            return -math.inf
    for path in sorted(glob.glob(os.path.join(root, "*", "ckpt.pt")), key=mtime, reverse=True):
        try:
            if open_checkpoint(path)["kind"] == kind:
                return path
        except CheckpointError as e:
            print(f"warning: skipped {e}", file=sys.stderr)
    datamod.fail(f"no {kind} checkpoint under {root}/: train one (python train.py --layers 6) or pass --ckpt PATH")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and says why."""


def open_checkpoint(path):
    """torch.load(path) of an ssmttm checkpoint, or CheckpointError."""
    problem = datamod.file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: checkpoint {problem}" if problem == "not found" else f"{path}: {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a cut or damaged file: pickle, zip and torch errors of every kind
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {datamod.first_line(e)})")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("kind"), str) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an ssmttm checkpoint")
    missing = [key for key in CHECKPOINT_KEYS.get(ckpt["kind"], ()) if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: a {ckpt['kind']} checkpoint without {', '.join(missing)}")
    problem = datamod.checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: a damaged {ckpt['kind']} checkpoint: {problem}")
    return ckpt


# What generate.py reads from each kind of checkpoint (train.py writes more)
CHECKPOINT_KEYS = {"stage1": ("config", "step", "text_encoder", "args"), "stage2": ("config", "codec", "text_encoder")}


def build_model(ckpt, path, config_class, model_class):
    """model_class(config_class(**ckpt["config"])) with ckpt["model"]'s weights; one line naming path
    when its config or weights do not fit (a checkpoint edited, or of another version)."""
    try:
        model = model_class(datamod.make_config(config_class, ckpt["config"], path))
    except (TypeError, ValueError, RuntimeError) as e:  # a config the model's layers refuse
        datamod.fail(f"{path}: its config and weights do not make a model ({datamod.first_line(e)[:200]})")
    datamod.load_weights(model, ckpt["model"], path)
    return model


def read_checkpoint(path, kind=None, hint=True):
    """The checkpoint at path, of this kind; else one line naming it, exit code 2 (hint: with where
    generate.py takes a stage-2 one)."""
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        datamod.fail(str(e))
    if kind and ckpt["kind"] != kind:
        datamod.fail(f"{path} is a {ckpt['kind']} checkpoint, not {kind}" +
                     (": pass it with --stage2" if ckpt["kind"] == "stage2" and hint else ""))
    return ckpt


def slug(text, n=6, max_chars=80):
    """The first n words of text, lower case, joined by '-', at most max_chars characters (a file name has at
    most 255 bytes, and a prompt's words may be long)."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:n])[:max_chars].strip("-") or "prompt"


def peak_normalise(audio, peak_db=-1.0):
    peak = np.abs(audio).max()
    return audio if peak == 0 else audio * (10 ** (peak_db / 20) / peak)


def save_mel_png(audio, path, title):
    """Log-mel spectrogram (128 bands, 0-16 kHz), the view of the paper's Figure 3."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers.audio_utils import mel_filter_bank
    n_fft, hop = 2048, 512
    padded = np.pad(audio, (0, max(0, n_fft - len(audio))))  # stft's reflect padding needs n_fft / 2 + 1 samples
    spec = torch.stft(torch.from_numpy(padded), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    spec = spec[:, :len(audio) // hop + 1].abs() ** 2  # the frames of the audio itself
    mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=128, min_frequency=0.0,
                          max_frequency=16000.0, sampling_rate=datamod.SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    db = 10 * np.log10(np.maximum(mel.T @ spec.numpy(), 1e-10))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80,
              extent=[0, len(audio) / datamod.SAMPLE_RATE, 0, 128])
    ax.set(xlabel="time (s)", ylabel="mel band", title=title[:100])
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


@dataclass
class Models:
    """What generation needs, loaded once: the stage-1 LM and its text encoder; stage 2 and its
    text encoder (or None); the codec: DAC, or for synthetic-data checkpoints, which have no audio, the
    synthetic set's random DAC when a stage 2 maps codes to latents with it, else None."""
    lm: TextToMusicLM
    ckpt_path: str
    step: int
    text_encoder: object
    synthetic: bool
    decoder: object = None     # fast.Decoder on CUDA, else None (the plain loop)
    stage2: object = None
    stage2_encoder: object = None
    codec: object = None
    continuation: object = None  # a Continuation (--continue), or None
    window: int = 0              # frames per pass past which generation goes in windows (0: one pass)


def check_model_flags(args, ckpt, ck2):
    """One line, exit code 2, before any work, for --t5 or --dac with checkpoints that would not read
    them (those of the synthetic set encode captions by words, no T5, and have no audio, no DAC), or
    naming a local path that is no folder of that kind of model (datamod.check_model_folder), and for a
    window too short (window_frames)."""
    encoders = [ckpt["text_encoder"]] + ([] if ck2 is None else [ck2["text_encoder"]])
    # (a stage 2 of other data than stage 1's is refused with its own line, in load_models)
    synthetic = ckpt["text_encoder"]["kind"] == "words" and (ck2 is None or ck2["codec"]["kind"] == "synthetic")
    checks = {"t5": ("the T5 text encoder", "T5 text encoder", all(e["kind"] == "words" for e in encoders)),
              "dac": ("DAC", "audio to decode", synthetic)}
    for kind, (what, lacks, unused) in checks.items():
        value, flag = getattr(args, kind), f"--{kind}"
        if value is None:
            continue
        if unused:
            datamod.fail(f"{flag}: {args.ckpt} was trained on the synthetic set, which has no {lacks}; "
                         f"leave {flag} out")
        datamod.check_model_folder(value, kind, what, flag)
    K = n_codebooks_of(ckpt)
    if K is not None:  # (else build_model names the config)
        window_frames(args, ckpt, K)  # the window, before any model is loaded (load_models takes it again)
    if ck2 is not None:
        check_stages(args, ckpt, ck2, K)


def n_codebooks_of(ckpt):
    """The K of the stage-1 checkpoint ckpt's config, or None where its config does not say one (build_model
    then names the config)."""
    config = ckpt["config"]
    K = config.get("n_codebooks", ModelConfig.n_codebooks) if isinstance(config, dict) else None
    return K if isinstance(K, int) and not isinstance(K, bool) and K >= 1 else None


def check_stages(args, ckpt, ck2, n_codebooks):
    """One line, exit code 2, before any model is loaded, for a stage 2 (ck2, from args.stage2) that cannot
    finish the stage-1 checkpoint ckpt (from args.ckpt) of n_codebooks (None: unknown, build_model says so):
    one that already makes all the codebooks, or one trained on other data."""
    if n_codebooks is not None and n_codebooks != 1:
        datamod.fail(f"--stage2 fills codebooks 2..9 of a K = 1 model; {args.ckpt} already makes all "
                     f"{n_codebooks}")
    codes_kind = "synthetic" if ckpt["text_encoder"]["kind"] == "words" else "dac"  # what stage 1 makes
    if ck2["codec"]["kind"] != codes_kind:
        datamod.fail(f"--stage2 {args.stage2}: trained on {ck2['codec']['kind']} codes, but {args.ckpt} makes "
                     f"{codes_kind} codes; both stages must come from the same data")


def window_frames(args, ckpt, n_codebooks):
    """The frames of a window of generate_in_windows (0: one pass) for the stage-1 checkpoint ckpt (read from
    args.ckpt) of n_codebooks: --window S, or by default the length it was trained on, at most data.py's
    clip length. One line, exit code 2, for a window shorter than min_window: a --window S under it, or a
    checkpoint trained on fewer frames than that and --seconds longer than its length."""
    trained = ckpt["args"].get("frames")  # the sequence length it was trained on
    window = round(args.window * FRAME_RATE) if args.window is not None else min(trained or 0, datamod.CLIP_FRAMES)
    least = min_window(n_codebooks)
    if args.window and window < least:  # 0 < S < half a frame rounds to 0 frames: refused, not one pass
        datamod.fail(f"--window {args.window:g}: {window} frame(s); a window needs at least {least} "
                     f"frames with K = {n_codebooks} (or 0: one pass)")
    if 0 < window < least and round(args.seconds * FRAME_RATE) > window:  # the default: windows past training
        datamod.fail(f"{args.ckpt}: trained on {datamod.plural(window, 'frame')}, fewer than the {least} that a "
                     f"window needs with K = {n_codebooks}, and {args.seconds:g} s is longer; pass --window 0 (one "
                     f"recurrent pass) or --window {math.ceil(least / FRAME_RATE * 100) / 100:g} or more")
    return window


def min_window(n_codebooks):
    """The fewest frames a window of generate_in_windows may hold here: each pass re-reads half a window
    and must still add frames past the delay pattern's K - 1 (with K = 1, a decoding step past the
    prefill's frame). generate.py's --window and evaluate.py --long hold to it."""
    return 2 * n_codebooks


def load_models(args, device, ckpt, ck2=None):
    """The models of the stage-1 checkpoint ckpt (read from args.ckpt), the stage-2 one ck2 (from
    args.stage2) and the codec. On CUDA the LM runs in bf16 on the kernels (fast.py) when they are
    installed; on a CPU, plain, in fp32."""
    ckpt_path = args.ckpt
    lm = build_model(ckpt, ckpt_path, ModelConfig, TextToMusicLM)
    cfg = lm.cfg
    lm = fast.for_inference(lm.to(device), torch.bfloat16 if device == "cuda" else torch.float32)
    text_encoder = datamod.load_text_encoder(ckpt["text_encoder"], device, args.t5, cfg.d_text)
    m = Models(lm, ckpt_path, ckpt["step"], text_encoder,
               synthetic=ckpt["text_encoder"]["kind"] == "words")
    m.window = window_frames(args, ckpt, cfg.n_codebooks)
    if device == "cuda":
        if fast.available():
            fast.accelerate(lm)
        graph = "self_attn" not in LAYOUTS[cfg.variant] and not args.no_cuda_graph  # a KV cache grows
        m.decoder = fast.Decoder(fast.FastOptions(cuda_graph=graph))
    if args.stage2:  # (check_stages: a stage 2 that can finish this stage 1)
        m.stage2 = build_model(ck2, args.stage2, stage2.Stage2Config, stage2.Stage2Diffusion)
        m.codec = datamod.load_codec(ck2["codec"], device, args.dac)
        m.stage2 = m.stage2.to(device).eval().attach_codec(m.codec)
        m.stage2_encoder = (m.text_encoder if ck2["text_encoder"] == ckpt["text_encoder"]
                            else datamod.load_text_encoder(ck2["text_encoder"], device, args.t5, m.stage2.cfg.d_text))
    if not m.synthetic and m.codec is None:
        m.codec = datamod.load_dac(args.dac or ckpt["args"].get("dac") or datamod.DEFAULT_DAC, device)
    return m


@dataclass
class Continuation:
    """The prompt of --continue: its codes (n, frames), n = 9, or 1 for a K = 1 LM without stage 2."""
    path: str
    codes: torch.Tensor  # (n, frames) int64, on the device

    @property
    def frames(self):
        return self.codes.shape[-1]

    def prompt(self, b, K):
        """The LM's prompt for b rows: (b, K, frames)."""
        return self.codes[:K].expand(b, -1, -1)

    def known(self, b, n_frames):
        """Stage 2's known codes for b rows: (b, 9, n_frames), the special id after the prompt."""
        return F.pad(self.codes, (0, n_frames - self.frames), value=SPECIAL).expand(b, -1, -1)


def load_continuation(args, m, n_frames, device):
    """--continue FILE -> a Continuation: the codes of its last --continue-seconds (all by default).
    Audio is read as data.py reads it (mono, 44.1 kHz), cut to whole frames from its end and
    DAC-encoded; a .npy of codes (generate.py's) is taken as it is, which continues a generation
    exactly (--continue-seconds keeps the same whole frames of it as of its audio). BadInput (one
    line, exit 2) for a file that cannot be read, audio with a synthetic-data checkpoint, fewer
    codebooks than the output has, a --continue-seconds under one frame, or a prompt longer than
    --seconds."""
    path, flag = args.continue_from, f"--continue {args.continue_from}"
    needed = continuation_rows(m.stage2 is not None, m.lm.cfg.n_codebooks)
    codes = continuation_codes(args, needed, n_frames, m.synthetic, m.ckpt_path)
    if codes is None:  # audio, which DAC encodes
        try:
            audio = datamod.load_audio(path)
        except datamod.AudioError as e:
            datamod.fail(f"{flag}: {e}")
        if args.continue_seconds:
            kept = round(args.continue_seconds * datamod.SAMPLE_RATE)
            if kept < datamod.HOP <= len(audio):  # the file holds a frame; the seconds asked for do not
                under_one_frame(args, kept)
            audio = audio[-kept:]
        audio = audio[len(audio) % datamod.HOP:]  # whole frames, so the prompt ends where the file ends
        if len(audio) == 0:
            datamod.fail(f"{flag}: shorter than one frame ({datamod.HOP} samples)")
        if len(audio) // datamod.HOP > n_frames:  # said before DAC encodes all of it, as after
            too_long(args, len(audio) // datamod.HOP, n_frames)
        codes = torch.from_numpy(datamod.encode_clips(m.codec, [audio], device)[0].astype(np.int64))[:needed]
        if codes.shape[-1] > n_frames:
            too_long(args, codes.shape[-1], n_frames)
    return Continuation(path, codes.to(device))


def continuation_rows(stage2_too, n_codebooks):
    """The codebooks of --continue's prompt: all 9 with a stage 2 or a K = 9 LM, else codebook 1."""
    return 9 if stage2_too or n_codebooks == 9 else 1


def continuation_codes(args, needed, n_frames, synthetic, ckpt_path):
    """What load_continuation decides with no model: a .npy's codes, its first `needed` rows and the whole
    frames of --continue-seconds (BadInput for a file that is not codes, too few codebooks, a
    --continue-seconds under one frame, a prompt longer than --seconds); None for audio, which DAC
    encodes (BadInput with a synthetic-data checkpoint, from ckpt_path). main() calls it before any model
    is loaded, with the checkpoints' settings."""
    path, flag = args.continue_from, f"--continue {args.continue_from}"
    if not path.lower().endswith(".npy"):  # as data.py and evaluate.py tell audio files: C.NPY too
        if synthetic:
            datamod.fail(f"{flag}: {ckpt_path} was trained on the synthetic set, whose tokens are not audio; "
                         f"continue a .npy of its codes instead")
        return None
    codes = read_prompt_codes(path, needed)
    if args.continue_seconds:  # the whole frames of the last S seconds, as for the audio these codes stand for
        kept = round(args.continue_seconds * datamod.SAMPLE_RATE)
        if kept < datamod.HOP:
            under_one_frame(args, kept)
        codes = codes[:, -continue_frames(args.continue_seconds):]
    if codes.shape[-1] > n_frames:
        too_long(args, codes.shape[-1], n_frames)
    return codes


def too_long(args, frames, n_frames):
    """BadInput: --continue's prompt of `frames` frames is longer than the output's n_frames (--seconds)."""
    datamod.fail(f"--continue {args.continue_from}: the prompt lasts {frames / FRAME_RATE:.2f} s ({frames} frames), "
                 f"more than --seconds {args.seconds:g} ({n_frames} frames); --continue-seconds S keeps its end")


def under_one_frame(args, kept):
    """BadInput: --continue-seconds keeps `kept` samples, less than one frame."""
    datamod.fail(f"--continue-seconds {args.continue_seconds:g}: {kept} samples, less than one frame "
                 f"({datamod.HOP} samples) of audio; pass --continue-seconds {MIN_AUDIO_SECONDS:g} or more")


def read_prompt_codes(path, needed):
    """A .npy of codes (n, frames), 0 <= code < 1024 -> its first `needed` rows, int64; BadInput if not."""
    flag = f"--continue {path}"
    try:
        codes = np.load(path)
    except FileNotFoundError:
        datamod.fail(f"{flag}: not found")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # EOFError: an empty file; a damaged zip
        datamod.fail(f"{flag}: not a .npy of codes ({datamod.first_line(e)})")
    if not isinstance(codes, np.ndarray):  # a zip under a .npy name (an .npz, a checkpoint): np.load opens it as one
        codes.close()
        datamod.fail(f"{flag}: not a .npy of codes (a zip archive, as an .npz or a checkpoint is)")
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.size == 0 or codes.min() < 0 or codes.max() >= 1024:
        datamod.fail(f"{flag}: want codes (codebooks, frames) between 0 and 1023, as generate.py writes them; got "
                     f"{codes.dtype} {codes.shape}")
    if codes.shape[0] < needed:
        datamod.fail(f"{flag}: {datamod.plural(codes.shape[0], 'codebook')}; this output has {needed}")
    return torch.from_numpy(codes[:needed].astype(np.int64))


TEXT_MULTIPLE = 32  # with a fast.Decoder, the text padded to a multiple of this many positions (pad_text)


def generate_batch(m, requests, n_frames, args, device):
    """Codes (b, 9 or K, n_frames) for a batch of requests, the audio (b, samples) or None, and the
    seconds each stage took. Each prompt draws from its own generator, seeded with its seed, in both
    stages: its music does not depend on the other prompts of the batch."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timings = {}
    prompts = [r.prompt for r in requests]
    text, mask = m.text_encoder(prompts)
    if m.decoder is not None:
        text, mask = pad_text(text, mask, TEXT_MULTIPLE)
    g = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    cont = m.continuation
    t0 = time.time()
    sampling = dict(cfg_scale=args.cfg, top_k=args.top_k, temperature=args.temperature, generator=g,
                    decoder=m.decoder, progress=True, ssm_dtype=torch.bfloat16 if args.ssm_state == "bf16" else None,
                    prompt=None if cont is None else cont.prompt(len(prompts), m.lm.cfg.n_codebooks))
    if m.window:
        codes = ssmttm.generate_in_windows(m.lm, text, mask, n_frames, m.window, **sampling)
    else:
        codes = m.lm.generate(text, mask, n_frames, **sampling)
    sync()
    timings["stage1_s"] = time.time() - t0
    if m.stage2 is not None:
        t0 = time.time()
        text2, mask2 = m.stage2_encoder(prompts)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            codes = m.stage2.generate(codes[:, 0], text2, mask2, steps=args.stage2_steps, cfg_scale=args.stage2_cfg,
                                      generator=g, progress=True,
                                      known=None if cont is None else cont.known(len(prompts), n_frames))
        sync()
        timings["stage2_s"] = time.time() - t0
    audio = None
    if not m.synthetic:  # one clip at a time: DAC's decoder needs far more memory per clip than the LM
        t0 = time.time()
        with torch.no_grad():
            audio = [m.codec.decode(audio_codes=c[None]).audio_values[0].float().cpu().numpy() for c in codes]
        timings["decode_s"] = time.time() - t0
    return codes, audio, timings


def output_name(seed, index, prompt):
    """The file name (without extension) of a sample: its seed, the prompt's place in this run's
    list, and the prompt's first words (slug: its first 6 runs of ASCII letters and digits, lower
    case, at most 80 characters). Two runs into one folder make the same name only for the same
    seed, place and first words: prompts that differ only past them (or in case, punctuation or
    non-ASCII letters) share a name, and the later run stops (pending: name_taken), overwriting
    nothing."""
    return f"s{seed}-{index:04d}-{slug(prompt)}"


OUTPUT_EXTENSIONS = (".npy", ".wav", ".png")


def write_new(path, write):
    """Create path with write(f), f a binary file: all or nothing, and never over an existing file.
    It is written under a temporary name in the same folder and synced, then linked to path; the
    link fails if path exists, even if another program has just made it: then False, and nothing
    written. True once path and its name are on disk."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        datamod.fsync_dir(os.path.dirname(path) or ".")  # the name too is on disk before a record counts on it
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class Request:
    """One prompt of this run: its place in the list, its text, its seed (--seed + place: its own
    generator) and the name of its files (its id in an evaluation set, else output_name)."""
    index: int
    prompt: str
    seed: int
    name: str


def same_file_key(name):
    """What a file system that folds case and Unicode forms (macOS's and Windows' by default) keeps of a
    name: two names with one key are one file there. Letter by letter, as they compare names: "ß" and
    "ss" stay two (casefold() would make them one)."""
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in unicodedata.normalize("NFC", name))


def plan(args):
    """The requests of this run, in the order of args.prompts. One line, exit code 2, when two of them
    would write the same files (an id of --prompts FILE equal to another prompt's name), here or on a
    file system that ignores case or the form of accented letters ("Song" and "song", "é" composed
    or not): there the second would find the first's files and stop after its work."""
    requests = [Request(i, prompt, args.seed + i, key if key is not None else output_name(args.seed + i, i, prompt))
                for i, (key, prompt) in enumerate(args.prompts)]
    first = {}
    for r in requests:
        other = first.setdefault(same_file_key(r.name), r)
        if other.index != r.index:
            where = "" if other.name == r.name else f" and {other.name}.* (one file where case or accents' form " \
                "is not told apart: macOS, Windows)"
            datamod.fail(f"prompts {other.index + 1} and {r.index + 1} would both write {r.name}.*{where}: give one "
                         "of them another id")
    return requests


# Settings that records written before they were added lack: such a record is not told apart by them
LATER_SETTINGS = ("ckpt_step", "stage2_step")


def settings(request, args):
    """What a generations.jsonl record must agree on to be the same generation as a request of this run."""
    values = {"prompt": request.prompt, "seed": request.seed, "seconds": args.seconds, "cfg": args.cfg,
              "top_k": args.top_k, "temperature": args.temperature, "ckpt": args.ckpt, "ckpt_step": args.ckpt_step,
              "stage2": args.stage2, "stage2_step": args.stage2_step,
              "stage2_steps": args.stage2_steps if args.stage2 else None,
              "stage2_cfg": args.stage2_cfg if args.stage2 else None, "ssm_state": args.ssm_state,
              "continued_from": args.continue_from, "continue_seconds": args.continue_seconds, "window": args.window,
              "dac": args.dac, "t5": args.t5}
    return {k: record_setting(k, v) for k, v in values.items()}


def committed(out):
    """{name: record} of OUT/generations.jsonl: a request is done once its line is there (written
    after its files; a line cut by a crash does not count)."""
    path = os.path.join(out, "generations.jsonl")
    if not os.path.exists(path):
        return {}
    if not os.path.isfile(path):
        datamod.fail(f"{path}: not a file")
    records = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.endswith(b"\n"):
                try:
                    record = datamod.parse_json(line)
                    records[record["name"]] = record
                except (ValueError, KeyError, TypeError):
                    datamod.fail(f"{path}:{n}: not a record of generate.py (a JSON object with a name); "
                                 "edited? move the file away to start the folder again")
    return records


def drop_cut_line(path):
    """Cut a file of lines (OUT/generations.jsonl, OUT/.started) back to its last whole line: what a
    crash left of a line was never written, and the next line must not be appended to it."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)


STARTED = ".started"  # OUT/.started: the names a run began to write, one a line, before their files


def started(out):
    """The names in OUT/.started: a run appends a batch's names there (synced) before it writes their
    files, so that a later run knows which files without a record an interrupted run left (and may
    remove) and which are someone else's (and must keep). A line "." + name (no name begins with a
    dot) takes a name back: its file turned out to be another program's (mark_kept)."""
    path = os.path.join(out, STARTED)
    names = set()
    if not os.path.exists(path):
        return names
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):  # a cut last line was never written
                name = line[:-1].decode(errors="replace")
                if name.startswith("."):
                    names.discard(name[1:])
                else:
                    names.add(name)
    return names


def mark_started(lock, requests):
    """Append the requests' names to OUT/.started (lock: that file, open for appending) and sync them."""
    datamod.append_durably(lock, "".join(r.name + "\n" for r in requests).encode())


def mark_kept(lock, name):
    """Take a started name back in OUT/.started: a file of that name appeared that this run did not
    write, and a later run must keep it rather than remove it as an interrupted run's."""
    datamod.append_durably(lock, f".{name}\n".encode())


def lock_folder(out):
    """OUT/.started opened for appending, locked (data.exclusive_lock): two runs into one folder would
    each take the other's unfinished files for an interrupted run's."""
    return datamod.exclusive_lock(os.path.join(out, STARTED), f"{out}: another generate.py is writing to this "
                                  "folder; wait for it, or pass another --out")


def record_setting(key, value):
    """A setting as records keep it, so that one file or folder spelled two ways is one setting: a --t5 or
    --dac local folder as its absolute path (as parse_args gives it), the checkpoints and --continue's file
    as absolute paths (./runs/x/ckpt.pt, runs/x/ckpt.pt and /home/me/runs/x/ckpt.pt are one checkpoint). A
    relative path in an earlier generate.py's record is taken from this working directory."""
    if not isinstance(value, str):
        return value
    if key in ("t5", "dac"):
        return datamod.model_location(value)
    return os.path.abspath(value) if key in ("ckpt", "stage2", "continued_from") else value


def pending(requests, args, clean=False):
    """The requests still to do. A request whose record is committed with the same settings is done (a
    rerun resumes: it skips it). Its name taken by another generation, or by a file that no run of
    generate.py began to write here, stops the run (one line, exit 2): no file is overwritten or removed
    that is not an interrupted run's. clean (under lock_folder's lock): remove what interrupted runs
    left, the files of names they began but did not commit and their temporary files."""
    done, begun, todo = committed(args.out), started(args.out), []
    for r in requests:
        record = done.get(r.name)
        if record is not None:
            wanted = {k: v for k, v in settings(r, args).items() if k in record or k not in LATER_SETTINGS}
            if any(record_setting(k, record.get(k)) != v for k, v in wanted.items()):
                name_taken(os.path.join(args.out, r.name + ".npy"))
            continue
        for path in (os.path.join(args.out, r.name + ext) for ext in OUTPUT_EXTENSIONS):
            if os.path.exists(path) and r.name not in begun:
                datamod.fail(f"{path} exists and no run of generate.py began it in this folder: it is kept; "
                             f"pass another --out (or, if an interrupted run before {STARTED} existed left it, "
                             "move it away)")
            if os.path.exists(path) and clean:
                os.unlink(path)
        todo.append(r)
    if clean:  # write_new's temporary files (.<name>.<ext>.<pid>.tmp) that a kill left behind
        for name in os.listdir(args.out):
            cut = re.fullmatch(r"\.(.+)\.(npy|wav|png)\.\d+\.tmp", name)
            if cut and cut.group(1) in begun:
                os.unlink(os.path.join(args.out, name))
    return todo


def auto_batch_size(m, n_frames, device, n_requests):
    """--batch-size by default: on CUDA as many prompts as half the free memory holds (each prompt:
    2 rows of decoding state, with guidance; and stage 2's activations), at most 64; on a CPU 16. The
    other half holds the copy of the decoding state that fast.Decoder makes while it records its graphs
    (at its first batches; later ones decode on its own states, Decoder.new_cache), the model and DAC's
    decoding."""
    if device != "cuda":
        return min(n_requests, 16)
    frames = min(n_frames, m.window or n_frames)  # a pass holds at most one window
    cache = ssmttm.InferenceCache(m.lm, 1, frames + m.lm.cfg.n_codebooks, "meta", next(m.lm.parameters()).dtype)
    tensors = [t for states in cache.states for state in states if state is not None
               for t in vars(state).values() if torch.is_tensor(t)]
    per_row = sum(t.numel() * t.element_size() for t in tensors)
    stage2_bytes = 0 if m.stage2 is None else 2 * 16 * sum(m.stage2.cfg.channels) * n_frames * 4
    per_prompt = 2 * per_row + stage2_bytes
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(n_requests, 64, int(free / 2 // per_prompt)))


def write_outputs(m, requests, codes, audio, timings, n_frames, args, lock):
    """Per request: OUT/<name>.npy, .wav and .png (or the caption score, for synthetic data), then
    its line in OUT/generations.jsonl, appended and synced: the commit point of the request. A file
    name that another program took meanwhile stops the run (one line, exit 2), and the name is taken
    back in OUT/.started (lock), so that no later run removes that file."""
    log_path = os.path.join(args.out, "generations.jsonl")
    for i, r in enumerate(requests):
        name, prompt = r.name, r.prompt
        base = os.path.join(args.out, name)

        def write_new_or_stop(path, write):
            if not write_new(path, write):
                mark_kept(lock, name)
                name_taken(path)
        c = codes[i].cpu().numpy().astype(np.int16)
        write_new_or_stop(base + ".npy", lambda f: np.save(f, c))
        record = {"name": name, "index": r.index, **settings(r, args), "frames": n_frames,
                  "codebooks": int(c.shape[0]), "codes": base + ".npy", **timings}
        if m.continuation is not None:  # frames [0, prompt_frames) are the prompt's codes, the rest are new
            frames = m.continuation.frames
            record.update(prompt_frames=frames, prompt_seconds=prompt_seconds(frames))
        if m.synthetic:
            record["caption_score"] = datamod.caption_score(c, prompt)
            unscored = "" if any(datamod.caption_rules(prompt)) else (  # with K = 1 nothing to score: 0
                "; it names no rule of the synthetic set: an instrument (" + "/".join(datamod.INSTRUMENTS)
                + "), a scale (" + "/".join(datamod.SCALES) + ") or a tempo (" + "/".join(datamod.TEMPOS) + ")")
            said = f"{name}: caption score {record['caption_score']:.3f}  ({prompt}){unscored}"
        else:
            import soundfile as sf  # only when there is audio to write
            wav = peak_normalise(audio[i][:n_frames * datamod.HOP])
            write_new_or_stop(base + ".wav",
                              lambda f: sf.write(f, wav, datamod.SAMPLE_RATE, subtype="PCM_16", format="WAV"))
            write_new_or_stop(base + ".png", lambda f: save_mel_png(wav, f, prompt))
            record.update(wav=base + ".wav", png=base + ".png")
            said = f"{name}: {base}.wav"
        with open(log_path, "ab", buffering=0) as f:  # unbuffered: append_durably's fsync then covers the line
            datamod.append_durably(f, (json.dumps(record, allow_nan=False) + "\n").encode())
        print(said)  # once committed: output that fails stops nothing committed half


def name_taken(path):
    datamod.fail(f"{path} exists (a generation with other settings), and is kept: pass another --out (or, for "
                 "prompts not named by an id, another --seed)")


def main(argv=None):
    args = parse_args(argv)
    args.ckpt = args.ckpt or newest_checkpoint()
    ckpt = read_checkpoint(args.ckpt, "stage1")
    ck2 = read_checkpoint(args.stage2, "stage2") if args.stage2 else None
    check_model_flags(args, ckpt, ck2)
    # the checkpoints' steps are settings too: a run trained on since makes other samples under the same path
    args.ckpt_step, args.stage2_step = ckpt["step"], None if ck2 is None else ck2.get("step")
    requests = plan(args)
    todo = pending(requests, args)
    device = args.device
    if not todo:
        print(f"nothing to do: all {len(requests)} outputs are in {args.out}", file=sys.stderr)
        return
    n_frames = round(args.seconds * FRAME_RATE)
    K = n_codebooks_of(ckpt)
    if args.continue_from and K is not None:  # the prompt's refusals that need no model, before any loads
        continuation_codes(args, continuation_rows(ck2 is not None, K), n_frames,
                           ckpt["text_encoder"]["kind"] == "words", args.ckpt)
    m = load_models(args, device, ckpt, ck2)
    if args.continue_from:
        m.continuation = load_continuation(args, m, n_frames, device)
    datamod.make_folder(args.out)
    lock = lock_folder(args.out)
    try:
        generate_all(m, args, requests, n_frames, lock)
    except (MemoryError, RuntimeError) as e:
        memory = datamod.out_of_memory(e)
        if memory is None:
            raise
        datamod.fail(f"out of memory on {device} ({memory}); pass a smaller --batch-size: the samples written are "
                     "kept, and the same command goes on from them")
    finally:
        lock.close()  # releases the folder now, not when the file object happens to be freed


def generate_all(m, args, requests, n_frames, lock):
    """main() under the folder's lock: the requests still to do, batch by batch, each batch's names
    marked started before its files."""
    device = args.device
    todo = pending(requests, args, clean=True)  # again, under the lock: the folder may have changed meanwhile
    for name in ("generations.jsonl", STARTED):
        drop_cut_line(os.path.join(args.out, name))
    open(os.path.join(args.out, "generations.jsonl"), "ab").close()
    datamod.fsync_dir(args.out)  # the names of the two logs on disk before any record is appended
    batch_size = args.batch_size or auto_batch_size(m, n_frames, device, len(todo))
    cfg = m.lm.cfg
    print(f"{cfg.variant}, {cfg.n_layers} blocks, K = {cfg.n_codebooks} ({m.ckpt_path}, step {m.step})"
          f"{' + stage 2' if m.stage2 else ''} | {len(todo)} of {len(requests)} prompt(s) to do, {batch_size} at a "
          f"time, {args.seconds:g} s = {n_frames} frames | {device}", file=sys.stderr)
    if m.continuation is not None:
        print(f"continuing {m.continuation.path}: {m.continuation.frames} frames of prompt, "
              f"{n_frames - m.continuation.frames} new", file=sys.stderr)
    if m.synthetic:
        print("synthetic-data checkpoint: its tokens are not DAC codes of music, so there is no audio to "
              "decode; each sample is scored against its caption's rules instead", file=sys.stderr)
    for b0 in range(0, len(todo), batch_size):
        batch = todo[b0:b0 + batch_size]
        mark_started(lock, batch)
        codes, audio, timings = generate_batch(m, batch, n_frames, args, device)
        write_outputs(m, batch, codes, audio, timings, n_frames, args, lock)


if __name__ == "__main__":
    datamod.run_command(main, "generate.py")
