"""Generate music from text with a trained ssmttm checkpoint.

    python generate.py "a calm piano piece" "an energetic drum and bass track"
    python generate.py --prompts prompts.txt --ckpt runs/stage1-prefix_simba-24L-k1/ckpt.pt \\
        --stage2 runs/stage2/ckpt.pt --seconds 25 --out outputs/

Stage 1 samples codebook 1 (K = 1) or all 9 codebooks (K = 9, delay pattern). With a K = 1
checkpoint, --stage2 fills codebooks 2..9 by diffusion (the paper's two-stage design); without it
codebook 1 is decoded alone (as in the paper's RQ1). Per prompt, OUT gets the codes (.npy), a
44.1 kHz WAV decoded by DAC (peak-normalised to -1 dBFS, never clipped), a mel-spectrogram PNG,
and a line in OUT/generations.jsonl with the prompt, seed, settings and timings.

On CUDA the LM decodes in bf16 through fast.py (fused kernels, one CUDA graph per frame; the
Mamba-2 layers on mamba-ssm's kernels when installed); on a CPU, the plain model in fp32.

Checkpoints trained on the synthetic set have no audio behind their tokens: for them the codes are
scored against the caption rules (data.caption_score) instead of decoded.
"""
import argparse
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data as datamod
import fast
import stage2
from ssmttm import FRAME_RATE, LAYOUTS, SPECIAL, ModelConfig, TextToMusicLM


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="*", help="text prompts")
    ap.add_argument("--prompts", dest="prompts_file", help="file with one prompt per line")
    ap.add_argument("--ckpt", help="stage-1 checkpoint (default: the newest under runs/)")
    ap.add_argument("--stage2", help="stage-2 checkpoint: fills codebooks 2..9 of a K = 1 model")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default="outputs")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (stage 1)")
    ap.add_argument("--top-k", type=int, default=250)
    ap.add_argument("--temperature", type=float, default=1.2)
    ap.add_argument("--stage2-steps", type=int, default=100)
    ap.add_argument("--stage2-cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--t5", help="local Flan-T5 folder, instead of the name saved in the checkpoint")
    ap.add_argument("--dac", help="DAC name or local folder (default: the one the data was encoded with)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode step by step without a CUDA graph")
    ap.add_argument("--continue", dest="continue_from", metavar="FILE",
                    help="continue this audio (wav, flac, ogg, mp3) or these codes (a .npy written by "
                         "generate.py): the output is the prompt, then new music up to --seconds in all")
    ap.add_argument("--continue-seconds", type=float, metavar="S",
                    help="continue from the last S seconds of --continue only (default: all of it)")
    ap.add_argument("--ssm-state", choices=["fp32", "bf16"], default="fp32",
                    help="how the Mamba-2 states are kept between steps: bf16 decodes faster on a GPU, at a small "
                         "cost in accuracy (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    prompts = list(args.prompts)
    if args.prompts_file:
        if not os.path.exists(args.prompts_file):
            ap.error(f"--prompts {args.prompts_file}: file not found")
        prompts += [line.rstrip("\n") for line in open(args.prompts_file) if line.strip()]
    if not prompts:
        ap.error("no prompt given (as arguments or with --prompts FILE)")
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            ap.error(f"prompt {i} is empty")
    args.prompts = [p.strip() for p in prompts]
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.continue_seconds is not None and (args.continue_from is None or args.continue_seconds <= 0):
        datamod.fail(f"--continue-seconds {args.continue_seconds:g}: must be positive, with --continue FILE")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def newest_checkpoint(kind="stage1", root="runs"):
    paths = [p for p in glob.glob(os.path.join(root, "*", "ckpt.pt"))]
    paths = [p for p in sorted(paths, key=os.path.getmtime, reverse=True) if read_checkpoint(p)["kind"] == kind]
    if not paths:
        sys.exit(f"no {kind} checkpoint under {root}/: train one (python train.py --layers 6) or pass --ckpt PATH")
    return paths[0]


def read_checkpoint(path, kind=None):
    if not os.path.exists(path):
        sys.exit(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        sys.exit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        sys.exit(f"{path}: not an ssmttm checkpoint")
    if kind and ckpt["kind"] != kind:
        sys.exit(f"{path} is a {ckpt['kind']} checkpoint, not {kind}" +
                 (": pass it with --stage2" if ckpt["kind"] == "stage2" else ""))
    return ckpt


def slug(text, n=6):
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:n]) or "prompt"


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
    spec = torch.stft(torch.from_numpy(audio), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=128, min_frequency=0.0,
                          max_frequency=16000.0, sampling_rate=datamod.SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    db = 10 * np.log10(np.maximum(mel.T @ spec.numpy(), 1e-10))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80,
              extent=[0, len(audio) / datamod.SAMPLE_RATE, 0, 128])
    ax.set(xlabel="time (s)", ylabel="mel band", title=title[:100])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Models:
    """What generation needs, loaded once: the stage-1 LM and its text encoder; stage 2 and its
    text encoder (or None); the DAC codec (None for synthetic-data checkpoints, which have no audio)."""
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


