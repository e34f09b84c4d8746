"""Data for ssmttm: audio + captions -> DAC tokens, datasets, text encoders, and a synthetic set.

Real data (paper, section III-C), preprocessed once:

    python data.py --audio DIR --captions captions.jsonl --out data/jamendo [--dac PATH] [--remove-vocals]

  captions: JSONL, one object per line, path relative to --audio:
      {"audio": "rock/track01.mp3", "caption": "An energetic rock track with distorted guitars."}
  or CSV with a header row `audio,caption` (quote a caption that holds a comma); UTF-8, with or
  without a byte-order mark. Paths are normalised ("./a.wav" is "a.wav"). A file listed several
  times is encoded once and keeps each of its distinct captions (TokenDataset.example(i, epoch)
  takes them in turn); the repeats are reported. wav, flac, ogg and mp3 are read (libsndfile).

  Each file is mixed to mono, resampled to 44.1 kHz (soxr), optionally stripped of vocals
  (HTDemucs), cut into non-overlapping 30 s clips (a last partial clip is kept if it lasts at least
  10 s), and clips that are mostly silent are dropped: a 50 ms window is silent when its RMS is
  below -60 dBFS, and a clip goes when more than 15 s (or more than half of a shorter clip) is
  silent. The clips are encoded by DAC 44.1 kHz (checked when loaded: 44100 Hz, hop 512, 9
  codebooks of 1024) into 9 x 2584 codes. A file that is missing, unreadable, empty or damaged,
  sampled below 8 kHz, or has NaN or infinite samples or samples beyond +-100 (MAX_AMPLITUDE), is
  skipped and listed at the end (the run then exits with code 2, the other
  files committed); a rerun tries it again. The summary also
  counts the clips dropped as silent and names the files too short for a clip.

  The output folder:
    clips.u16    uint16 [N, 9, 2584], one row per clip, padded with the special id 1024 (memory-mapped)
    files.jsonl  the journal, one line per finished audio file and the only record of what is done:
                 {"source": "rock/track01.mp3", "row": 12, "clips": [{"start_s": 0.0, "frames": 2584},
                  ...], "captions": ["..."], "seconds": 75.2, "silent": 1}
                 its clips are rows row, row + 1, ... of clips.u16; "silent": clips dropped as silent
    meta.json    the settings (codec name, clip length, vocal removal), written with the first commit

  One commit per audio file: its rows are appended to clips.u16 and fsynced, then its record is
  appended to files.jsonl in one write and fsynced; that line is the commit point. A reader
  (TokenDataset) takes the whole journal lines and their rows and never writes, so it may open a
  folder that data.py is still writing. The writer locks the folder (a second data.py on it is
  refused) and on opening drops what an interrupted run left after its last commit (a cut journal
  line, rows). So a crash, kill -9 or Ctrl-C loses at most the file in progress, and a rerun
  encodes each remaining file once. The settings may change until a first file is committed; then
  a rerun with other settings is refused.

  Folders of the layout before the journal (codes.u16 + index.jsonl, one line per clip) are still
  read for training, each clip once; data.py does not add to them (preprocess into a new --out).

  --out is a new or empty folder, or one of data.py's (a rerun resumes it): a folder with other
  files in it is refused. Bad input (the captions file or one of its lines, a folder, an argument, a
  codec of another layout) stops with one line naming it on stderr and exit code 2.

Synthetic data (the default of train.py; no download): `SyntheticMusic` makes token "music" whose
caption sets rules the tokens follow, `WordEncoder` stands in for T5, and `caption_score` measures
how well codes follow their caption (our offline stand-in for the CLAP score).
"""
import argparse
import codecs
import csv
import contextlib
import decimal
import io
import json
import math
import os
import shlex
import sys
import zlib

import numpy as np
import torch

from ssmttm import as_codes, check_integer  # (ssmttm imports nothing of the project's but ssd_reference)

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
# Bad input: one line naming the culprit, exit code 2, no traceback


class BadInput(SystemExit):
    """Bad input (a file, a line of it, an argument). Raised by fail(), which has already printed
    the message to stderr; uncaught, it ends the process with exit code 2 and no traceback (it is
    a SystemExit). str(error) is the message."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(message):
    print(message, file=sys.stderr)
    raise BadInput(message)


def first_line(error):
    """The first line of an exception's message, for a one-line report; its type's name where the message
    is empty (a damaged pickle's MemoryError(), an assert without a text), so that no report of a bad file
    becomes an IndexError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Command lines (data.py, train.py, generate.py, bench.py): a bad flag is reported the way argparse
# reports it, "PROG: error: argument --FLAG: expected ..., not 'VALUE'", but as that one line, without
# the usage lines, and exit code 2 (fail). Values are checked where they are parsed (the type=
# functions below), so nothing runs with a value that would crash or silently misbehave later.


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage banner) and exit code 2, through fail()."""

    def error(self, message):
        fail(f"{self.prog}: error: {message}")


def _bounds(lo, hi, lo_open=False, hi_open=False):
    """' from 0 to 1', ' of at least 1', ' above 0 and at most 3600', ... (for messages)."""
    show = lambda x: f"{x:g}" if isinstance(x, float) else str(x)
    if lo is not None and hi is not None and not (lo_open or hi_open):
        return f" from {show(lo)} to {show(hi)}"
    parts = ([f"{'above' if lo_open else 'of at least'} {show(lo)}"] if lo is not None else []) + \
            ([f"{'below' if hi_open else 'at most'} {show(hi)}"] if hi is not None else [])
    return " " + " and ".join(parts) if parts else ""


def whole_number(lo=None, hi=None):
    """An argparse type: an integer from lo to hi (None: no bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected a whole number{_bounds(lo, hi)}, not {text!r}")
        return value
    return parse


def _nonzero(text):
    """Whether text, which float() reads, writes a number other than zero (exactly, as a decimal)."""
    try:
        return decimal.Decimal(text.strip()) != 0
    except (decimal.InvalidOperation, ValueError):
        return False


def number(lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite float from lo to hi (lo_open / hi_open: that end excluded; None: no
    bound). NaN and infinities never pass: they would run, and give NaN or nothing."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if value == 0 and _nonzero(text):  # 1e-400: 0.0 would pass as 0, which may mean off, greedy or one pass
            raise argparse.ArgumentTypeError(f"expected a finite number{_bounds(lo, hi, lo_open, hi_open)}, "
                                             f"not {text!r}, which is too small for a float and reads as 0")
        bad = (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected a finite number{_bounds(lo, hi, lo_open, hi_open)}, "
                                             f"not {text!r}")
        return value
    return parse


positive_int = whole_number(1)
MAX_SEED = 2**31 - 1
SEED = whole_number(0, MAX_SEED)  # numpy's legacy seeding takes up to 2**32 - 1 (with a rank added)


def path_name(text):
    """An argparse type: a file or folder name. '' (an unset shell variable, "$CKPT") is refused: taken as the
    flag left out, it would train from scratch, continue nothing or pick another checkpoint without a word."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file or folder name, not ''")
    return text


def shell_flag(flag, value):
    """flag and value as a shell reads them back, for a command printed to be run again: the value quoted
    where it holds spaces, quotes or $ ('--out runs/my run' gave --out runs/my and a stray argument
    'run'), and joined by = where it begins with a dash (argparse takes '--out -x' for two flags)."""
    value = str(value)
    return shlex.quote(f"{flag}={value}") if value.startswith("-") else f"{flag} {shlex.quote(value)}"


def device_name(text):
    """An argparse type: auto, cpu, cuda or cuda:N; cuda only where torch sees a CUDA device, N
    one of those it sees."""
    kind, colon, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, not {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but torch sees no CUDA device here")
    if colon and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}, but torch sees {plural(torch.cuda.device_count(), 'CUDA device')}"
                                         " here (cuda:0 is the first)")
    return text


def resolve_device(name):
    """A --device value (see device_name) as a torch device name: "auto" (or None) is "cuda" where
    torch sees a CUDA device, else "cpu"; any other name is returned as it is."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_out_folder(path, flag="--out"):
    """BadInput naming `flag` unless path is a folder that takes new files, or one can be made there
    (its nearest existing parent is such a folder), so that a run stops before its work, not after.
    Makes nothing: a run that stops on another error leaves no folder behind."""
    if not path or "\0" in path:
        fail(f"{flag} {path!r}: not a folder name")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        if os.path.islink(existing):  # os.makedirs would say "File exists"
            fail(f"{flag} {path}: {'it' if existing == os.path.abspath(path) else existing} is a symbolic link to "
                 f"{os.readlink(existing)}, which leads nowhere (its target is missing, or the links make a loop)")
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"{flag} {path}: {'it' if existing == os.path.abspath(path) else existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: cannot write in {existing}")


def make_folder(path, flag="--out"):
    """os.makedirs(path, exist_ok=True) after check_out_folder's checks, the name of each level it makes synced
    to disk; BadInput naming `flag` if it fails."""
    check_out_folder(path, flag)
    new = []  # the levels os.makedirs makes, innermost first
    level = os.path.abspath(path)
    while not os.path.isdir(level):
        new.append(level)
        level = os.path.dirname(level)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}: cannot make this folder ({e.strerror})")
    for level in reversed(new):  # each new name on disk, outermost first, before files in it count on it
        fsync_dir(os.path.dirname(level))


def plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def some(names, n=5):
    """The first n names, then how many more: 'a.wav, b.wav, ... (12 more)'."""
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


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
    in the scale; codebooks 2..9 follow from codebook 1 (fine_codes). TypeError for an n_frames that is
    not an integer, ValueError for one below 1."""

    def __init__(self, n_frames=128, seed=0):
        check_integer("SyntheticMusic: n_frames", n_frames, 1)
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

    def batch(self, indices, epochs=0):
        """Examples `indices` stacked: codes (b, 9, n_frames), captions. epochs: ignored (every
        example of the endless set is new), taken for TokenDataset.batch's signature."""
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
    with K = 9 also: codebooks 2..9 equal fine_codes(codebook 1). Random codes score about 0.26 with
    K = 1 and 0.19 with K = 9 (the fine rule and the tempo rule score about 0 for them); a caption
    without rule words scores 0 (K = 1). ValueError for codes of another shape or no frames (T = 0).
    codes: a torch tensor, numpy array or list of ints; TypeError, as ssmttm.as_codes, unless their dtype is
    int16, int32 or int64 (a bool mask scored as the ids 0 and 1, uint8 codes overflowed on fine_codes'
    1024, floats are no ids)."""
    codes = as_codes("caption_score: codes", codes if isinstance(codes, torch.Tensor)
                     else torch.as_tensor(np.asarray(codes))).cpu().numpy()
    if codes.ndim != 2 or codes.shape[0] not in (1, N_CODEBOOKS) or codes.shape[1] < 1:
        raise ValueError(f"caption_score: codes {codes.shape}: want (1, T) or ({N_CODEBOOKS}, T), T >= 1")
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
        """captions: a list of texts (a str is refused with TypeError, not read as one caption per character;
        an empty list with ValueError) -> states (b, L, dim) float32, mask (b, L) bool."""
        if isinstance(captions, str):
            raise TypeError(f"WordEncoder: captions {captions[:40]!r}: want a list of texts, not a str")
        if len(captions) == 0:
            raise ValueError("WordEncoder: no captions: want a list of at least one text")
        words = [c.lower().replace(",", " ").split() or [""] for c in captions]
        L = max(len(w) for w in words)
        states = torch.zeros(len(captions), L, self.dim)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            states[i, :len(ws)] = torch.stack([self.vector(w) for w in ws])
            mask[i, :len(ws)] = True
        return states.to(self.device), mask.to(self.device)


class T5TextEncoder:
    """Frozen Flan-T5 encoder (T5EncoderModel + its tokenizer), from a hub name or a local folder,
    computing in fp32. Captions longer than max_tokens are truncated, with a warning. width: the
    states' width the model reads (its config's d_text, 768 for Flan-T5-base); BadInput naming the
    encoder if it gives another (flan-t5-small's 512, say). None: not checked."""

    def __init__(self, name_or_path="google/flan-t5-base", max_tokens=256, device="cpu", width=None):
        from transformers import AutoTokenizer, T5EncoderModel
        def check_width(config):
            if width is not None and config.d_model != width:
                fail(f"the T5 text encoder {str(name_or_path)!r} gives states {config.d_model} wide, and the "
                     f"model reads {width} (Flan-T5-base's width); pass that encoder (--t5 PATH)")
        self.model = from_pretrained(T5EncoderModel, name_or_path, "the T5 text encoder", "--t5", check_width)
        self.tokenizer = from_pretrained(AutoTokenizer, name_or_path, "the T5 text encoder", "--t5")
        # fp32 whatever dtype the folder stores: T5's activations overflow fp16, and the states are
        # the model's input, so they should not depend on how someone saved the weights.
        self.model = self.model.float().to(device).eval().requires_grad_(False)
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


def from_pretrained(cls, name_or_path, what, flag, check_config=None):
    """cls.from_pretrained(name_or_path): a hub name or a local folder. BadInput naming `what` when
    it cannot be loaded, with the way out: a local folder passed by `flag`. check_config: called with
    the model's config (cls.config_class) before the weights load, to refuse another layout fast and
    in one line (transformers prints a progress bar as it loads weights)."""
    check_model_folder(name_or_path, getattr(getattr(cls, "config_class", None), "model_type", None), what, flag)

    def load(loader):
        try:
            return loader.from_pretrained(name_or_path)
        except Exception as e:  # not found (OSError), a folder cut short or damaged (safetensors', tokenizers' errors)
            fail(f"could not load {what} {name_or_path!r} ({first_line(e)}); "
                 f"without internet, download it elsewhere and pass its local folder ({flag} PATH)")
    if check_config is not None:
        check_config(load(cls.config_class))
    return load(cls)


def model_folder_problem(name_or_path, model_type, flag):
    """What is wrong with name_or_path as a model to load, or None: a local path (absolute, or relative
    from ".") that is not there, a file, a local folder without config.json, or one whose config.json names
    another kind of model than model_type ("t5", "dac", "clap"; None: any kind) or none (a train.py run's):
    from_pretrained would build those last two from a default config. Cheap, so that command lines check their models
    before any work: from_pretrained would load another kind's folder anyway, print a report of every
    weight it lacks, and leave a model of random weights or a late error. A name that is no local path
    is a hub name, for from_pretrained to find."""
    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        return "a file, not a model's folder"
    if (os.path.isabs(name_or_path) or name_or_path.startswith(".")) and not os.path.isdir(name_or_path):
        return "no such local folder"
    config = os.path.join(name_or_path, "config.json")
    if os.path.isdir(name_or_path) and not os.path.isfile(config):  # from_pretrained would read a default config
        return f"a folder without config.json, not a model's folder; pass the model's folder ({flag} PATH)"
    if not model_type:
        return None
    try:
        with open(config) as f:
            found = parse_json(f.read()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # from_pretrained names a damaged config itself
    if found and found != model_type:
        return (f"a {found} model's folder (its config.json), not {model_type}; pass the {model_type} model's "
                f"folder ({flag} PATH)")
    if not found:  # a train.py run's config.json, say: from_pretrained would fill in a default config
        return (f"a folder whose config.json names no model_type, not a {model_type} model's; pass the {model_type} "
                f"model's folder ({flag} PATH)")
    return None


def check_model_folder(name_or_path, model_type, what, flag):
    """BadInput "<what> '<name_or_path>': <problem>" when model_folder_problem finds one."""
    problem = model_folder_problem(name_or_path, model_type, flag)
    if problem:
        fail(f"{what} {name_or_path!r}: {problem}")


def load_text_encoder(spec, device="cpu", t5_path=None, width=None):
    """Rebuild the text encoder a checkpoint was trained with (t5_path overrides where T5 is read from;
    width: as T5TextEncoder's)."""
    if spec["kind"] == "words":
        return WordEncoder(device=device)
    return T5TextEncoder(t5_path or spec["name"], spec.get("max_tokens", 256), device, width)


# ------------------------------------------------------------------------------------------------
# The preprocessed folder: code rows + a journal with one commit line per audio file

CODES_FILE, JOURNAL_FILE, META_FILE = "clips.u16", "files.jsonl", "meta.json"
DEFAULT_DAC = "descript/dac_44khz"  # the 44.1 kHz, 9-codebook DAC the paper uses
LEGACY_CODES, LEGACY_INDEX = "codes.u16", "index.jsonl"  # the layout before the journal
DATA_FILES = {CODES_FILE, JOURNAL_FILE, META_FILE, META_FILE + ".tmp"}  # all that data.py writes in --out
ROW_BYTES = N_CODEBOOKS * CLIP_FRAMES * 2


# What train.py writes in a checkpoint, by type: the programs index into these fields, so that a list or
# a text there (a checkpoint edited, or another program's) was a TypeError or KeyError deep inside them.
CHECKPOINT_FIELDS = {"model": dict, "config": dict, "args": dict, "text_encoder": dict,
                     "optimizer": dict, "scheduler": dict, "rng": list}
SPEC_KINDS = {"text_encoder": ("words", "t5"), "codec": ("synthetic", "dac")}


def checkpoint_problem(ckpt):
    """What makes the fields a loaded checkpoint (a dict) has unusable, or None: one of CHECKPOINT_FIELDS of
    another type, a step that is no whole number, seconds (elapsed_s) that are no number of 0 or more, a text
    encoder or codec (None: stage 1's) of no known kind, or a training length (args' frames) that is no whole
    number. Which fields it must have, each program says itself."""
    for key, kind in CHECKPOINT_FIELDS.items():
        if key in ckpt and not isinstance(ckpt[key], kind):
            return f"its {key} is {JSON_KINDS.get(type(ckpt[key]), type(ckpt[key]).__name__)}, not {JSON_KINDS[kind]}"
    if "step" in ckpt and not (isinstance(ckpt["step"], int) and not isinstance(ckpt["step"], bool)
                               and ckpt["step"] >= 0):
        return f"its step is {ckpt['step']!r}, not a whole number"
    for key, kinds in SPEC_KINDS.items():
        spec = ckpt.get(key)
        if key in ckpt and not (spec is None and key == "codec") and (
                not isinstance(spec, dict) or spec.get("kind") not in kinds):
            return f"its {key} is {spec!r}, not one of kind {' or '.join(kinds)}"
    elapsed = ckpt.get("elapsed_s", 0.0)  # train.py's seconds as of the step; checkpoints saved before it lack it
    if not (_is_number(elapsed) and math.isfinite(elapsed) and elapsed >= 0):
        return f"its elapsed_s is {elapsed!r}, not a number of seconds"
    frames = ckpt.get("args", {}).get("frames")
    if frames is not None and not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1):
        return f"its args' frames is {frames!r}, not a whole number"
    return None


def make_config(config_class, config, where):
    """config_class(**config), a checkpoint's model config; BadInput naming `where` when it is not one."""
    try:
        return config_class(**config)
    except (TypeError, ValueError) as e:
        fail(f"{where}: its config and weights do not make a model ({first_line(e)[:200]})")


def load_weights(model, state, where):
    """model.load_state_dict(state), a checkpoint's weights; BadInput naming `where` when they do not fit
    the model (a key missing, left over or of another shape) or hold NaN or infinite values (a run that
    diverged: the model would load and then make noise, or train on NaN, without a word)."""
    try:
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        fail(f"{where}: its config and weights do not make a model ({first_line(e)[:200]})")
    bad = next((name for name, value in state.items()
                if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()), None)
    if bad is not None:
        fail(f"{where}: its weights hold NaN or infinite values ({bad}); a run that diverged?")


def model_location(name_or_path):
    """A model's hub name as it is, a local folder as an absolute path: where a checkpoint can find it
    again from any working directory."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def data_codec(folder):
    """The DAC a preprocessed folder was encoded with (its meta.json's "dac"), or DEFAULT_DAC when it
    does not say (a folder of the earlier layout, or none yet). BadInput naming meta.json when it is
    damaged (folder_settings) or its "dac" is no name: a default in its place would train on the
    folder's codes and record another codec, and generate.py would decode them with it."""
    settings = folder_settings(folder)
    name = settings.get("dac", DEFAULT_DAC)
    if not (isinstance(name, str) and name):
        fail(f'{os.path.join(folder, META_FILE)}: its "dac" is {json.dumps(name)}, not the name or folder of a '
             "codec; this folder cannot be trusted, preprocess into a new --out")
    return name


def folder_settings(folder):
    """The settings of a preprocessed folder's meta.json, {} where it has none (no file yet, or the
    earlier layout's folder). BadInput naming the file when it is damaged (not JSON, not an object):
    there are no settings to go by, and none may stand in for them without a word."""
    path = os.path.join(folder, META_FILE)
    try:
        with open(path, "rb") as f:
            settings = parse_json(f.read())
        damage = None if isinstance(settings, dict) else JSON_KINDS[type(settings)]
    except OSError:
        return {}
    except ValueError as e:
        damage = str(e)
    if damage:
        fail(f"{path}: not data.py's settings ({damage}); this folder cannot be trusted, preprocess into a new --out")
    return settings


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_clip_frames(v):
    """Whether v is a clip's length in frames as data.py writes it: a whole number from 1 to CLIP_FRAMES."""
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= CLIP_FRAMES


def read_journal(folder):
    """The committed records of a folder's journal, read-only: (records, committed_bytes).
    A record: {"source", "row", "clips": [{"start_s", "frames"}], "captions", "seconds", "silent"}.
    Only whole lines count: a last line without its newline was cut by a crash. Raises BadInput
    when a whole line is not a record that follows the one before, or clips.u16 lacks rows that a
    record names."""
    path = os.path.join(folder, JOURNAL_FILE)
    with open(path, "rb") as f:
        data = f.read()
    committed = data[:data.rfind(b"\n") + 1]
    records, rows = [], 0
    for n, line in enumerate(committed.split(b"\n")[:-1], 1):
        try:
            record = parse_json(line)
            valid = (record["row"] == rows and isinstance(record["source"], str) and isinstance(record["clips"], list)
                     and all(isinstance(c, dict) and _is_number(c.get("start_s")) and _is_clip_frames(c.get("frames"))
                             for c in record["clips"])
                     and isinstance(record["captions"], list) and len(record["captions"]) > 0
                     and all(isinstance(t, str) for t in record["captions"]))
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            fail(f"{path}:{n}: damaged record; this folder cannot be trusted, preprocess into a new --out")
        records.append(record)
        rows += len(record["clips"])
    codes_path = os.path.join(folder, CODES_FILE)
    size = os.path.getsize(codes_path) if os.path.exists(codes_path) else 0
    if size < rows * ROW_BYTES:
        fail(f"{codes_path}: holds {size // ROW_BYTES} clips but {path} commits {rows}; "
             "this folder cannot be trusted, preprocess into a new --out")
    return records, len(committed)


def committed_clips(folder):
    """The clips a folder holds, read-only (nothing is written, so data.py may be writing the
    folder meanwhile): ([{"source", "start_s", "frames", "captions", "row"}], path of the codes)."""
    if not os.path.isdir(folder):
        fail(f"{folder}: no such data folder")
    if os.path.exists(os.path.join(folder, JOURNAL_FILE)):
        records, _ = read_journal(folder)
        clips = [{"source": r["source"], **clip, "captions": r["captions"], "row": r["row"] + j}
                 for r in records for j, clip in enumerate(r["clips"])]
        return clips, os.path.join(folder, CODES_FILE)
    if os.path.exists(os.path.join(folder, LEGACY_INDEX)):
        return legacy_clips(folder)
    return [], None


def committed_rows(clips):
    """How many code rows the clips of committed_clips span: a prefix of the folder's rows names the
    same clips whatever data.py commits later."""
    return max((clip["row"] for clip in clips), default=-1) + 1


def legacy_clips(folder):
    """A folder of the layout before the journal (codes.u16 + index.jsonl, one line per clip),
    read-only: the whole index lines that have their code rows. A clip listed twice (that layout
    re-encoded a file whose run stopped between its two files) counts once."""
    codes_path, index = os.path.join(folder, LEGACY_CODES), os.path.join(folder, LEGACY_INDEX)
    with open(index, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.endswith("\n")]
    n = min(len(lines), os.path.getsize(codes_path) // ROW_BYTES if os.path.exists(codes_path) else 0)
    clips, seen = [], set()
    for row, line in enumerate(lines[:n]):
        try:
            r = parse_json(line)
            key = (r["source"], r["start_s"])
            clip = {"source": r["source"], "start_s": r["start_s"], "frames": r["frames"],
                    "captions": [r["caption"]], "row": row}
        except (ValueError, KeyError, TypeError):
            fail(f"{index}:{row + 1}: a damaged line (not a JSON object with source, start_s, frames, caption)")
        if key not in seen:
            seen.add(key)
            clips.append(clip)
    return clips, codes_path


class TokenDataset:
    """A preprocessed folder, read-only (see the module docstring): example i -> codes (9, 2584)
    int64, with the special id after the clip's end, and a caption. It holds the clips committed
    when it was opened, or the first `rows` of them (so that a run's data stays the same while data.py
    adds clips, as it may go on writing the folder). index[i]: {"source", "start_s",
    "frames", "captions", "row"}. clips_per_track: at most this many clips of each audio file
    (clips_of_each_track, with seed; paper, section III-C: one; 0: all). BadInput for a missing,
    empty or damaged folder; TypeError for a clips_per_track or rows that is not an integer, ValueError
    for clips_per_track below 0 or rows below 1."""

    def __init__(self, folder, clips_per_track=0, seed=0, rows=None):
        if clips_per_track is not None:
            check_integer("TokenDataset: clips_per_track", clips_per_track, 0)
        self.index, codes_path = committed_clips(folder)
        if not self.index:
            fail(f"{folder}: no preprocessed clips (run: python data.py --audio DIR --captions FILE "
                 f"{shell_flag('--out', folder)})")
        if rows is not None:  # the first `rows` committed clips: what the folder held when a run began
            # (checked after the folder: a new run on a folder without clips counts 0 rows, and the
            # folder, not that count, is what to name)
            check_integer("TokenDataset: rows", rows, 1)
            held = committed_rows(self.index)
            if held < rows:
                fail(f"{folder}: holds {plural(held, 'clip')}, fewer than the {rows} that this run began with; "
                     "resume it on that data, or start a new run")
            self.index = [clip for clip in self.index if clip["row"] < rows]
        self.tracks = len({clip["source"] for clip in self.index})
        if clips_per_track:
            self.index = clips_of_each_track(self.index, clips_per_track, seed)
        n_rows = max(clip["row"] for clip in self.index) + 1
        self.codes = np.memmap(codes_path, dtype=np.uint16, mode="r", shape=(n_rows, N_CODEBOOKS, CLIP_FRAMES))
        self.codes_path, self.n_frames = codes_path, CLIP_FRAMES

    def __len__(self):
        return len(self.index)

    def example(self, i, epoch=0):
        """Clip i's codes and caption; a file with several captions gives its caption epoch % count.
        BadInput for a code above the pad id (a damaged file: the embedding would index past its end)."""
        clip = self.index[i]
        captions = clip["captions"]
        codes = self.codes[clip["row"]]
        if codes.max() > SPECIAL:
            fail(f"{self.codes_path}: clip {clip['row']} holds code {codes.max()}, above the pad id {SPECIAL}; "
                 "this folder cannot be trusted, preprocess into a new --out")
        return torch.from_numpy(codes.astype(np.int64)), captions[epoch % len(captions)]

    def batch(self, indices, epochs=0):
        """Examples `indices` stacked: codes (b, 9, 2584), captions; epochs: one epoch for all, or one
        per index (a batch may straddle two epochs)."""
        epochs = np.broadcast_to(epochs, (len(indices),))
        examples = [self.example(int(i), int(e)) for i, e in zip(indices, epochs)]
        return torch.stack([c for c, _ in examples]), [t for _, t in examples]


def clips_of_each_track(index, n, seed):
    """The clips of index (TokenDataset.index), at most n of each audio file, drawn at random (paper,
    section III-C: "we randomly select one clip per track"), in index order. A file's draw depends on
    (seed, its name) alone, so it stays the same when data.py adds other files to the folder."""
    by_track = {}
    for i, clip in enumerate(index):
        by_track.setdefault(clip["source"], []).append(i)
    keep = set()
    for source, rows in by_track.items():
        rng = np.random.default_rng([seed, zlib.crc32(source.encode("utf-8", "surrogateescape"))])
        keep.update(rng.choice(rows, min(n, len(rows)), replace=False).tolist())
    return [clip for i, clip in enumerate(index) if i in keep]


class ClipWriter:
    """The one writer of a preprocessed folder (see the module docstring); a context manager.

    Opening it creates the folder (an existing one must hold data.py's files only), takes an
    exclusive lock on it (a second writer is refused; the OS drops the lock when the process ends,
    even by kill -9), drops what an interrupted run left after its last commit (a cut journal line,
    code rows), and, once anything is committed, checks this run's settings against meta.json.
    records: the committed journal records; rows: the number of committed clips."""

    def __init__(self, folder, meta):
        if os.path.exists(folder) and not os.path.isdir(folder):
            fail(f"{folder}: exists and is not a folder")
        legacy, journal = os.path.join(folder, LEGACY_INDEX), os.path.join(folder, JOURNAL_FILE)
        if os.path.exists(legacy) and not os.path.exists(journal):
            fail(f"{folder} holds the earlier layout (codes.u16, index.jsonl): training still reads it, "
                 "but data.py no longer adds to it; preprocess into a new --out")
        # another program's folder (the audio's own, a run's) would get clips.u16 and files.jsonl among its files
        others = sorted(set(os.listdir(folder)) - DATA_FILES) if os.path.isdir(folder) else []
        if others:
            fail(f"--out {folder}: holds files that are not data.py's ({some(others, 3)}); pass a new or empty folder")
        make_folder(folder, "--out")
        self.folder, self.meta = folder, meta
        # the journal is the lock too (exclusive_lock): one data.py at a time writes a folder
        self.journal = exclusive_lock(os.path.join(folder, JOURNAL_FILE), f"{folder}: another data.py is writing to "
                                      "this folder")
        self.codes = None
        try:
            self.records, committed_bytes = read_journal(folder)
            self.rows = sum(len(r["clips"]) for r in self.records)
            try:
                self.codes = open(os.path.join(folder, CODES_FILE), "ab", buffering=0)
            except OSError as e:  # a folder of someone else's files, say
                fail(f"{os.path.join(folder, CODES_FILE)}: cannot open it to add clips ({e.strerror})")
            # Appends go to the end of the files, so first cut what was never committed.
            self.journal.truncate(committed_bytes)
            self.codes.truncate(self.rows * ROW_BYTES)
            fsync_dir(folder)  # the files' names are on disk too
            if self.records:
                self._check_meta()
        except BaseException:
            self.close()
            raise

    def _check_meta(self):
        """Settings may change while nothing is committed; after that, a run must use the folder's."""
        path = os.path.join(self.folder, META_FILE)
        old = folder_settings(self.folder)  # (a damaged one leaves no settings to compare this run's with)
        dac = old.get("dac")
        if isinstance(dac, str) and dac != self.meta.get("dac") and model_location(dac) == self.meta.get("dac"):
            # kept as typed (relative) by an earlier data.py: the same folder from here, which train.py
            # reads from any working directory once meta.json names it absolutely
            old["dac"] = self.meta["dac"]
            if old == self.meta:
                atomic_write_text(path, json.dumps(self.meta, indent=1))
        if old != self.meta:
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {self.meta.get(k)!r} now"
                             for k in sorted(set(old) | set(self.meta)) if old.get(k) != self.meta.get(k))
            fail(f"{self.folder} was made with other settings ({diff}); rerun with those or use a new --out")

    def commit(self, record, codes):
        """Commit one audio file. record: its journal record without "row" ({"source", "clips",
        "captions", "seconds", "silent"}); codes: one (9, frames) array per clip, frames its clip's
        "frames", 1 to 2584.
        The rows are appended (padded with the special id) and fsynced, the settings go to
        meta.json with the first commit, then the record is appended as one line and fsynced: the
        commit point. An exception on the way leaves an uncommitted tail, dropped on next open.
        ValueError, before anything is written, for codes not one such array per clip of the record."""
        if len(codes) != len(record["clips"]) or any(
                np.ndim(c) != 2 or c.shape[0] != N_CODEBOOKS or not 1 <= c.shape[1] <= CLIP_FRAMES
                or clip.get("frames") != c.shape[1] for c, clip in zip(codes, record["clips"])):
            frames = [clip.get("frames") for clip in record["clips"]]
            raise ValueError(f"ClipWriter.commit: {record['source']}: {plural(len(record['clips']), 'clip')} and codes "
                             f"{[np.shape(c) for c in codes]} for frames {frames}: want one ({N_CODEBOOKS}, frames) "
                             f"array per clip, frames 1 to {CLIP_FRAMES}")
        if codes:
            rows = np.full((len(codes), N_CODEBOOKS, CLIP_FRAMES), SPECIAL, dtype=np.uint16)
            for row, c in zip(rows, codes):
                row[:, :c.shape[1]] = c
            append_durably(self.codes, rows.tobytes())
        if not self.records:
            atomic_write_text(os.path.join(self.folder, META_FILE), json.dumps(self.meta, indent=1))
        record = {"source": record["source"], "row": self.rows, **record}
        append_durably(self.journal, (json.dumps(record) + "\n").encode())
        self.records.append(record)
        self.rows += len(codes)

    def close(self):
        for f in (self.codes, self.journal):
            if f is not None:
                f.close()  # closing the journal releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exclusive_lock(path, busy):
    """path opened for appending (unbuffered), with an exclusive lock that the OS drops when the process
    ends, even by kill -9; BadInput(busy) if another process holds it. Keep the file open while the lock
    is needed."""
    import fcntl  # POSIX advisory locks
    try:
        f = open(path, "ab", buffering=0)
    except OSError as e:  # a folder of that name, or a file of another user's
        fail(f"{path}: cannot open it as a lock file ({e.strerror})")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        fail(busy)
    return f


def append_durably(f, data):
    """Append bytes to a file opened unbuffered in append mode; on return they are on disk."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]  # a raw write may take less than it is given
    os.fsync(f.fileno())


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_command(main, name, resumes=True):
    """A command line's main() with Ctrl-C as one line and exit code 130 instead of a traceback.
    For the commands that commit each unit of work whole (resumes: data.py, generate.py, evaluate.py;
    train.py outside its loop, which saves the step itself): what they finished is kept, and the same
    command goes on from there. An output that cannot be written, its reader gone (`train.py | head`)
    or its disk full, stops the command as it stops a Unix tool, at its next print: one line, exit code
    1, what was committed kept. A stream closed by the caller (`2>&-`) is /dev/null for the run, as if
    it had been sent there."""
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, stream) is None:  # else the first print (or tqdm's bar) fails, and C code's
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)  # messages go into the next file opened
            setattr(sys, stream, open(fd, "w", closefd=False))
    try:
        main()
        sys.stdout.flush()  # here, not at exit: a pipe whose reader has gone fails now, and is handled
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted" + ("; what was finished is kept, and the same command goes on from there"
                                         if resumes else ""), file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a write to stdout or stderr that failed: the reader gone (| head), a full disk
        failed = failing_outputs()
        if not failed and not isinstance(e, BrokenPipeError):
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in failed or (1,):  # else their flush at exit fails again ("Exception ignored"); the others keep
            os.dup2(devnull, fd)  # what they hold
        why = ("the reader of its output has gone (broken pipe)" if isinstance(e, BrokenPipeError)
               else f"cannot write its output ({(e.strerror or str(e)).lower()})")
        with contextlib.suppress(OSError):
            os.write(2, f"{name}: {why}; stopped\n".encode())
        sys.exit(1)


def failing_outputs():
    """The descriptors (1, 2) of sys.stdout and sys.stderr whose flush fails now (a broken pipe, a full disk)."""
    failed = []
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            stream.flush()
        except (OSError, ValueError):
            failed.append(fd)
        except AttributeError:
            pass
    return failed


def out_of_memory(error):
    """The first line of the memory error that error is or was raised from (numpy's MemoryError, CUDA's
    torch.OutOfMemoryError, torch's CPU allocator's RuntimeError, C++'s std::bad_alloc as torch raises it where the
    address space is capped (ulimit -v, no overcommit); torch.compile wraps them), or None."""
    for e in (error, error.__cause__):
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or isinstance(e, RuntimeError) and (
                "can't allocate memory" in str(e) or str(e).strip() == "std::bad_alloc"):
            return first_line(e)
    return None


def disk_error(error):
    """The OSError of a write that the disk refused (full, over quota, read-only, failing) that error is or was
    raised while handling (torch.save's writer raises a RuntimeError of its own then), or None."""
    import errno
    for e in (error, error.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            return e
    return None


def atomic_write(path, write):
    """Replace a file with what write(f) writes to a binary file f, in one step: a temp file (path + ".tmp"),
    synced, renamed over path, and the folder synced, so that a kill or a power cut leaves the old file or
    the new one, whole. A write that fails (a full disk) leaves no temp file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path, data):
    """atomic_write of bytes."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    """atomic_write of text in UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ------------------------------------------------------------------------------------------------
# Preprocessing: captions + audio files -> clips -> DAC codes

def parse_json(text, only_text=False):
    """json.loads of a file (a line of it; str or UTF-8 bytes), with every way it can fail as ValueError and
    its reason: not UTF-8, not JSON (the parser's message), a number of more digits than Python converts,
    nesting deeper than the parser recurses. only_text, for what a person wrote (captions, prompts): also a
    \\uD800-\\uDFFF escape that is half a surrogate pair, which no UTF-8 text holds (the tokenizer could
    not encode it later), and a key given twice in one object (json.loads keeps the last without a
    word). The program's own files may hold such escapes: a file name that is not UTF-8 is one."""
    def unique_keys(pairs):
        keys = [k for k, _ in pairs]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise KeyError(twice)
        return dict(pairs)
    try:
        if isinstance(text, (bytes, bytearray)):  # json.loads would take UTF-16 and UTF-32 bytes too
            text = bytes(text).decode("utf-8")
        value = json.loads(text, object_pairs_hook=unique_keys if only_text else None)
    except KeyError as e:
        raise ValueError(f"the key {e.args[0]!r} is given twice") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(e.msg) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:  # int() of more than sys.get_int_max_str_digits() digits
        raise ValueError("a number too long to read") from None
    try:
        if only_text:
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"an escape \\u{ord(e.object[e.start]):04x} is half a surrogate pair, not text") from None
    return value


JSON_KINDS = {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list", dict: "an object",
              type(None): "null"}


def read_captions(path):
    """{audio path: [captions]} from JSONL ({"audio": ..., "caption": ...} per line) or CSV (a
    header row with columns audio,caption), UTF-8 with or without a byte-order mark. Paths are
    relative to the audio folder and normalised ("./a//b.wav" is "a/b.wav"). A file listed more
    than once keeps its distinct captions, in order, and the repeats are reported on stderr.
    BadInput, naming the file and line, for anything else than text in both fields."""
    text = read_utf8(path, "captions file")
    entries = csv_entries(path, text) if path.lower().endswith(".csv") else jsonl_entries(path, text)
    captions, first_line, repeats = {}, {}, []
    for line, audio, caption in entries:
        for field, value in (("audio", audio), ("caption", caption)):
            if value is None:
                fail(f"{path}:{line}: no {field}")
            if not isinstance(value, str):
                fail(f"{path}:{line}: the {field} must be text, not {JSON_KINDS[type(value)]}")
            if not value.strip():
                fail(f"{path}:{line}: the {field} is empty")
        audio = os.path.normpath(audio.strip())
        if os.path.isabs(audio):
            fail(f"{path}:{line}: the audio path must be relative to the audio folder, not {audio}")
        if audio in captions:
            repeats.append(f"line {line}: {audio} (first on line {first_line[audio]})")
            if caption.strip() not in captions[audio]:
                captions[audio].append(caption.strip())
        else:
            captions[audio], first_line[audio] = [caption.strip()], line
    if not captions:
        fail(f"{path}: no captions in it")
    if repeats:
        verb = "names" if len(repeats) == 1 else "name"
        print(f"warning: {path}: {plural(len(repeats), 'line')} {verb} an audio file again ({some(repeats, 3)}); "
              "each file is encoded once and keeps its distinct captions", file=sys.stderr)
    return captions


def file_problem(path):
    """Why path cannot be opened as a file to read, in the system's words ("not found", "is a directory",
    "permission denied", "too many levels of symbolic links", ...), or None when it can."""
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block open() until written to
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return (e.strerror or str(e)).lower()
    except ValueError:  # a NUL byte in the path
        return "not a valid path"
    return None


def read_utf8(path, what):
    """The text of a UTF-8 file (a byte-order mark is dropped). BadInput naming the file (`what` it
    is) when it is missing or cannot be read (file_problem), or naming the line of the first byte that
    is not UTF-8."""
    problem = file_problem(path)
    if problem == "not found":
        fail(f"{path}: {what} not found")
    if problem:
        fail(f"{path}: cannot read the {what} ({problem})")
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:  # e.start counts from the end of the mark
        start = bom + e.start
        line = raw[:start].count(b"\n") + 1
        fail(f"{path}:{line}: not UTF-8 (byte 0x{raw[start]:02x}); save the file as UTF-8")


def csv_entries(path, text):
    """(line number, audio, caption) per data row of a CSV captions file; a missing field is None.
    Strict CSV, one line per row: a quote left open would otherwise swallow the rows after it."""
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, last = None, 0  # last: the line the previous row ended on
    try:
        for row in rows:
            line, last = last + 1, rows.line_num
            if not any(field.strip() for field in row):
                continue
            if header is None:
                header = [name.strip() for name in row]
                if not {"audio", "caption"} <= set(header):
                    break
                check_columns(path, header, ("audio", "caption"))
                continue
            if last > line:
                fail(f"{path}:{line}: the row runs over lines {line}-{last}; a caption must be one line "
                     "(is a quote left open?)")
            if len(row) > len(header):
                fail(f"{path}:{line}: more fields than the header row; quote a caption that holds a comma")
            fields = dict(zip(header, row))
            yield line, fields.get("audio"), fields.get("caption")
    except csv.Error as e:
        fail(f"{path}:{last + 1}: not valid CSV ({e})")
    if header is None or not {"audio", "caption"} <= set(header):
        fail(f"{path}: a CSV captions file needs a header row with columns audio,caption "
             f"(found: {','.join(header or [])})")


def check_columns(path, header, read):
    """BadInput naming a column of `read` that the header row of a CSV file names twice: csv and
    dict() keep the last of two without a word, so the other's values would go unread."""
    twice = next((name for name in read if header.count(name) > 1), None)
    if twice is not None:
        fail(f"{path}: the header row names the column {twice!r} twice; which one is meant?")


def jsonl_entries(path, text):
    """(line number, audio, caption) per non-empty line of a JSONL captions file; a missing key is None."""
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        try:
            entry = parse_json(line, only_text=True)
        except ValueError as e:
            fail(f"{path}:{n}: not valid JSON ({e})")
        if not isinstance(entry, dict):
            fail(f'{path}:{n}: expected an object {{"audio": ..., "caption": ...}}, not {JSON_KINDS[type(entry)]}')
        yield n, entry.get("audio"), entry.get("caption")


def read_prompts(path):
    """The prompts of a file: [(id or None, prompt)], UTF-8. JSONL ({"id": ..., "caption": ...} per
    line) or CSV with a header row (MusicCaps' csv as it is): the id may be called id or ytid, the
    text caption, prompt or text. Any other file: one prompt per line, no ids. BadInput naming the
    file (and the entry) for an entry without an id or a text, a text that is not text (a JSON list,
    say), an id given twice, a CSV without those columns, and a file without prompts."""
    text = read_utf8(path, "prompts file")
    if not path.lower().endswith((".jsonl", ".csv")):
        lines = [(None, line.strip()) for line in text.split("\n") if line.strip()]
        if not lines:
            fail(f"{path}: no prompts in it")
        return lines
    if path.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:  # strict: a quote left open is an error, not the rest of the file in one field
            names = [name.strip() for name in reader.fieldnames or []]  # (reads the header row)
            reader.fieldnames = names  # " id , caption " names its columns id and caption
            rows = list(reader)
        except csv.Error as e:  # reader.line_num: where the last whole row ended
            fail(f"{path}:{reader.line_num + 1}: not valid CSV ({e}; is a quote left open?)")
        if names and not ({"id", "ytid"} & set(names) and {"caption", "prompt", "text"} & set(names)):
            fail(f"{path}: a CSV prompts file needs a header row with an id column (id or ytid) and a text column "
                 f"(caption, prompt or text); found: {', '.join(names)[:200]}")
        check_columns(path, names, ("id", "ytid", "caption", "prompt", "text"))
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(parse_json(line, only_text=True))
                except ValueError as e:
                    fail(f"{path}:{n}: not valid JSON ({e})")
    entries, seen = [], set()
    for n, row in enumerate(rows, 1):
        def pick(keys, kinds, wanted):  # the first of keys that the entry has, as text
            name, value = next(((k, row[k]) for k in keys if isinstance(row, dict) and row.get(k) not in (None, "")),
                               (None, ""))
            if not isinstance(value, kinds) or isinstance(value, bool):
                fail(f"{path}: entry {n}: the {name} must be {wanted}, not {JSON_KINDS.get(type(value))}")
            return str(value).strip()
        key = pick(("id", "ytid"), (str, int), "text or a whole number")
        prompt = pick(("caption", "prompt", "text"), str, "text")
        if not key or not prompt:
            fail(f"{path}: entry {n} needs an id (id or ytid) and a text (caption, prompt or text)")
        if key in seen:
            fail(f"{path}: entry {n}: the id {key!r} is given twice")
        seen.add(key)
        entries.append((key, prompt))
    if not entries:
        fail(f"{path}: no prompts in it")
    return entries


class AudioError(ValueError):
    """An audio file that cannot be used; the message is the one-line reason."""


# Telephone audio's rate, the lowest in use. A file of a lower rate is no recording, and resampling it to
# 44.1 kHz multiplies its samples by 44100 / rate (a 200 KB file at 1 Hz would take 17.6 GB).
MIN_SAMPLE_RATE = 8000


def check_sample_rate(sr):
    """AudioError for a sample rate below MIN_SAMPLE_RATE."""
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(f"sampled at {sr} Hz; audio files here are sampled at {MIN_SAMPLE_RATE} Hz or more")


def read_sound(path):
    """soundfile.read(path) as float32 (frames, channels), the path given as its bytes: soundfile encodes a str
    strictly, so a file whose name is not UTF-8 (a str with surrogate escapes) raised UnicodeEncodeError."""
    import soundfile as sf
    return sf.read(os.fsencode(path), dtype="float32", always_2d=True)


def load_audio(path):
    """Any file libsndfile reads -> mono float32 (n,) at 44.1 kHz (resampled by soxr). AudioError
    when the file is missing, unreadable or empty, sampled below MIN_SAMPLE_RATE, or has NaN or
    infinite samples, or samples beyond MAX_AMPLITUDE (which DAC would encode as noise)."""
    import soundfile as sf
    import soxr
    problem = file_problem(path)  # the OS says best why a file cannot be opened
    if problem:
        raise AudioError(problem)
    try:
        audio, sr = read_sound(path)
    except sf.SoundFileError as e:
        raise AudioError(f"unreadable ({getattr(e, 'error_string', e)})") from None
    if audio.size == 0:
        raise AudioError("no audio samples (an empty or damaged file)")
    check_sample_rate(sr)
    peak = float(np.abs(finite(audio)).max())
    if peak > MAX_AMPLITUDE:
        raise AudioError(f"samples up to {peak:.3g}, where audio runs from -1 to 1 (integer samples stored as "
                         "floats?)")
    mono = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


# Float audio runs from -1 to 1 and may go past it (a mix's headroom); a hundred times past it is no
# recording (integer samples written as floats, or damage), and summing channels of 3e38 overflows.
MAX_AMPLITUDE = 100.0


def finite(audio):
    """audio, or AudioError if any sample is NaN or infinite (DAC would encode them as something)."""
    bad = audio.size - np.count_nonzero(np.isfinite(audio))
    if bad:
        raise AudioError(f"NaN or infinite samples ({bad} of {audio.size})")
    return audio


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
    # whole windows times w samples, divided once: n x 0.05 s rounds past the exact half of a clip
    # (101 x 0.05 > 10.1 / 2), where n x w / rate and len / rate / 2 are both exact quotients rounded once
    return int(np.sum(rms_db < SILENCE_DBFS)) * w / SAMPLE_RATE


def too_silent(clip):
    return silent_seconds(clip) > min(MAX_SILENCE_S, len(clip) / SAMPLE_RATE / 2)


def load_dac(name_or_path=DEFAULT_DAC, device="cpu"):
    """DAC 44.1 kHz through transformers.DacModel (the same weights as descript-audio-codec), in
    fp32 whatever dtype its folder stores: codes are nearest neighbours, which reduced precision moves.
    BadInput when it cannot be loaded or has another layout (check_codec, before the weights load)."""
    from transformers import DacModel
    dac = from_pretrained(DacModel, name_or_path, "DAC", "--dac", lambda config: check_codec(config, name_or_path))
    return dac.float().to(device).eval().requires_grad_(False)  # fp32, whatever dtype the folder stores


def check_codec(config, name):
    """BadInput unless a DAC's config (a DacConfig) is the layout of DAC 44.1 kHz: 44100 Hz, hop 512,
    9 codebooks of 1024."""
    c = config
    if (c.sampling_rate, c.hop_length, c.n_codebooks, c.codebook_size) != (SAMPLE_RATE, HOP, N_CODEBOOKS, SPECIAL):
        fail(f"DAC {name!r} has {c.sampling_rate} Hz, hop {c.hop_length}, {c.n_codebooks} codebooks of "
             f"{c.codebook_size}; ssmttm needs DAC 44.1 kHz: {SAMPLE_RATE} Hz, hop {HOP}, "
             f"{N_CODEBOOKS} codebooks of {SPECIAL}")


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
    stage 2 works on have structure to learn. What its decoder makes of codes is noise, not music.
    The caller's global RNG is left as it was (train.py has seeded it with --seed + rank)."""
    from transformers import DacModel
    with torch.random.fork_rng(devices=[]):
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


def require_demucs():
    """BadInput (one line) unless demucs can be imported: --remove-vocals checks it before any work."""
    try:
        import demucs.apply  # noqa: F401
        import demucs.pretrained  # noqa: F401
    except ImportError:
        fail("--remove-vocals needs the demucs package: pip install demucs")


class VocalRemover:
    """HTDemucs: keep drums + bass + other, drop vocals (needs `pip install demucs`)."""

    def __init__(self, device):
        require_demucs()
        from demucs.apply import apply_model
        from demucs.pretrained import get_model
        self.apply_model, self.device = apply_model, device
        self.model = get_model("htdemucs").to(device).eval()

    @torch.no_grad()
    def __call__(self, mono):
        stereo = torch.from_numpy(mono)[None, None].expand(1, 2, -1).to(self.device)
        stems = self.apply_model(self.model, stereo, device=self.device)[0]  # (sources, 2, n)
        keep = [i for i, s in enumerate(self.model.sources) if s != "vocals"]
        return stems[keep].sum(0).mean(0).cpu().numpy().astype(np.float32)


def encode_file(dac, clips, batch_size, device):
    """Clips of one file (list of mono arrays) -> one (9, frames) uint16 array per clip, in order;
    clips of equal length are encoded together, batch_size at a time (check_integer's errors)."""
    check_integer("batch_size", batch_size, 1)
    codes = [None] * len(clips)
    for length in sorted({len(c) for c in clips}):
        same = [i for i, c in enumerate(clips) if len(c) == length]
        for j in range(0, len(same), batch_size):
            part = same[j:j + batch_size]
            for i, cb in zip(part, encode_clips(dac, [clips[i] for i in part], device)):
                codes[i] = cb[:, :math.ceil(length / HOP)]
    return codes


def preprocess(audio_dir, captions_file, out, dac_name=DEFAULT_DAC, batch_size=8, device=None,
               remove_vocals=False, dac=None, progress=True):
    """Audio folder + captions -> token folder (see the module docstring); prints a summary to
    stderr. dac: a loaded codec, else dac_name is loaded when there are files to encode, on device
    (resolve_device: None or "auto" is CUDA where there is one). Returns the list of (file, reason)
    skipped in this run (a rerun tries them again). BadInput for bad captions, folders or codec;
    check_integer's errors for batch_size, before any of them is read."""
    from tqdm import tqdm
    check_integer("batch_size", batch_size, 1)
    captions = read_captions(captions_file)
    if not os.path.isdir(audio_dir):
        fail(f"{audio_dir}: audio folder not found")
    if remove_vocals:  # before the codec loads and --out is made: a missing package leaves nothing behind
        require_demucs()
    if dac is not None:
        check_codec(dac.config, dac_name)
    device = resolve_device(device)
    audio = any(a.lower().endswith(AUDIO_EXTENSIONS) for a in captions)
    if dac is None and audio and not os.path.exists(out):  # a codec that fails to load leaves no empty --out
        check_out_folder(out)
        dac = load_dac(dac_name, device)
    meta = {"format": 2, "sample_rate": SAMPLE_RATE, "n_codebooks": N_CODEBOOKS, "clip_frames": CLIP_FRAMES,
            "dac": dac_name, "remove_vocals": remove_vocals}
    with ClipWriter(out, meta) as store:
        done = {r["source"]: r for r in store.records}
        changed = [a for a, r in done.items() if a in captions and r["captions"] != captions[a]]
        if changed:
            print(f"note: captions changed in {captions_file} for {plural(len(changed), 'finished file')} "
                  f"({some(changed)}): they keep those they were encoded with (a new --out re-encodes them)",
                  file=sys.stderr)
        unlisted = [a for a in done if a not in captions]
        if unlisted:
            print(f"note: not in {captions_file} but kept in {out}: {plural(len(unlisted), 'finished file')} "
                  f"({some(unlisted)})", file=sys.stderr)
        todo = [a for a in captions if a not in done]
        errors = [(a, f"not one of {', '.join(AUDIO_EXTENSIONS)}") for a in todo
                  if not a.lower().endswith(AUDIO_EXTENSIONS)]
        todo = [a for a in todo if a.lower().endswith(AUDIO_EXTENSIONS)]
        print(f"{len(captions)} captioned files: {len(done)} already done, {len(todo)} to do", file=sys.stderr)
        if todo and dac is None:  # checked before any work (load_dac), so the folder never holds another codec's codes
            dac = load_dac(dac_name, device)
        remover = VocalRemover(device) if remove_vocals and todo else None
        encoded = []
        for source in tqdm(todo, desc="encoding", unit="file", disable=not progress):
            try:
                audio = load_audio(os.path.join(audio_dir, source))
                if remover:
                    audio = finite(remover(audio))
            except AudioError as e:  # reported at the end; nothing is committed, so a rerun tries again
                errors.append((source, str(e)))
                continue
            pieces = split_clips(audio)
            kept = [(start, clip) for start, clip in pieces if not too_silent(clip)]
            codes = encode_file(dac, [clip for _, clip in kept], batch_size, device)
            record = {"source": source,
                      "clips": [{"start_s": start, "frames": c.shape[1]} for (start, _), c in zip(kept, codes)],
                      "captions": captions[source], "seconds": round(len(audio) / SAMPLE_RATE, 3),
                      "silent": len(pieces) - len(kept)}
            store.commit(record, codes)
            encoded.append(record)
        summarise(out, encoded, errors, store)
    return errors


def summarise(out, encoded, errors, store):
    """The run's account on stderr: clips kept and dropped, files too short, files skipped."""
    if encoded:
        short = [r["source"] for r in encoded if not r["clips"] and not r["silent"]]  # split_clips found none
        minutes = sum(r["seconds"] for r in encoded) / 60
        line = (f"encoded {plural(len(encoded), 'file')} ({minutes:.1f} min): "
                f"{plural(sum(len(r['clips']) for r in encoded), 'clip')} kept, "
                f"{sum(r['silent'] for r in encoded)} dropped as mostly silent")
        if short:
            line += f"; {plural(len(short), 'file')} shorter than {MIN_CLIP_SECONDS:g} s gave no clip ({some(short)})"
        print(line, file=sys.stderr)
    print(f"{out}: {plural(store.rows, 'clip')} from {plural(len(store.records), 'file')}", file=sys.stderr)
    if errors:
        print(f"{plural(len(errors), 'file')} skipped (a rerun tries them again):", file=sys.stderr)
        for name, reason in errors:
            print(f"  {name}: {reason}", file=sys.stderr)


def main(argv=None):
    ap = ArgumentParser(prog="data.py", description="Audio + captions -> DAC tokens (see the module docstring).")
    ap.add_argument("--audio", required=True, type=path_name, help="folder of audio files")
    ap.add_argument("--captions", required=True, type=path_name,
                    help="JSONL or CSV mapping audio path (relative to --audio) to caption")
    ap.add_argument("--out", required=True, help="output folder (rerun to resume)")
    ap.add_argument("--dac", default=DEFAULT_DAC, type=path_name, help="DAC model name or local folder")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="clips per DAC batch")
    ap.add_argument("--device", type=device_name, default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--remove-vocals", action="store_true",
                    help="remove vocals with HTDemucs first (pip install demucs)")
    args = ap.parse_args(argv)
    # meta.json keeps the DAC, and train.py reads it from another working directory
    dac = model_location(args.dac)
    try:
        skipped = preprocess(args.audio, args.captions, args.out, dac, args.batch_size, args.device,
                             args.remove_vocals)
    except (MemoryError, RuntimeError) as e:
        memory = out_of_memory(e)
        if memory is None:
            raise
        fail(f"out of memory ({memory}); pass a smaller --batch-size (now {args.batch_size}): the files encoded are "
             "kept, and the same command goes on from them")
    if skipped:  # the rest is committed; the exit code tells a script that some input was bad
        sys.exit(2)


if __name__ == "__main__":
    run_command(main, "data.py")
