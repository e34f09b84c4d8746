"""Data integrity of data.py (issue 19): interrupted and concurrent preprocessing, bad audio, bad
captions files, bad arguments and codecs. To be folded into test_ssmttm.py's data section.

Crashes are simulated deterministically: os.fsync is patched to raise at the k-th call (optionally
cutting the file it was asked to sync, as a torn write would), for every k of a run. DAC takes
seconds per clip on a CPU, so most tests stand in a cheap encoder that depends on every frame."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import data as datamod
from test_ssmttm import SR, tiny_dac_dir, tone  # noqa: F401 (tiny_dac_dir is a fixture)

SPECIAL = datamod.SPECIAL


def fake_encode(dac, clips, device):
    """Stands in for DAC: (n, 9, frames) codes from the sum of |samples| of each 512-sample frame."""
    x = np.stack(clips).astype(np.float64)
    x = np.pad(x, ((0, 0), (0, -x.shape[1] % datamod.HOP)))
    level = (np.abs(x.reshape(len(x), -1, datamod.HOP)).sum(-1) * 1000).astype(np.int64)
    return ((level[:, None] + 97 * np.arange(9)[:, None]) % 1024).astype(np.uint16)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(datamod, "encode_clips", fake_encode)


@pytest.fixture(scope="module")
def dac(tiny_dac_dir):
    return datamod.load_dac(tiny_dac_dir)


SONGS = {"a.wav": tone(45, 220, amp=0.3), "b.wav": tone(12, 330, amp=0.2), "c.wav": tone(20, 440, amp=0.1)}
CAPTIONS = {"a.wav": "a low tone", "b.wav": "a middle tone", "c.wav": "a high tone"}
# (source, start_s, frames, caption, the clip's samples): a.wav gives 30 s + 15 s, the others one clip each
WANT = [("a.wav", 0.0, 2584, "a low tone", SONGS["a.wav"][:30 * SR]),
        ("a.wav", 30.0, 1292, "a low tone", SONGS["a.wav"][30 * SR:]),
        ("b.wav", 0.0, 1034, "a middle tone", SONGS["b.wav"]),
        ("c.wav", 0.0, 1723, "a high tone", SONGS["c.wav"])]


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    d = tmp_path_factory.mktemp("songs")
    for name, audio in SONGS.items():
        sf.write(d / name, audio, SR, subtype="FLOAT")
    write_jsonl(d / "captions.jsonl", [{"audio": a, "caption": c} for a, c in CAPTIONS.items()])
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(songs, out, dac, captions="captions.jsonl", **kw):
    return datamod.preprocess(str(songs), str(songs / captions), str(out), dac=dac, device="cpu", progress=False, **kw)


def rows(folder):
    """[(source, start_s, frames, caption, codes (9, 2584))] of a folder, as training reads it."""
    ds = datamod.TokenDataset(str(folder))
    out = []
    for i in range(len(ds)):
        codes, caption = ds.example(i)
        r = ds.index[i]
        out.append((r["source"], r["start_s"], r["frames"], caption, codes.numpy()))
    return out


def assert_rows(got, want):
    """got (from rows()) holds exactly the clips of want, in order, with their codes and captions."""
    assert [g[:4] for g in got] == [w[:4] for w in want]
    for (*_, codes), (_, _, frames, _, clip) in zip(got, want):
        assert np.array_equal(codes[:, :frames], fake_encode(None, [clip], None)[0])
        assert (codes[:, frames:] == SPECIAL).all()


def assert_clean(folder, n_files, n_clips):
    """Nothing but committed data left on disk: n_files journal lines, n_clips code rows."""
    assert len(open(os.path.join(folder, "files.jsonl")).read().splitlines()) == n_files
    assert os.path.getsize(os.path.join(folder, "clips.u16")) == n_clips * datamod.ROW_BYTES


def cli(monkeypatch, *args):
    """Run `python data.py ARGS` in this process; the exit code it ends with (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", ["data.py", *map(str, args)])
    try:
        datamod.main()
    except SystemExit as e:
        return e.code
    return 0


class Crash(Exception):
    pass


def crash_at_fsync(monkeypatch, k=None, torn=False, hook=None):
    """Patch os.fsync: call hook(n) at each call n; at call k raise Crash instead of syncing (after
    cutting the last 7 bytes of the file when torn: its last write reached the disk only in part).
    A fresh 3-file run syncs 9 times: the folder; a.wav's rows, meta.json's temp file and folder,
    a.wav's journal line; b.wav's rows and line; c.wav's rows and line."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if hook:
            hook(len(calls))
        if len(calls) == k:
            if torn and stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - 7))
            raise Crash
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


# ------------------------------------------------------------------------------------------------
# 1. An interrupted run, rerun: every clip exactly once


@pytest.mark.parametrize("torn", [False, True])
@pytest.mark.parametrize("k", range(1, 10))  # every fsync of the run
def test_crash_at_any_point_then_rerun_gives_each_clip_once(songs, dac, fast, tmp_path, monkeypatch, k, torn):
    out = tmp_path / "out"
    crash_at_fsync(monkeypatch, k, torn)
    with pytest.raises(Crash):
        run(songs, out, dac)
    monkeypatch.undo()
    monkeypatch.setattr(datamod, "encode_clips", fake_encode)
    run(songs, out, dac)
    assert_rows(rows(out), WANT)
    assert_clean(out, 3, 4)


def test_rerun_after_a_complete_run_changes_nothing(songs, dac, fast, tmp_path):
    out = tmp_path / "out"
    run(songs, out, dac)
    before = {name: open(out / name, "rb").read() for name in ("files.jsonl", "clips.u16", "meta.json")}
    run(songs, out, dac)
    assert {name: open(out / name, "rb").read() for name in before} == before


# ------------------------------------------------------------------------------------------------
# 2. Reading while data.py writes: committed clips only, nothing written


def test_reader_during_writing_sees_committed_clips_and_writes_nothing(songs, dac, fast, tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def open_reader(n):  # a training run opens the folder at every fsync of the writer
        sizes = {f: os.path.getsize(out / f) for f in os.listdir(out)}
        try:
            got = rows(out)
        except SystemExit as e:
            assert str(e).endswith("no preprocessed clips (run: python data.py --audio DIR --captions FILE "
                                   f"--out {out})")
            got = []
        assert {f: os.path.getsize(out / f) for f in os.listdir(out)} == sizes
        assert_rows(got, WANT[:len(got)])
        seen.append(len(got))

    calls = crash_at_fsync(monkeypatch, hook=open_reader)
    run(songs, out, dac)
    assert len(calls) == 9
    assert seen == [0, 0, 0, 0, 2, 2, 3, 3, 4]  # a file's clips appear once its journal line is written
    assert_rows(rows(out), WANT)


def test_a_second_writer_is_refused(songs, dac, fast, tmp_path, capsys):
    out = tmp_path / "out"
    meta = {"format": 2}
    with datamod.ClipWriter(str(out), meta):
        with pytest.raises(SystemExit) as e:
            run(songs, out, dac)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"{out}: another data.py is writing to this folder\n"
    run(songs, out, dac)  # the lock goes with the writer
    assert_rows(rows(out), WANT)


def test_damaged_journal_is_reported_not_repaired(songs, dac, fast, tmp_path, capsys):
    out = tmp_path / "out"
    run(songs, out, dac)
    lines = open(out / "files.jsonl").read().splitlines()
    (out / "files.jsonl").write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    for attempt in (lambda: datamod.TokenDataset(str(out)), lambda: run(songs, out, dac)):
        with pytest.raises(SystemExit) as e:
            attempt()
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"{out}/files.jsonl:2: damaged record; this folder cannot be trusted, preprocess into a new --out")
    assert os.path.getsize(out / "clips.u16") == 4 * datamod.ROW_BYTES


def test_folder_of_the_earlier_layout_is_read_not_extended(songs, dac, fast, tmp_path, capsys):
    """codes.u16 + index.jsonl (one line per clip): an interrupted old run re-encoded a.wav (rows
    2-3 repeat rows 0-1) and left a cut line; readers take each clip once; data.py refuses to add."""
    out = tmp_path / "old"
    out.mkdir()
    codes = np.full((5, 9, 2584), SPECIAL, np.uint16)
    index = []
    for row, (source, start, frames, caption, clip) in enumerate([*WANT[:2], *WANT[:2], WANT[2]]):
        codes[row, :, :frames] = fake_encode(None, [clip], None)[0]
        index.append({"source": source, "start_s": start, "frames": frames, "caption": caption})
    codes.tofile(out / "codes.u16")
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index) + '{"source": "c.w')
    ds = datamod.TokenDataset(str(out))
    assert [c["row"] for c in ds.index] == [0, 1, 4]
    assert_rows(rows(out), WANT[:3])
    with pytest.raises(SystemExit) as e:
        run(songs, out, dac)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"{out} holds the earlier layout (codes.u16, index.jsonl): training still reads it, but data.py no "
        "longer adds to it; preprocess into a new --out\n")


# ------------------------------------------------------------------------------------------------
# 3. Non-finite audio is skipped like a corrupt file; 11. missing files and files too short


def test_nonfinite_missing_and_short_files_are_reported(songs, dac, fast, tmp_path, capsys):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "good.wav", SONGS["c.wav"], SR, subtype="FLOAT")
    sf.write(d / "nan.wav", np.full(12 * SR, np.nan, np.float32), SR, subtype="FLOAT")
    with_inf = tone(12, 550)
    with_inf[SR] = np.inf
    sf.write(d / "inf.wav", np.stack([with_inf, tone(12, 660)], 1), SR, subtype="FLOAT")  # stereo, one inf
    sf.write(d / "short.wav", tone(9.5, 770), SR, subtype="FLOAT")
    (d / "folder.wav").mkdir()
    write_jsonl(d / "captions.jsonl", [{"audio": a, "caption": f"caption of {a}"} for a in
                                       ("good.wav", "nan.wav", "inf.wav", "short.wav", "missing.wav", "folder.wav")])
    out = tmp_path / "out"
    errors = run(d, out, dac)
    skipped = [("nan.wav", "NaN or infinite samples (529200 of 529200)"),
               ("inf.wav", "NaN or infinite samples (1 of 1058400)"),
               ("missing.wav", "not found"), ("folder.wav", "is a directory")]
    assert errors == skipped
    assert_rows(rows(out), [("good.wav", 0.0, 1723, "caption of good.wav", SONGS["c.wav"])])
    assert capsys.readouterr().err.splitlines() == [
        "6 captioned files: 0 already done, 6 to do",
        "encoded 2 files (0.5 min): 1 clip kept, 0 dropped as mostly silent; 1 file shorter than 10 s gave no "
        "clip (short.wav)",
        f"{out}: 1 clip from 2 files",
        "4 files skipped (a rerun tries them again):",
        *[f"  {name}: {reason}" for name, reason in skipped]]
    assert run(d, out, dac) == skipped  # not committed: tried again, and still not encoded


def test_silent_clips_are_counted(dac, fast, tmp_path, capsys):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "quiet.wav", np.concatenate([np.zeros(30 * SR, np.float32), tone(12, 550)]), SR, subtype="FLOAT")
    write_jsonl(d / "captions.jsonl", [{"audio": "quiet.wav", "caption": "silence, then a beep"}])
    run(d, tmp_path / "out", dac)
    assert "encoded 1 file (0.7 min): 1 clip kept, 1 dropped as mostly silent" in capsys.readouterr().err.splitlines()
    assert json.loads(open(tmp_path / "out" / "files.jsonl").read())["silent"] == 1


# ------------------------------------------------------------------------------------------------
# 4. A file named twice: encoded once, every distinct caption kept


def test_a_file_named_twice_is_encoded_once_with_its_captions(songs, dac, fast, tmp_path, capsys):
    write_jsonl(songs / "twice.jsonl", [{"audio": "b.wav", "caption": "a middle tone"},
                                        {"audio": "./b.wav", "caption": "a sine at 330 Hz"},
                                        {"audio": "c.wav", "caption": "a high tone"},
                                        {"audio": "sub/../b.wav", "caption": "a middle tone"}])
    assert datamod.read_captions(str(songs / "twice.jsonl")) == {"b.wav": ["a middle tone", "a sine at 330 Hz"],
                                                                 "c.wav": ["a high tone"]}
    warning = (f"warning: {songs}/twice.jsonl: 2 lines name an audio file again (line 2: b.wav (first on line 1), "
               "line 4: b.wav (first on line 1)); each file is encoded once and keeps its distinct captions")
    assert capsys.readouterr().err == warning + "\n"
    out = tmp_path / "out"
    run(songs, out, dac, captions="twice.jsonl")
    assert_rows(rows(out), WANT[2:])
    ds = datamod.TokenDataset(str(out))
    assert [ds.example(0, epoch)[1] for epoch in range(3)] == ["a middle tone", "a sine at 330 Hz", "a middle tone"]
    assert ds.batch([1, 0], epoch=1)[1] == ["a high tone", "a sine at 330 Hz"]


def test_changed_or_unlisted_captions_of_finished_files_are_reported(songs, dac, fast, tmp_path, capsys):
    out = tmp_path / "out"
    run(songs, out, dac)
    write_jsonl(songs / "changed.jsonl", [{"audio": "a.wav", "caption": "a deep tone"},
                                          {"audio": "b.wav", "caption": "a middle tone"}])
    capsys.readouterr()
    run(songs, out, dac, captions="changed.jsonl")
    assert capsys.readouterr().err.splitlines()[:2] == [
        f"note: captions changed in {songs}/changed.jsonl for 1 finished file (a.wav): they keep those they were "
        "encoded with (a new --out re-encodes them)",
        f"note: not in {songs}/changed.jsonl but kept in {out}: 1 finished file (c.wav)"]
    assert_rows(rows(out), WANT)


# ------------------------------------------------------------------------------------------------
# 5. A first run that fails to load DAC leaves no settings behind; 6. a codec of another layout


def test_failed_first_run_then_rerun_with_dac_path(songs, tiny_dac_dir, fast, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--audio", songs, "--captions", songs / "captions.jsonl", "--out", out, "--device", "cpu"]
    assert cli(monkeypatch, *args, "--dac", tmp_path / "no-dac") == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"DAC '{tmp_path}/no-dac': no such local folder"
    assert not (out / "meta.json").exists()
    assert cli(monkeypatch, *args, "--dac", tiny_dac_dir) == 0
    assert json.load(open(out / "meta.json"))["dac"] == tiny_dac_dir
    assert_rows(rows(out), WANT)
    # once something is committed, the settings are the folder's
    assert cli(monkeypatch, *args, "--dac", "descript/dac_44khz") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{out} was made with other settings (dac: '{tiny_dac_dir}' there, 'descript/dac_44khz' now); "
        "rerun with those or use a new --out")


def test_settings_may_change_until_the_first_commit(songs, dac, fast, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_at_fsync(monkeypatch, 4)  # meta.json is in place (its folder's fsync), the first journal line not yet
    with pytest.raises(Crash):
        run(songs, out, dac, dac_name="first")
    assert json.load(open(out / "meta.json"))["dac"] == "first"
    monkeypatch.undo()
    monkeypatch.setattr(datamod, "encode_clips", fake_encode)
    run(songs, out, dac, dac_name="second")
    assert json.load(open(out / "meta.json"))["dac"] == "second"
    assert_rows(rows(out), WANT)


@pytest.mark.parametrize("change, has", [
    ({"sampling_rate": 24000}, "24000 Hz, hop 512, 9 codebooks of 1024"),
    ({"downsampling_ratios": [2, 4, 5, 8]}, "44100 Hz, hop 320, 9 codebooks of 1024"),
    ({"n_codebooks": 32}, "44100 Hz, hop 512, 32 codebooks of 1024"),
    ({"codebook_size": 4096}, "44100 Hz, hop 512, 9 codebooks of 4096")])
def test_codec_of_another_layout_is_refused_up_front(songs, tmp_path, monkeypatch, capsys, change, has):
    from transformers import DacConfig, DacModel
    cfg = {**datamod.tiny_dac_config().to_dict(), **change}
    path = tmp_path / "dac"
    DacModel(DacConfig(**{k: cfg[k] for k in ("encoder_hidden_size", "decoder_hidden_size", "n_codebooks",
                                               "codebook_size", "codebook_dim", "downsampling_ratios",
                                               "sampling_rate")})).save_pretrained(path)
    out = tmp_path / "out"
    assert cli(monkeypatch, "--audio", songs, "--captions", songs / "captions.jsonl", "--out", out, "--dac", path,
               "--device", "cpu") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"DAC '{path}' has {has}; ssmttm needs DAC 44.1 kHz: 44100 Hz, hop 512, 9 codebooks of 1024")
    assert os.path.getsize(out / "files.jsonl") == 0 and not (out / "meta.json").exists()
    with pytest.raises(SystemExit) as e:  # a loaded codec passed in is checked too, before any work
        datamod.preprocess(str(songs), str(songs / "captions.jsonl"), str(tmp_path / "out2"),
                           dac=DacModel.from_pretrained(path), dac_name="mine", progress=False)
    assert e.value.code == 2 and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------
# 11. Captions files and arguments: one line naming the culprit, exit code 2


def test_csv_with_byte_order_mark_and_quoted_commas(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffaudio,caption\r\nx.wav,\"calm, slow piano\"\r\n\r\ny.wav,café jazz\r\n".encode())
    assert datamod.read_captions(str(path)) == {"x.wav": ["calm, slow piano"], "y.wav": ["café jazz"]}


BAD_CAPTIONS = [
    ("nocap.csv", b"audio,caption\nx.wav,a calm piece\ny.wav\n", "3: no caption"),
    ("empty.csv", b"audio,caption\nx.wav,  \n", "2: the caption is empty"),
    ("commas.csv", b"audio,caption\nx.wav,calm, slow piano\n", "2: more fields than the header row; quote a "
                                                               "caption that holds a comma"),
    ("open-quote.csv", b'audio,caption\nx.wav,"calm\ny.wav,jazz\nz.wav,rock\n', "2: not valid CSV (unexpected end "
                                                                                 "of data)"),
    ("multiline.csv", b'audio,caption\nx.wav,"calm\ny.wav,jazz"\nz.wav,rock\n', "2: the row runs over lines 2-3; "
                                                                               "a caption must be one line (is a "
                                                                               "quote left open?)"),
    ("latin1.csv", "audio,caption\nx.wav,calm\ny.wav,café jazz\n".encode("latin-1"),
     "3: not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ("header.csv", b"path,text\nx.wav,calm\n", ": a CSV captions file needs a header row with columns "
                                               "audio,caption (found: path,text)"),
    ("list.jsonl", b'{"audio": "x.wav", "caption": "calm"}\n["y.wav", "jazz"]\n',
     '2: expected an object {"audio": ..., "caption": ...}, not a list'),
    ("number.jsonl", b'{"audio": "x.wav", "caption": 5}\n', "1: the caption must be text, not a number"),
    ("noaudio.jsonl", b'\n{"caption": "calm"}\n', "2: no audio"),
    ("nulls.jsonl", b'{"audio": "x.wav", "caption": null}\n', "1: no caption"),
    ("json.jsonl", b'{"audio": "x.wav",\n', "1: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("absolute.jsonl", b'{"audio": "/music/x.wav", "caption": "calm"}\n', "1: the audio path must be relative to "
                                                                           "the audio folder, not /music/x.wav"),
    ("blank.jsonl", b"\n\n", ": no captions in it"),
]


@pytest.mark.parametrize("name, content, message", BAD_CAPTIONS, ids=[c[0] for c in BAD_CAPTIONS])
def test_bad_captions_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert cli(monkeypatch, "--audio", tmp_path, "--captions", path, "--out", tmp_path / "out") == 2
    assert capsys.readouterr().err == f"{path}{':' if message[0].isdigit() else ''}{message}\n"
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line_and_exit_2(songs, tmp_path, monkeypatch, capsys):
    good = ["--audio", songs, "--captions", songs / "captions.jsonl", "--out", tmp_path / "out"]
    (tmp_path / "file").write_text("")
    cases = [(["--captions", tmp_path / "none.jsonl"], f"{tmp_path}/none.jsonl: captions file not found"),
             (["--audio", tmp_path / "none"], f"{tmp_path}/none: audio folder not found"),
             (["--out", tmp_path / "file"], f"{tmp_path}/file: exists and is not a folder"),
             (["--device", "tpu"], "data.py: error: argument --device: expected auto, cpu or cuda, not 'tpu'"),
             (["--batch-size", "0"], "data.py: error: argument --batch-size: expected a whole number of at least "
                                     "1, not '0'"),
             (["--batch-size", "8", "--bogus"], "data.py: error: unrecognized arguments: --bogus")]
    if not datamod.torch.cuda.is_available():
        cases.append((["--device", "cuda"], "data.py: error: argument --device: 'cuda', but torch sees no CUDA "
                                            "device here"))
    for change, message in cases:  # argparse's own errors too: one line, without the usage lines
        assert cli(monkeypatch, *good, *change) == 2
        assert capsys.readouterr().err == message + "\n"
    with pytest.raises(SystemExit) as e:
        datamod.TokenDataset(str(tmp_path / "nowhere"))
    assert e.value.code == 2 and capsys.readouterr().err == f"{tmp_path}/nowhere: no such data folder\n"


def test_command_line_error_has_no_traceback(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("audio,caption\nx.wav,café\n".encode("latin-1"))
    done = subprocess.run([sys.executable, "data.py", "--audio", str(tmp_path), "--captions", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", f"{path}:2: not UTF-8 (byte 0xe9); save the file as UTF-8\n")