def load_models(args, device):
    """The stage-1 checkpoint (--ckpt, or the newest under runs/), --stage2 and the codec. On CUDA the
    LM runs in bf16 on the kernels (fast.py) when they are installed; on a CPU, plain, in fp32."""
    ckpt_path = args.ckpt or newest_checkpoint()
    ckpt = read_checkpoint(ckpt_path, "stage1")
    cfg = ModelConfig(**ckpt["config"])
    lm = TextToMusicLM(cfg)
    lm.load_state_dict(ckpt["model"])
    lm = fast.for_inference(lm.to(device), torch.bfloat16 if device == "cuda" else torch.float32)
    m = Models(lm, ckpt_path, ckpt["step"], datamod.load_text_encoder(ckpt["text_encoder"], device, args.t5),
               synthetic=ckpt["text_encoder"]["kind"] == "words")
    if device == "cuda":
        if fast.available():
            fast.accelerate(lm)
        graph = "self_attn" not in LAYOUTS[cfg.variant] and not args.no_cuda_graph  # a KV cache grows
        m.decoder = fast.Decoder(fast.FastOptions(cuda_graph=graph))
    if args.stage2:
        if cfg.n_codebooks != 1:
            sys.exit(f"--stage2 fills codebooks 2..9 of a K = 1 model; {ckpt_path} already makes all {cfg.n_codebooks}")
        ck2 = read_checkpoint(args.stage2, "stage2")
        m.stage2 = stage2.Stage2Diffusion(stage2.Stage2Config(**ck2["config"]))
        m.stage2.load_state_dict(ck2["model"])
        m.codec = datamod.load_codec(ck2["codec"], device, args.dac)
        m.stage2 = m.stage2.to(device).eval().attach_codec(m.codec)
        m.stage2_encoder = (m.text_encoder if ck2["text_encoder"] == ckpt["text_encoder"]
                            else datamod.load_text_encoder(ck2["text_encoder"], device, args.t5))
    if not m.synthetic and m.codec is None:
        m.codec = datamod.load_dac(args.dac or ckpt["args"].get("dac") or "descript/dac_44khz", device)
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
    exactly. BadInput (one line, exit 2) for a file that cannot be read, audio with a synthetic-data
    checkpoint, fewer codebooks than the output has, or a prompt longer than --seconds."""
    path, flag = args.continue_from, f"--continue {args.continue_from}"
    needed = 9 if m.stage2 is not None or m.lm.cfg.n_codebooks == 9 else 1
    if path.endswith(".npy"):
        codes = read_prompt_codes(path, needed)
        if args.continue_seconds:
            codes = codes[:, -round(args.continue_seconds * FRAME_RATE):]
    else:
        if m.synthetic:
            datamod.fail(f"{flag}: {m.ckpt_path} was trained on the synthetic set, whose tokens are not audio; "
                         f"continue a .npy of its codes instead")
        try:
            audio = datamod.load_audio(path)
        except datamod.AudioError as e:
            datamod.fail(f"{flag}: {e}")
        if args.continue_seconds:
            audio = audio[-round(args.continue_seconds * datamod.SAMPLE_RATE):]
        audio = audio[len(audio) % datamod.HOP:]  # whole frames, so the prompt ends where the file ends
        if len(audio) == 0:
            datamod.fail(f"{flag}: shorter than one frame ({datamod.HOP} samples)")
        codes = torch.from_numpy(datamod.encode_clips(m.codec, [audio], device)[0].astype(np.int64))[:needed]
    if codes.shape[-1] > n_frames:
        frames = codes.shape[-1]
        datamod.fail(f"{flag}: the prompt lasts {frames / FRAME_RATE:.2f} s ({frames} frames), more than "
                     f"--seconds {args.seconds:g} ({n_frames} frames); --continue-seconds S keeps its end")
    return Continuation(path, codes.to(device))


def read_prompt_codes(path, needed):
    """A .npy of codes (n, frames), 0 <= code < 1024 -> its first `needed` rows, int64; BadInput if not."""
    flag = f"--continue {path}"
    try:
        codes = np.load(path)
    except FileNotFoundError:
        datamod.fail(f"{flag}: not found")
    except (OSError, ValueError) as e:
        datamod.fail(f"{flag}: not a .npy of codes ({str(e).splitlines()[0]})")
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.size == 0 or codes.min() < 0 or codes.max() >= 1024:
        datamod.fail(f"{flag}: want codes (codebooks, frames) between 0 and 1023, as generate.py writes them; got "
                     f"{codes.dtype} {codes.shape}")
    if codes.shape[0] < needed:
        datamod.fail(f"{flag}: {datamod.plural(codes.shape[0], 'codebook')}; this output has {needed}")
    return torch.from_numpy(codes[:needed].astype(np.int64))


def generate_batch(m, prompts, seed, n_frames, args, device):
    """Codes (b, 9 or K, n_frames) for a batch of prompts, the audio (b, samples) or None, and the
    seconds each stage took. One generator, seeded with `seed`, draws for both stages."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timings = {}
    text, mask = m.text_encoder(prompts)
    g = torch.Generator(device=device).manual_seed(seed)
    cont = m.continuation
    t0 = time.time()
    codes = m.lm.generate(text, mask, n_frames, cfg_scale=args.cfg, top_k=args.top_k, temperature=args.temperature,
                          generator=g, decoder=m.decoder, progress=True,
                          ssm_dtype=torch.bfloat16 if args.ssm_state == "bf16" else None,
                          prompt=None if cont is None else cont.prompt(len(prompts), m.lm.cfg.n_codebooks))
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
    if not m.synthetic:
        t0 = time.time()
        with torch.no_grad():
            audio = m.codec.decode(audio_codes=codes).audio_values.float().cpu().numpy()
        timings["decode_s"] = time.time() - t0
    return codes, audio, timings


