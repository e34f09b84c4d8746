"""Generate music from text with a trained ssmttm checkpoint.

    python generate.py "a calm piano piece" "an energetic drum and bass track"
    python generate.py --prompts prompts.txt --ckpt runs/stage1-prefix_simba-24L-k1/ckpt.pt \\
        --stage2 runs/stage2/ckpt.pt --seconds 25 --out outputs/

Stage 1 samples codebook 1 (K = 1) or all 9 codebooks (K = 9, delay pattern). With a K = 1
checkpoint, --stage2 fills codebooks 2..9 by diffusion (the paper's two-stage design); without it
codebook 1 is decoded alone (as in the paper's RQ1). Per prompt, OUT gets the codes (.npy), a
44.1 kHz WAV decoded by DAC (peak-normalised to -1 dBFS, never clipped), a mel-spectrogram PNG,
and then a line in OUT/generations.jsonl with the prompt, seed, settings and timings. The files are
named s<seed>-<prompt's place in the list>-<its first words> (output_name); a file is written
under a temporary name and then linked to its name, never over an existing file: a name already
taken (the same seed and prompt, e.g. the same command run twice) stops the run before any work,
naming the file. Text encoder and codec run in fp32; the T5 states and the DAC decode do not
depend on the dtype their folders store.

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
from dataclasses import dataclass

import numpy as np
import torch

import data as datamod
import fast
import stage2
from ssmttm import FRAME_RATE, LAYOUTS, ModelConfig, TextToMusicLM


MAX_SECONDS = 3600
MIN_SECONDS = math.ceil(0.5 / FRAME_RATE * 1e4) / 1e4  # 0.0059 s, the shortest that rounds to one frame


def parse_args(argv=None):
    """The settings. A bad value stops here with one line naming it and exit code 2 (data.fail)."""
    ap = datamod.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    at_least_0 = datamod.number(0)
    ap.add_argument("prompts", nargs="*", help="text prompts")
    ap.add_argument("--prompts", dest="prompts_file", help="file with one prompt per line (UTF-8)")
    ap.add_argument("--ckpt", help="stage-1 checkpoint (default: the newest under runs/)")
    ap.add_argument("--stage2", help="stage-2 checkpoint: fills codebooks 2..9 of a K = 1 model")
    ap.add_argument("--seconds", type=datamod.number(MIN_SECONDS, MAX_SECONDS), default=10.0,
                    help=f"length of each sample, from one frame ({MIN_SECONDS} s) to an hour")
    ap.add_argument("--out", default="outputs")
    ap.add_argument("--cfg", type=at_least_0, default=3.0,
                    help="classifier-free guidance scale (stage 1): 1 is the conditional model, 0 the null condition")
    ap.add_argument("--top-k", type=datamod.whole_number(0), default=250, help="0: every code")
    ap.add_argument("--temperature", type=at_least_0, default=1.2, help="0: greedy")
    ap.add_argument("--stage2-steps", type=datamod.positive_int, default=100)
    ap.add_argument("--stage2-cfg", type=at_least_0, default=3.0)
    ap.add_argument("--seed", type=datamod.SEED, default=0)
    ap.add_argument("--batch-size", type=datamod.positive_int, default=4)
    ap.add_argument("--device", type=datamod.device_name, default="auto", help="auto, cpu, cuda")
    ap.add_argument("--t5", help="local Flan-T5 folder, instead of the name saved in the checkpoint")
    ap.add_argument("--dac", help="DAC name or local folder (default: the one the data was encoded with)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode step by step without a CUDA graph")
    ap.add_argument("--ssm-state", choices=["fp32", "bf16"], default="fp32",
                    help="how the Mamba-2 states are kept between steps: bf16 decodes faster on a GPU, at a small "
                         "cost in accuracy (BENCHMARKS.md)")
    args = ap.parse_args(argv)
    prompts = list(args.prompts)
    if args.prompts_file:
        text = datamod.read_utf8(args.prompts_file, "prompts file")
        prompts += [line for line in text.split("\n") if line.strip()]
    if not prompts:
        ap.error("no prompt given (as arguments or with --prompts FILE)")
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            ap.error(f"prompt {i} is empty")
    args.prompts = [p.strip() for p in prompts]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        datamod.fail(f"{args.out}: exists and is not a folder")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def newest_checkpoint(kind="stage1", root="runs"):
    """The newest ROOT/*/ckpt.pt of this kind. One that cannot be read is skipped with a warning, so
    a damaged newer run does not hide an older good one."""
    for path in sorted(glob.glob(os.path.join(root, "*", "ckpt.pt")), key=os.path.getmtime, reverse=True):
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
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a cut or damaged file: pickle, zip and torch errors of every kind
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an ssmttm checkpoint")
    return ckpt


def read_checkpoint(path, kind=None):
    """The checkpoint at path, of this kind; else one line naming it, exit code 2."""
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        datamod.fail(str(e))
    if kind and ckpt["kind"] != kind:
        datamod.fail(f"{path} is a {ckpt['kind']} checkpoint, not {kind}" +
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
            datamod.fail(f"--stage2 fills codebooks 2..9 of a K = 1 model; {ckpt_path} already makes all "
                         f"{cfg.n_codebooks}")
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


def generate_batch(m, prompts, seed, n_frames, args, device):
    """Codes (b, 9 or K, n_frames) for a batch of prompts, the audio (b, samples) or None, and the
    seconds each stage took. One generator, seeded with `seed`, draws for both stages."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timings = {}
    text, mask = m.text_encoder(prompts)
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    codes = m.lm.generate(text, mask, n_frames, cfg_scale=args.cfg, top_k=args.top_k, temperature=args.temperature,
                          generator=g, decoder=m.decoder, progress=True,
                          ssm_dtype=torch.bfloat16 if args.ssm_state == "bf16" else None)
    sync()
    timings["stage1_s"] = time.time() - t0
    if m.stage2 is not None:
        t0 = time.time()
        text2, mask2 = m.stage2_encoder(prompts)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            codes = m.stage2.generate(codes[:, 0], text2, mask2, steps=args.stage2_steps, cfg_scale=args.stage2_cfg,
                                      generator=g, progress=True)
        sync()
        timings["stage2_s"] = time.time() - t0
    audio = None
    if not m.synthetic:
        t0 = time.time()
        with torch.no_grad():
            audio = m.codec.decode(audio_codes=codes).audio_values.float().cpu().numpy()
        timings["decode_s"] = time.time() - t0
    return codes, audio, timings


def output_name(seed, index, prompt):
    """The file name (without extension) of a sample: its seed, the prompt's place in this run's
    list, and the prompt's first words. Two runs into one folder make the same name only for the
    same seed, place and prompt."""
    return f"s{seed}-{index:04d}-{slug(prompt)}"


OUTPUT_EXTENSIONS = (".npy", ".wav", ".png")


def write_new(path, write):
    """Create path with write(f), f a binary file: all or nothing, and never over an existing file.
    It is written under a temporary name in the same folder and synced, then linked to path; the
    link fails if path exists, even if another run has just made it."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            name_taken(path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(m, prompts, codes, audio, seed, timings, n_frames, first, args):
    """Per prompt: OUT/<output_name>.npy, .wav and .png (or the caption score, for synthetic data),
    then its line in OUT/generations.jsonl. first: the place of the first prompt in args.prompts."""
    log_path = os.path.join(args.out, "generations.jsonl")
    for i, prompt in enumerate(prompts):
        name = output_name(seed, first + i, prompt)
        base = os.path.join(args.out, name)
        c = codes[i].cpu().numpy().astype(np.int16)
        write_new(base + ".npy", lambda f: np.save(f, c))
        record = {"prompt": prompt, "seed": seed, "row": i, "seconds": args.seconds, "frames": n_frames,
                  "codebooks": int(c.shape[0]), "ckpt": m.ckpt_path, "stage2": args.stage2, "cfg": args.cfg,
                  "top_k": args.top_k, "temperature": args.temperature, "ssm_state": args.ssm_state,
                  "codes": base + ".npy", **timings}
        if m.stage2 is not None:
            record.update(stage2_steps=args.stage2_steps, stage2_cfg=args.stage2_cfg)
        if m.synthetic:
            record["caption_score"] = datamod.caption_score(c, prompt)
            print(f"{name}: caption score {record['caption_score']:.3f}  ({prompt})")
        else:
            import soundfile as sf  # only when there is audio to write
            wav = peak_normalise(audio[i][:n_frames * datamod.HOP])
            write_new(base + ".wav", lambda f: sf.write(f, wav, datamod.SAMPLE_RATE, subtype="PCM_16", format="WAV"))
            write_new(base + ".png", lambda f: save_mel_png(wav, f, prompt))
            record.update(wav=base + ".wav", png=base + ".png")
            print(f"{name}: {base}.wav")
        with open(log_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: a NaN would be a bug


def check_names_free(args, batches):
    """Before any work: stop if an output of this run exists already."""
    for first, prompts, seed in batches:
        for i, prompt in enumerate(prompts):
            base = os.path.join(args.out, output_name(seed, first + i, prompt))
            for path in (base + ext for ext in OUTPUT_EXTENSIONS):
                if os.path.exists(path):
                    name_taken(path)


def name_taken(path):
    datamod.fail(f"{path} exists (from a run with the same seed and prompt), and is kept: pass another --seed or --out")


def main(argv=None):
    args = parse_args(argv)
    batches = [(b0, args.prompts[b0:b0 + args.batch_size], args.seed + b0 // args.batch_size)  # first, prompts, seed
               for b0 in range(0, len(args.prompts), args.batch_size)]
    check_names_free(args, batches)
    device = args.device
    m = load_models(args, device)
    n_frames = round(args.seconds * FRAME_RATE)
    os.makedirs(args.out, exist_ok=True)
    cfg = m.lm.cfg
    print(f"{cfg.variant}, {cfg.n_layers} blocks, K = {cfg.n_codebooks} ({m.ckpt_path}, step {m.step})"
          f"{' + stage 2' if m.stage2 else ''} | {len(args.prompts)} prompt(s), {args.seconds:g} s = {n_frames} frames"
          f" | {device}", file=sys.stderr)
    if m.synthetic:
        print("synthetic-data checkpoint: its tokens are not DAC codes of music, so there is no audio to "
              "decode; each sample is scored against its caption's rules instead", file=sys.stderr)
    for first, prompts, seed in batches:
        codes, audio, timings = generate_batch(m, prompts, seed, n_frames, args, device)
        write_outputs(m, prompts, codes, audio, seed, timings, n_frames, first, args)


if __name__ == "__main__":
    main()
