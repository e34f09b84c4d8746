"""Data for ssmttm: audio + captions -> DAC tokens, datasets, text encoders, and a synthetic set.

Real data (paper, section III-C), preprocessed once:

    python data.py --audio DIR --captions captions.jsonl --out data/jamendo [--remove-vocals]

  captions: JSONL, one object per audio file, path relative to --audio:
      {"audio": "rock/track01.mp3", "caption": "An energetic rock track with distorted guitars."}
  or CSV with a header row `audio,caption`. wav, flac, ogg and mp3 are read (libsndfile).

  Each file is mixed to mono, resampled to 44.1 kHz (soxr), optionally stripped of vocals
  (HTDemucs), cut into non-overlapping 30 s clips (a last partial clip is kept if it lasts at least
  10 s), and clips that are mostly silent are dropped: a 50 ms window is silent when its RMS is
  below -60 dBFS, and a clip goes when more than 15 s (or more than half of a shorter clip) is
  silent. The clips are encoded by DAC 44.1 kHz into 9 x 2584 codes.

  The output folder holds codes.u16 (uint16 [N, 9, 2584], memory-mapped, padded with the special
  id 1024), index.jsonl (one line per clip: source, start, frames, caption), sources.jsonl (one line
  per finished audio file) and meta.json. Work is committed one audio file at a time (codes
  flushed first, then its index lines in one write), so rerunning skips finished files and an
  interruption loses nothing that was committed.

Synthetic data (the default of train.py; no download): `SyntheticMusic` makes token "music" whose
caption sets rules the tokens follow, `WordEncoder` stands in for T5, and `caption_score` measures
how well codes follow their caption (our offline stand-in for the CLAP score).
"""
import argparse
import csv
import json
import math
import os
import sys
import zlib

import numpy as np
import torch

SAMPLE_RATE = 44100
HOP = 512
N_CODEBOOKS = 9
SPECIAL = 1024
CLIP_SECONDS = 30.0
CLIP_FRAMES = math.ceil(CLIP_SECONDS * SAMPLE_RATE / HOP)  # 2584
MIN_CLIP_SECONDS = 10.0
SILENCE_DBFS = -60.0
SILENCE_WINDOW_S = 0.05
MAX_SILENCE_S = 15.0
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


# ------------------------------------------------------------------------------------------------
# Synthetic token music: captions whose words set rules that the codes follow.

INSTRUMENTS = {"piano": 0, "guitar": 256, "strings": 512, "synth": 768}        # codebook-1 id range [lo, lo+256)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),  # allowed pitch classes, id % 12
          "pentatonic": (0, 2, 4, 7, 9), "blues": (0, 3, 5, 6, 7, 10)}
TEMPOS = {"slow": 8, "moderate": 4, "fast": 2}                                 # frames per note
MOODS = ("calm", "happy", "dark", "dreamy", "epic", "gentle")                   # words with no rule


def fine_codes(coarse):
    """Codebooks 2..9 of the synthetic set: each a fixed function of the codebook before it, so of
    codebook 1 (what stage 2 and the delay pattern have to learn). (..., T) -> (..., 8, T)."""
    out, prev = [], coarse
    for k in range(1, N_CODEBOOKS):
        prev = (prev * (2 * k + 1) + 97 * k) % 1024
        out.append(prev)
    return np.stack(out, axis=-2)