def write_outputs(m, prompts, codes, audio, seed, timings, n_frames, first, args):
    """Per prompt: OUT/NNNN-slug.npy, .wav and .png (or the caption score, for synthetic data), and a
    line in OUT/generations.jsonl. first: the number of the first prompt."""
    log_path = os.path.join(args.out, "generations.jsonl")
    for i, prompt in enumerate(prompts):
        name = f"{first + i:04d}-{slug(prompt)}"
        base = os.path.join(args.out, name)
        c = codes[i].cpu().numpy().astype(np.int16)
        np.save(base + ".npy", c)
        record = {"prompt": prompt, "seed": seed, "row": i, "seconds": args.seconds, "frames": n_frames,
                  "codebooks": int(c.shape[0]), "ckpt": m.ckpt_path, "stage2": args.stage2, "cfg": args.cfg,
                  "top_k": args.top_k, "temperature": args.temperature, "ssm_state": args.ssm_state,
                  "codes": base + ".npy", **timings}
        if m.stage2 is not None:
            record.update(stage2_steps=args.stage2_steps, stage2_cfg=args.stage2_cfg)
        if m.continuation is not None:  # frames [0, prompt_frames) are the prompt's codes, the rest are new
            record.update(continued_from=m.continuation.path, prompt_frames=m.continuation.frames,
                          prompt_seconds=round(m.continuation.frames / FRAME_RATE, 4))
        if m.synthetic:
            record["caption_score"] = datamod.caption_score(c, prompt)
            print(f"{name}: caption score {record['caption_score']:.3f}  ({prompt})")
        else:
            import soundfile as sf  # only when there is audio to write
            wav = peak_normalise(audio[i][:n_frames * datamod.HOP])
            sf.write(base + ".wav", wav, datamod.SAMPLE_RATE, subtype="PCM_16")
            save_mel_png(wav, base + ".png", prompt)
            record.update(wav=base + ".wav", png=base + ".png")
            print(f"{name}: {base}.wav")
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    m = load_models(args, device)
    n_frames = round(args.seconds * FRAME_RATE)
    if args.continue_from:
        m.continuation = load_continuation(args, m, n_frames, device)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "generations.jsonl")
    done = sum(1 for _ in open(log_path)) if os.path.exists(log_path) else 0
    cfg = m.lm.cfg
    print(f"{cfg.variant}, {cfg.n_layers} blocks, K = {cfg.n_codebooks} ({m.ckpt_path}, step {m.step})"
          f"{' + stage 2' if m.stage2 else ''} | {len(args.prompts)} prompt(s), {args.seconds:g} s = {n_frames} frames"
          f" | {device}", file=sys.stderr)
    if m.continuation is not None:
        print(f"continuing {m.continuation.path}: {m.continuation.frames} frames of prompt, "
              f"{n_frames - m.continuation.frames} new", file=sys.stderr)
    if m.synthetic:
        print("synthetic-data checkpoint: its tokens are not DAC codes of music, so there is no audio to "
              "decode; each sample is scored against its caption's rules instead", file=sys.stderr)
    for b0 in range(0, len(args.prompts), args.batch_size):
        prompts = args.prompts[b0:b0 + args.batch_size]
        seed = args.seed + b0 // args.batch_size
        codes, audio, timings = generate_batch(m, prompts, seed, n_frames, args, device)
        write_outputs(m, prompts, codes, audio, seed, timings, n_frames, done, args)
        done += len(prompts)


if __name__ == "__main__":
    main()