class SyntheticMusic:
    """Endless procedurally generated examples. Example i is a pure function of (seed, i).
    Caption: "a {mood} {tempo} {instrument} piece in a {scale} scale". Codebook 1 holds notes of
    `tempo` frames each, every note an id in the instrument's range whose pitch class (id % 12) is
    in the scale; codebooks 2..9 follow from codebook 1 (fine_codes)."""

    def __init__(self, n_frames=128, seed=0):
        self.n_frames, self.seed = n_frames, seed

    def example(self, index):
        rng = np.random.default_rng([self.seed, index])
        instrument, scale, tempo = (rng.choice(list(t)) for t in (INSTRUMENTS, SCALES, TEMPOS))
        mood = rng.choice(MOODS)
        allowed = allowed_ids(instrument, scale)
        period = TEMPOS[tempo]
        notes = rng.choice(allowed, size=-(-self.n_frames // period))
        phase = rng.integers(period)  # the first note may be cut short
        coarse = np.repeat(notes, period)[phase:phase + self.n_frames]
        if len(coarse) < self.n_frames:
            coarse = np.concatenate([coarse, np.repeat(rng.choice(allowed), self.n_frames - len(coarse))])
        codes = np.concatenate([coarse[None], fine_codes(coarse)], axis=0)  # (9, T)
        return torch.from_numpy(codes.astype(np.int64)), f"a {mood} {tempo} {instrument} piece in a {scale} scale"

    def batch(self, indices):
        examples = [self.example(int(i)) for i in indices]
        return torch.stack([c for c, _ in examples]), [t for _, t in examples]

    def captions(self, n, start=10**9):
        """n captions of held-out examples (indices far from any training index)."""
        return [self.example(start + i)[1] for i in range(n)]


def allowed_ids(instrument, scale):
    lo = INSTRUMENTS[instrument]
    return np.array([i for i in range(lo, lo + 256) if i % 12 in SCALES[scale]])


def caption_rules(caption):
    words = set(caption.lower().replace(",", " ").split())
    pick = lambda table: next((w for w in table if w in words), None)
    return pick(INSTRUMENTS), pick(SCALES), pick(TEMPOS)


def caption_score(codes, caption):
    """Fraction of the caption's rules the codes obey, each rule scored as the fraction of frames
    (or note boundaries) that follow it. codes (K, T) with K = 1 or 9. Rules: instrument -> ids in
    its range; scale -> pitch classes in the scale; tempo -> the id only changes on the note grid
    (a change is on the grid when the run before it lasted a multiple of the note length);
    with K = 9 also: codebooks 2..9 equal fine_codes(codebook 1). Random codes score about 0.25."""
    codes = np.asarray(codes)
    coarse = codes[0]
    instrument, scale, tempo = caption_rules(caption)
    scores = []
    if instrument:
        lo = INSTRUMENTS[instrument]
        scores.append(np.mean((coarse >= lo) & (coarse < lo + 256)))
    if scale:
        scores.append(np.mean(np.isin(coarse % 12, SCALES[scale])))
    if tempo:
        changes = np.flatnonzero(coarse[1:] != coarse[:-1]) + 1
        runs = np.diff(np.concatenate([[0], changes]))[1:]  # lengths of complete notes
        period = TEMPOS[tempo]
        scores.append(np.mean(runs % period == 0) if len(runs) else 0.0)
    if codes.shape[0] == N_CODEBOOKS:
        scores.append(np.mean(codes[1:] == fine_codes(coarse)))
    return float(np.mean(scores)) if scores else 0.0


# ------------------------------------------------------------------------------------------------
# Text encoders: (list of captions) -> states (b, L, 768) float32, mask (b, L) bool (True = token)


class WordEncoder:
    """The synthetic set's text encoder: a fixed random 768-d vector per word (seeded by the word),
    so it needs no download and feeds the same prefix path as T5."""

    spec = {"kind": "words"}

    def __init__(self, dim=768, device="cpu"):
        self.dim, self.device, self.table = dim, device, {}

    def vector(self, word):
        if word not in self.table:
            g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
            self.table[word] = torch.randn(self.dim, generator=g)
        return self.table[word]

    def __call__(self, captions):
        words = [c.lower().replace(",", " ").split() or [""] for c in captions]
        L = max(len(w) for w in words)
        states = torch.zeros(len(captions), L, self.dim)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            states[i, :len(ws)] = torch.stack([self.vector(w) for w in ws])
            mask[i, :len(ws)] = True
        return states.to(self.device), mask.to(self.device)


class T5TextEncoder:
    """Frozen Flan-T5 encoder (T5EncoderModel + its tokenizer), from a hub name or a local folder.
    Captions longer than max_tokens are truncated, with a warning."""

    def __init__(self, name_or_path="google/flan-t5-base", max_tokens=256, device="cpu"):
        from transformers import AutoTokenizer, T5EncoderModel
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = T5EncoderModel.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)
        except OSError as e:
            raise SystemExit(f"could not load the T5 text encoder {name_or_path!r} ({str(e).splitlines()[0]}); "
                             "without internet, download it elsewhere and pass its local folder (--t5 PATH)") from None
        self.spec = {"kind": "t5", "name": str(name_or_path), "max_tokens": max_tokens}
        self.max_tokens, self.device, self.warned = max_tokens, device, set()

    @torch.no_grad()
    def __call__(self, captions):
        full = self.tokenizer(captions, padding=True, return_tensors="pt")
        for caption, n in zip(captions, full["attention_mask"].sum(1).tolist()):
            if n > self.max_tokens and caption not in self.warned:
                self.warned.add(caption)
                print(f"warning: caption of {n} tokens truncated to {self.max_tokens}: {caption[:60]!r}...",
                      file=sys.stderr)
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        states = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return states.float(), tok["attention_mask"].bool()


def load_text_encoder(spec, device="cpu", t5_path=None):
    """Rebuild the text encoder a checkpoint was trained with (t5_path overrides where T5 is read from)."""
    if spec["kind"] == "words":
        return WordEncoder(device=device)
    return T5TextEncoder(t5_path or spec["name"], spec.get("max_tokens", 256), device)


# ------------------------------------------------------------------------------------------------
# The preprocessed token dataset


class TokenDataset:
    """A preprocessed folder (see the module docstring): example i -> codes (9, 2584) int64, with
    the special id after the clip's end, and its caption."""

    def __init__(self, folder):
        store = ClipStore(folder, create=False)
        self.index = store.committed_index()
        if not self.index:
            raise SystemExit(f"{folder}: no preprocessed clips (run: python data.py --audio DIR --captions FILE --out {folder})")
        self.codes = np.memmap(store.codes_path, dtype=np.uint16, mode="r", shape=(len(self.index), N_CODEBOOKS, CLIP_FRAMES))
        self.n_frames = CLIP_FRAMES

    def __len__(self):
        return len(self.index)

    def example(self, i):
        return torch.from_numpy(self.codes[i].astype(np.int64)), self.index[i]["caption"]

    def batch(self, indices):
        examples = [self.example(int(i)) for i in indices]
        return torch.stack([c for c, _ in examples]), [t for _, t in examples]


class ClipStore:
    """The output folder of preprocessing: append-only codes + index, committed per audio file."""

    def __init__(self, folder, create=True, meta=None):
        self.folder = folder
        self.codes_path = os.path.join(folder, "codes.u16")
        self.index_path = os.path.join(folder, "index.jsonl")
        self.sources_path = os.path.join(folder, "sources.jsonl")
        self.row_bytes = N_CODEBOOKS * CLIP_FRAMES * 2
        if not os.path.isdir(folder):
            if not create:
                raise SystemExit(f"{folder}: no such data folder")
            os.makedirs(folder)
        meta_path = os.path.join(folder, "meta.json")
        if meta is not None:
            if os.path.exists(meta_path):
                old = json.load(open(meta_path))
                if old != meta:
                    raise SystemExit(f"{folder} was made with other settings ({old}); use a new --out")
            else:
                atomic_write_text(meta_path, json.dumps(meta, indent=1))
        self._repair()

    @staticmethod
    def _read_jsonl(path):
        if not os.path.exists(path):
            return []
        rows = []
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):  # a line without its newline was cut by a crash: not committed
                    rows.append(json.loads(line))
        return rows

    def committed_index(self):
        return self._read_jsonl(self.index_path)

    def _repair(self):
        """Drop what an interruption left half-written: a partial last line, codes without index."""
        for path in (self.index_path, self.sources_path):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read()
                keep = data[:data.rfind(b"\n") + 1]
                if len(keep) != len(data):
                    with open(path, "wb") as f:
                        f.write(keep)
        n = len(self.committed_index())
        if os.path.exists(self.codes_path) and os.path.getsize(self.codes_path) != n * self.row_bytes:
            with open(self.codes_path, "r+b") as f:
                f.truncate(n * self.row_bytes)

    def done_sources(self):
        return {r["source"] for r in self._read_jsonl(self.sources_path) if r["status"] != "error"}

    def commit(self, source, clips, status):
        """clips: list of (codes (9, frames) uint16-able, index row dict). Codes first (fsync), then
        the index lines in one write, then the source's line."""
        with open(self.codes_path, "ab") as f:
            for codes, _ in clips:
                row = np.full((N_CODEBOOKS, CLIP_FRAMES), SPECIAL, dtype=np.uint16)
                row[:, :codes.shape[1]] = codes
                f.write(row.tobytes())
            f.flush()
            os.fsync(f.fileno())
        for path, lines in ((self.index_path, [r for _, r in clips]), (self.sources_path, [{"source": source, **status}])):
            if lines:
                with open(path, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in lines))
                    f.flush()
                    os.fsync(f.fileno())


def atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Preprocessing: audio files -> clips -> DAC codes


def read_captions(path):
    """{relative audio path: caption} from JSONL ({"audio", "caption"} per line) or CSV (audio,caption)."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: captions file not found")
    rows = []
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"audio", "caption"} <= set(reader.fieldnames):
                raise SystemExit(f"{path}: a CSV captions file needs a header row with columns audio,caption")
            rows = list(reader)
        else:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from None
    captions = {}
    for n, r in enumerate(rows, 1):
        if not r.get("audio") or not str(r.get("caption", "")).strip():
            raise SystemExit(f"{path}: entry {n} needs a non-empty 'audio' and 'caption'")
        captions[r["audio"]] = r["caption"].strip()
    return captions


def load_audio(path):
    """Any file libsndfile reads -> mono float32 at 44.1 kHz (resampled by soxr)."""
    import soundfile as sf
    import soxr
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    if audio.size == 0:
        raise ValueError("no audio samples")
    mono = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


def split_clips(audio):
    """Non-overlapping 30 s clips: [(start_seconds, samples)], the last kept if >= 10 s."""
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    clips = []
    for start in range(0, len(audio), n):
        clip = audio[start:start + n]
        if len(clip) >= MIN_CLIP_SECONDS * SAMPLE_RATE:
            clips.append((start / SAMPLE_RATE, clip))
    return clips


def silent_seconds(clip):
    w = int(SILENCE_WINDOW_S * SAMPLE_RATE)
    frames = clip[:len(clip) // w * w].reshape(-1, w)
    rms_db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-20)
    return float(np.sum(rms_db < SILENCE_DBFS) * SILENCE_WINDOW_S)


def too_silent(clip):
    return silent_seconds(clip) > min(MAX_SILENCE_S, len(clip) / SAMPLE_RATE / 2)


def load_dac(name_or_path="descript/dac_44khz", device="cpu"):
    """DAC 44.1 kHz through transformers.DacModel (the same weights as descript-audio-codec)."""
    from transformers import DacModel
    try:
        return DacModel.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)
    except OSError as e:
        raise SystemExit(f"could not load DAC {name_or_path!r} ({str(e).splitlines()[0]}); without internet, "
                         "download it elsewhere and pass its local folder (--dac PATH)") from None


def tiny_dac_config():
    """A DAC of the real layout (9 codebooks of 1024 x 8, hop 512, 44.1 kHz) with tiny convs."""
    from transformers import DacConfig
    return DacConfig(encoder_hidden_size=4, hidden_size=64, decoder_hidden_size=16, n_codebooks=N_CODEBOOKS,
                     codebook_size=1024, codebook_dim=8, downsampling_ratios=[2, 4, 8, 8],
                     upsampling_ratios=[8, 8, 4, 2], sampling_rate=SAMPLE_RATE)


def synthetic_codec(seed=0, device="cpu"):
    """The synthetic set's codec: a seeded random tiny DAC whose fine codebooks are arranged like
    an RVQ's, correlated with the first: the entry of codebook k for the code fine_codes gives
    after code i of codebook 1 is a fixed linear map of codebook 1's entry i. So the latents that
    stage 2 works on have structure to learn. What its decoder makes of codes is noise, not music."""
    from transformers import DacModel
    torch.manual_seed(seed)
    dac = DacModel(tiny_dac_config()).eval().requires_grad_(False)
    books = [q.codebook.weight for q in dac.quantizer.quantizers]
    fine = torch.from_numpy(fine_codes(np.arange(1024)))  # (8, 1024): code of codebook k+1 after code i
    for k in range(1, N_CODEBOOKS):
        books[k][fine[k - 1]] = books[0] @ (torch.randn(8, 8) / math.sqrt(8)).T
    return dac.to(device)


def load_codec(spec, device="cpu", path=None):
    """The codec a checkpoint names: {"kind": "synthetic"} or {"kind": "dac", "name": ...} (path overrides)."""
    if spec["kind"] == "synthetic":
        return synthetic_codec(device=device)
    return load_dac(path or spec["name"], device)


@torch.no_grad()
def encode_clips(dac, clips, device):
    """Equal-length mono clips (list of arrays) -> codes (n, 9, frames) uint16."""
    x = torch.from_numpy(np.stack(clips)).to(device)[:, None]
    pad = -x.shape[-1] % HOP
    x = torch.nn.functional.pad(x, (0, pad))
    codes = dac.encode(x).audio_codes  # (n, 9, frames)
    return codes.cpu().numpy().astype(np.uint16)


class VocalRemover:
    """HTDemucs: keep drums + bass + other, drop vocals (needs `pip install demucs`)."""

    def __init__(self, device):
        try:
            from demucs.apply import apply_model
            from demucs.pretrained import get_model
        except ImportError:
            raise SystemExit("--remove-vocals needs the demucs package: pip install demucs") from None
        self.apply_model, self.device = apply_model, device
        self.model = get_model("htdemucs").to(device).eval()

    @torch.no_grad()
    def __call__(self, mono):
        stereo = torch.from_numpy(mono)[None, None].expand(1, 2, -1).to(self.device)
        stems = self.apply_model(self.model, stereo, device=self.device)[0]  # (sources, 2, n)
        keep = [i for i, s in enumerate(self.model.sources) if s != "vocals"]
        return stems[keep].sum(0).mean(0).cpu().numpy().astype(np.float32)


def preprocess(audio_dir, captions_file, out, dac_name="descript/dac_44khz", batch_size=8, device=None,
               remove_vocals=False, dac=None, progress=True):
    """Audio folder + captions -> token folder (see the module docstring). Returns the list of
    (file, reason) that could not be read."""
    from tqdm import tqdm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    captions = read_captions(captions_file)
    if not os.path.isdir(audio_dir):
        raise SystemExit(f"{audio_dir}: audio folder not found")
    meta = {"sample_rate": SAMPLE_RATE, "n_codebooks": N_CODEBOOKS, "clip_frames": CLIP_FRAMES,
            "dac": dac_name, "remove_vocals": remove_vocals}
    store = ClipStore(out, meta=meta)
    done = store.done_sources()
    todo = [a for a in captions if a not in done]
    bad_ext = [a for a in todo if not a.lower().endswith(AUDIO_EXTENSIONS)]
    errors = [(a, f"not one of {', '.join(AUDIO_EXTENSIONS)}") for a in bad_ext]
    todo = [a for a in todo if a not in bad_ext]
    print(f"{len(captions)} captioned files: {len(done)} already done, {len(todo)} to do", file=sys.stderr)
    if not todo:
        return errors
    remover = VocalRemover(device) if remove_vocals else None
    n_clips = len(store.committed_index())
    for source in tqdm(todo, desc="encoding", unit="file", disable=not progress):
        try:
            audio = load_audio(os.path.join(audio_dir, source))
        except Exception as e:  # unreadable, corrupt, missing: report at the end, go on
            errors.append((source, f"{type(e).__name__}: {e}"))
            store.commit(source, [], {"status": "error", "reason": str(e)[:200]})
            continue
        if remover:
            audio = remover(audio)
        clips = [(s, c) for s, c in split_clips(audio) if not too_silent(c)]
        if clips and dac is None:  # loaded only once a file has something to encode
            dac = load_dac(dac_name, device)
        rows = []
        for length in sorted({len(c) for _, c in clips}):
            same = [(s, c) for s, c in clips if len(c) == length]
            for i in range(0, len(same), batch_size):
                part = same[i:i + batch_size]
                codes = encode_clips(dac, [c for _, c in part], device)
                frames = math.ceil(length / HOP)
                for (start, _), cb in zip(part, codes):
                    rows.append((cb[:, :frames], {"source": source, "start_s": start, "frames": frames,
                                                  "caption": captions[source]}))
        rows.sort(key=lambda r: r[1]["start_s"])
        store.commit(source, rows, {"status": "ok", "clips": len(rows), "dropped": len(split_clips(audio)) - len(rows)})
        n_clips += len(rows)
    print(f"done: {n_clips} clips in {out}", file=sys.stderr)
    return errors


def main():
    ap = argparse.ArgumentParser(description="Audio + captions -> DAC tokens (see the module docstring).")
    ap.add_argument("--audio", required=True, help="folder of audio files")
    ap.add_argument("--captions", required=True, help="JSONL or CSV mapping audio path (relative to --audio) to caption")
    ap.add_argument("--out", required=True, help="output folder (rerun to resume)")
    ap.add_argument("--dac", default="descript/dac_44khz", help="DAC model name or local folder")
    ap.add_argument("--batch-size", type=int, default=8, help="clips per DAC batch")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--remove-vocals", action="store_true", help="remove vocals with HTDemucs first (pip install demucs)")
    args = ap.parse_args()
    errors = preprocess(args.audio, args.captions, args.out, args.dac, args.batch_size, args.device, args.remove_vocals)
    if errors:
        print(f"{len(errors)} file(s) skipped:", file=sys.stderr)
        for name, reason in errors:
            print(f"  {name}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
