"""Tests of evaluate.py (CPU; tiny or random-weight models saved to temporary folders).

    HF_HUB_OFFLINE=1 python -m pytest -q test_evaluate.py

The model packages (requirements-eval.txt) are optional: their tests skip without them.
"""
import collections
import csv
import importlib.util
import json
import math
import os
import shutil
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import evaluate
import ssmttm

needs_openl3 = pytest.mark.skipif(not importlib.util.find_spec("torchopenl3"), reason="torchopenl3 not installed")
needs_passt = pytest.mark.skipif(not importlib.util.find_spec("hear21passt"), reason="hear21passt not installed")


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------------------
# FD


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s = random_spd(rng, d)
    # S2 = c^2 S1 commutes with S1: (S1 S2)^(1/2) = c S1, so FD = |dmu|^2 + (1 - c)^2 tr S1.
    c = 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s)
    assert abs(evaluate.frechet_distance(mu1, s, mu2, c * c * s) - expected) < 1e-6 * expected
    # Diagonal covariances: tr (S1 S2)^(1/2) = sum sqrt(a_i b_i).
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert abs(evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) - expected) < 1e-9
    # General full-rank pair: the trace of scipy's (non-symmetric) matrix square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2)).real
    assert abs(evaluate.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-9 * expected


def test_frechet_distance_keeps_a_small_eigenvalue_beside_a_large_one():
    # tr((S S)^(1/2)) = tr(S) exactly; through S^(1/2) S S^(1/2), whose eigenvalues are the squares
    # (1e6 and 1e-12), the small one falls below round-off and 1e-6 is lost. Rotated, so that no
    # route sees a diagonal matrix
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    s = (q * np.array([1e3, 1.0, 1e-3, 1e-6])) @ q.T
    assert evaluate.trace_sqrt_product(s, s) == pytest.approx(np.trace(s), rel=1e-12)
    assert abs(evaluate.frechet_distance(np.zeros(4), s, np.zeros(4), s)) < 1e-10


def test_frechet_distance_of_samples_and_rank_deficient():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    y = rng.standard_normal((200, 24)) + 0.5
    mx, sx = evaluate.gaussian_stats(x)
    my, sy = evaluate.gaussian_stats(y)
    assert np.allclose(sx, np.cov(x.T)) and sx.dtype == np.float64       # ddof 1, float64
    assert abs(evaluate.frechet_distance(mx, sx, mx, sx)) < 1e-9 * np.trace(sx)  # a set with itself
    swapped = evaluate.frechet_distance(my, sy, mx, sx)
    assert evaluate.frechet_distance(mx, sx, my, sy) == pytest.approx(swapped, rel=1e-10)
    # 10 samples in 128-d (as a few short clips give OpenL3 in 512-d): covariance of rank 9.
    z = rng.standard_normal((10, 128))
    mz, sz = evaluate.gaussian_stats(z)
    assert np.linalg.matrix_rank(sz) == 9
    shift = np.full(128, 0.01)
    # Same singular covariance, shifted mean: exactly |shift|^2; scaled by c^2: + (1 - c)^2 tr S.
    assert evaluate.frechet_distance(mz, sz, mz + shift, sz) == pytest.approx(shift @ shift, abs=1e-8)
    assert evaluate.frechet_distance(mz, sz, mz, 4 * sz) == pytest.approx(np.trace(sz), rel=1e-8)
    # two different singular covariances: with S1 = A^T A and S2 = B^T B (A, B the centred samples over
    # sqrt(n - 1)), tr((S1 S2)^(1/2)) is the nuclear norm of A B^T, an independent route to the FD
    w = rng.standard_normal((12, 128)) * 2
    mw, sw = evaluate.gaussian_stats(w)
    a, b = (z - mz) / math.sqrt(len(z) - 1), (w - mw) / math.sqrt(len(w) - 1)
    want = (mz - mw) @ (mz - mw) + np.trace(sz) + np.trace(sw) - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum()
    assert evaluate.frechet_distance(mz, sz, mw, sw) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_covariances_on_orthogonal_ranges_is_their_traces():
    # S1, S2 of rank 5 and 7 on orthogonal subspaces of R^64: S1 S2 = 0, so tr((S1 S2)^(1/2)) = 0 and
    # FD = tr S1 + tr S2; the round-off eigenvalues must be zeroed, not square-rooted (about 1e-8 each)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    a, b = q[:, :5] @ rng.standard_normal((5, 5)), q[:, 5:12] @ rng.standard_normal((7, 7))
    s1, s2 = a @ a.T, b @ b.T
    assert evaluate.trace_sqrt_product(s1, s2) < 1e-12
    assert evaluate.frechet_distance(np.zeros(64), s1, np.zeros(64), s2) == pytest.approx(
        np.trace(s1) + np.trace(s2), rel=1e-12)


def test_frechet_distance_of_mono_embeddings_in_stable_audio_metrics_stereo_setting_is_twice_the_mono_one():
    # stable-audio-metrics' MusicCaps scripts (channels=2) join a file's L and R embeddings, a mono file's
    # twice: [e | e]. The covariance is then [[S, S], [S, S]], whose product's square root has twice the trace,
    # so with mono audio on both sides every term, and the FD, doubles (the README's "where they differ")
    rng = np.random.default_rng(1)
    g, r = rng.standard_normal((40, 6)), rng.standard_normal((50, 6)) * 1.5 + 0.3
    mono = evaluate.frechet_distance(*evaluate.gaussian_stats(g), *evaluate.gaussian_stats(r))
    stereo = evaluate.frechet_distance(*evaluate.gaussian_stats(np.hstack([g, g])),
                                       *evaluate.gaussian_stats(np.hstack([r, r])))
    assert mono > 1 and stereo == pytest.approx(2 * mono, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# KL


def test_kl_passt_is_the_mean_over_pairs_matched_by_name(monkeypatch):
    # three pairs with KL 0, 0.2231 and 1.6144: the mean, 0.6125, not the median; "aa" is a reference
    # only, sorted between a and b, so that pairing by position would change the values
    probs = {"g/a": [0.5, 0.5], "g/b": [0.8, 0.2], "g/c": [0.99, 0.01],
             "r/a": [0.5, 0.5], "r/aa": [0.01, 0.99], "r/b": [0.5, 0.5], "r/c": [0.5, 0.5]}
    monkeypatch.setattr(evaluate, "load_mono", lambda path, sr: path)
    monkeypatch.setattr(evaluate, "passt_probabilities",
                        lambda model, audio, device: torch.tensor(probs[audio], dtype=torch.float64))
    gen = {n: f"g/{n}" for n in ("a", "b", "c")}
    ref = {n: f"r/{n}" for n in ("a", "aa", "b", "c")}
    report = {"per_file": {n: {} for n in gen}, "counts": {}, "short_clips": {}}
    evaluate.kl_passt(None, gen, ref, "cpu", report)
    kl = lambda p, q: sum(pi * (math.log(pi) - math.log(qi + 1e-6)) for pi, qi in zip(p, q))  # noqa: E731
    want = [kl(probs[f"r/{n}"], probs[f"g/{n}"]) for n in gen]
    assert [report["per_file"][n]["kl_passt"] for n in gen] == pytest.approx(want, rel=1e-9)
    assert report["kl_passt"] == pytest.approx(sum(want) / 3, rel=1e-9) and abs(report["kl_passt"] - 0.61249) < 1e-4
    assert report["counts"]["kl_pairs"] == 3


def test_kl_divergence_hand_values():
    p, q = [0.5, 0.5, 0.0], [0.9, 0.05, 0.05]
    eps = 1e-6
    expected = 0.5 * math.log(0.5 / (0.9 + eps)) + 0.5 * math.log(0.5 / (0.05 + eps))  # the 0 log 0 term is 0
    assert float(evaluate.kl_divergence(p, q)) == pytest.approx(expected, rel=1e-12)
    back = 0.9 * math.log(0.9 / (0.5 + eps)) + 0.05 * math.log(0.05 / (0.5 + eps)) + 0.05 * math.log(0.05 / eps)
    assert float(evaluate.kl_divergence(q, p)) == pytest.approx(back, rel=1e-12)
    # identical inputs: 0 but for eps, sum p log(p / (p + eps)) ~ -eps per class
    r = torch.softmax(torch.randn(527, generator=torch.Generator().manual_seed(0)), 0)
    same = float(evaluate.kl_divergence(r, r))
    assert same == pytest.approx(float((r.double() * torch.log(r.double() / (r.double() + eps))).sum()), rel=1e-9)
    assert abs(same) < 527 * eps
    assert float(evaluate.kl_divergence([0.2, 0.8], [0.2, 0.8], eps=0)) == 0.0
    # batched over the last axis
    assert torch.allclose(evaluate.kl_divergence(torch.stack([r, r]), torch.stack([r, r.flip(0)]))[1],
                          evaluate.kl_divergence(r, r.flip(0)))


def test_passt_windows():
    sr = evaluate.PASST_SR
    audio = np.arange(25 * sr, dtype=np.float32)
    w = evaluate.passt_windows(audio)
    assert w.shape == (4, 10 * sr)                                         # starts 0, 5, 10, 15 s
    assert [int(x[0]) for x in w] == [0, 5 * sr, 10 * sr, 15 * sr] and w[-1, -1] == 25 * sr - 1
    w = evaluate.passt_windows(audio[:12 * sr])                            # 0-10 s, 5-12 s + 3 s of zeros
    assert w.shape == (2, 10 * sr) and np.array_equal(w[1, :7 * sr], audio[5 * sr:12 * sr]) and not w[1, 7 * sr:].any()
    assert evaluate.passt_windows(audio[:10 * sr]).shape == (1, 10 * sr)
    w = evaluate.passt_windows(audio[:3 * sr])                             # short clip: padded
    assert w.shape == (1, 10 * sr) and np.array_equal(w[0, :3 * sr], audio[:3 * sr])
    assert evaluate.passt_windows(audio[:int(1.5 * sr)]).shape == (0, 10 * sr)  # 15 % of a window: dropped
    w = evaluate.passt_windows(audio[:16 * sr])                            # starts < 16 - 5 s: 0, 5, 10
    assert w.shape == (3, 10 * sr) and np.array_equal(w[2, :6 * sr], audio[10 * sr:16 * sr]) and not w[2, 6 * sr:].any()


def test_kaldi_mel_banks_stand_in():
    """The filterbank given to hear21passt when torchaudio cannot be imported: values recorded from
    torchaudio 2.11.1's compliance.kaldi.get_mel_banks(128, 1024, 32000, 0.0, 15000.0, 100.0, -500.0,
    1.0), PaSST's call (it was bit-identical on four settings of one machine). Matched within float32
    rounding, not bit for bit: torch's vectorised log and exp on the CPU round some values one unit in
    the last place otherwise under another instruction set (AVX-512 against AVX2), and so does
    torchaudio, which calls them."""
    bins, centers = evaluate.kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0, 100.0, -500.0, 1.0)
    assert bins.shape == (128, 512) and bins.dtype == torch.float32 and centers.shape == (128, 1)
    assert bins.double().sum().item() == pytest.approx(473.490556985701, rel=1e-6)  # 473.49059268 under AVX-512
    assert (bins > 0).sum().item() == 948
    assert bins[60].nonzero().flatten().tolist() == [73, 74, 75, 76, 77]
    assert bins[60, 73:78].tolist() == pytest.approx([0.09745600819587708, 0.5299479365348816, 0.9579610228538513,
                                                      0.6183940768241882, 0.1990305632352829], rel=1e-6)
    assert centers[0, 0].item() == pytest.approx(17.082918167114258, rel=1e-6)
    assert centers[-1, 0].item() == pytest.approx(14625.982421875, rel=1e-6)
    # by the definition, in float64: triangle of bin 60 at FFT bin 75
    mel = lambda f: 1127 * math.log(1 + f / 700)
    delta = mel(15000.0) / 129
    m = mel(75 * 32000 / 1024)
    assert bins[60, 75].item() == pytest.approx(min((m - 60 * delta) / delta, (62 * delta - m) / delta), rel=1e-5)
    # torchaudio's rule: a high_freq of 0 or less counts from the Nyquist frequency (16 kHz here)
    for high, same in ((-1000.0, 15000.0), (0.0, 16000.0)):
        got, want = evaluate.kaldi_mel_banks(128, 1024, 32000, 0.0, high), evaluate.kaldi_mel_banks(128, 1024, 32000,
                                                                                                  0.0, same)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), high


# ------------------------------------------------------------------------------------------------
# Tiny models and audio


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-weight models saved as the real files would be: OpenL3 of the real architecture,
    PaSST of the real architecture at width 64 and depth 1, a tiny CLAP folder (ByT5 tokenizer)."""
    from transformers import ByT5Tokenizer, ClapConfig, ClapFeatureExtractor, ClapModel
    root = tmp_path_factory.mktemp("weights")
    paths = {}
    torch.manual_seed(0)
    if __import__("importlib").util.find_spec("torchopenl3"):
        from torchopenl3.models import PytorchOpenl3
        paths["openl3"] = str(root / "openl3.pth.tar")
        with pytest.warns(UserWarning, match="Empty filters"):  # librosa, on OpenL3's lowest mel bands
            model = PytorchOpenl3(content_type="music", input_repr="mel256", embedding_size=512)
        torch.save(model.state_dict(), paths["openl3"])
    if __import__("importlib").util.find_spec("hear21passt"):
        PaSST = evaluate.import_passt()[0]
        net = PaSST(img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
                    embed_dim=64, depth=1, num_heads=1, distilled=True)
        for p in net.parameters():  # unit-scale activations, so that the tags depend on the sound
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
        paths["passt"] = str(root / "passt.pt")
        torch.save(net.state_dict(), paths["passt"])
    tok = ByT5Tokenizer()
    cfg = ClapConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=37, max_position_embeddings=100, pad_token_id=tok.pad_token_id),
                     audio_config=dict(spec_size=128, num_mel_bins=64, patch_size=4, patch_stride=(4, 4),
                                       hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1],
                                       num_attention_heads=[2, 2],
                                       window_size=4, enable_fusion=True, num_classes=10),
                     projection_dim=16)
    paths["clap"] = str(root / "clap")
    ClapModel(cfg).save_pretrained(paths["clap"])
    features = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=1, truncation="fusion")
    features.save_pretrained(paths["clap"])
    tok.save_pretrained(paths["clap"])
    return paths


def tone(seconds, sr, freq, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (1 + c) / 2 for c in range(channels)], 1) if channels > 1 else x


def noise(seconds, sr, seed):
    return 0.2 * np.random.default_rng(seed).standard_normal(int(seconds * sr))


@pytest.fixture
def sets(tmp_path):
    """generated/: a (1.6 s, 44.1 kHz stereo sine), b (1 s, 32 kHz noise, FLAC), c (0.5 s sine:
    shorter than OpenL3's 1 s window); b and c are shorter than PaSST's 1.5 s minimum; same/:
    copies; other/: other sounds. Short, because OpenL3 costs about 20 GFLOP per 1 s frame."""
    gen, same, other = (tmp_path / n for n in ("generated", "same", "other"))
    for d in (gen, same, other):
        d.mkdir()
    sf.write(gen / "a.wav", tone(1.6, 44100, 440, channels=2), 44100)
    sf.write(gen / "b.flac", noise(1.0, 32000, 0), 32000)
    sf.write(gen / "c.wav", tone(0.5, 48000, 1000), 48000)
    for f in gen.iterdir():
        shutil.copy(f, same / f.name)
    sf.write(other / "a.wav", noise(2.0, 44100, 1), 44100)
    sf.write(other / "b.wav", tone(3.0, 22050, 220), 22050)
    sf.write(other / "c.wav", tone(2.0, 44100, 330), 44100)
    prompts = tmp_path / "prompts.jsonl"
    captions = [("a", "a calm sine piece"), ("b", "noisy drums"), ("c", "a short beep"), ("z", "unused")]
    prompts.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in captions))
    return {"generated": str(gen), "same": str(same), "other": str(other), "prompts": str(prompts), "root": tmp_path}


def run_main(argv, capsys):
    report = evaluate.main(argv)
    return report, capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# CLAP


def test_clap_score_is_the_cosine_of_the_projections(weights):
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
    model, extractor, tokenizer = evaluate.load_clap(weights["clap"], "cpu")
    prompt = "a calm piano piece in a major scale, " * 4                      # > 77 bytes: truncated
    audio = tone(0.7, 48000, 440).astype(np.float32) / 0.3 * 10 ** (-1 / 20)
    ours = evaluate.cosine(evaluate.clap_audio_embedding(model, extractor, audio, "cpu")[None],
                           evaluate.clap_text_embeddings(model, tokenizer, [prompt], "cpu"))[0].item()
    # by hand, from the raw model: text_projection(pooled text) . audio_projection(pooled audio)
    raw = ClapModel.from_pretrained(weights["clap"]).eval()
    tok = AutoTokenizer.from_pretrained(weights["clap"])(prompt, truncation=True, max_length=77, return_tensors="pt")
    assert tok["input_ids"].shape[1] == 77
    rounded = (audio * 32767).astype(np.int16) / 32767                        # LAION's int16 rounding (truncation)
    extract = ClapFeatureExtractor.from_pretrained(weights["clap"])
    feats = extract(rounded.astype(np.float32), sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        t = raw.text_projection(raw.text_model(**tok).pooler_output)[0].double()
        pooled = raw.audio_model(input_features=feats["input_features"], is_longer=feats["is_longer"]).pooler_output
        a = raw.audio_projection(pooled)[0].double()
    assert ours == pytest.approx((t @ a / (t.norm() * a.norm())).item(), abs=1e-6)
    assert abs(ours) > 1e-3                                                   # not a trivial zero


# ------------------------------------------------------------------------------------------------
# PaSST front end and loader


@needs_passt
def test_passt_front_end_and_loader(weights):
    model = evaluate.load_passt(weights["passt"], "cpu")
    assert "torchaudio" not in sys.modules or hasattr(sys.modules["torchaudio"], "__file__")  # stand-ins removed
    assert "timm" not in sys.modules or hasattr(sys.modules["timm"], "__file__")
    assert not model.training and model.net.blocks[0].attn.num_heads == 1 and len(model.net.blocks) == 1
    x = torch.from_numpy(noise(2.0, 32000, 3).astype(np.float32))[None]
    with evaluate._quiet(), evaluate._real_stft():
        mel = model.mel(x)
    # hear21passt's mel, by hand: pre-emphasis, |STFT|^2 (hann 800, hop 320, n_fft 1024), Kaldi mel
    # banks 0-15 kHz (one zero column for the Nyquist bin), log(+1e-5), (x + 4.5) / 5
    y = x[:, 1:] - 0.97 * x[:, :-1]
    spec = torch.stft(y, 1024, hop_length=320, win_length=800, window=torch.hann_window(800, periodic=False),
                      center=True, return_complex=True).abs() ** 2
    banks = torch.nn.functional.pad(evaluate.kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0)[0], (0, 1))
    assert torch.allclose(mel, ((banks @ spec + 1e-5).log() + 4.5) / 5, atol=1e-4)
    # probabilities: softmax of the window logits' mean (12 s -> windows at 0 and 5 s)
    audio = noise(12.0, 32000, 4).astype(np.float32)
    p = evaluate.passt_probabilities(model, audio, "cpu")
    with torch.no_grad(), evaluate._quiet(), evaluate._real_stft():
        logits = model(torch.from_numpy(evaluate.passt_windows(audio)))
    assert logits.shape == (2, 527)
    assert torch.allclose(p, torch.softmax(logits.double().mean(0), 0), atol=1e-12)
    assert p.sum().item() == pytest.approx(1)
    assert evaluate.passt_probabilities(model, audio[:32000], "cpu") is None


@needs_passt
def test_load_passt_takes_width_depth_and_heads_from_the_checkpoint_and_a_training_checkpoint(tmp_path):
    """Width 128 and depth 2 (2 heads of 64, as PaSST-S's 768 has 12): the loaded tagger's logits are
    those of the network it was saved from, bit for bit, from a plain state dict and from a training
    checkpoint's "model"."""
    PaSST, _, _, PasstBasicWrapper = evaluate.import_passt()
    torch.manual_seed(0)
    with evaluate._quiet():
        net = PaSST(img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
                    embed_dim=128, depth=2, num_heads=2, distilled=True)
    for p in net.parameters():  # unit-scale activations, so that the split into heads shows in the logits
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
    net.eval()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "training.pt")
    window = torch.from_numpy(noise(10.0, evaluate.PASST_SR, 5).astype(np.float32))[None]
    for name in ("plain.pt", "training.pt"):
        model = evaluate.load_passt(str(tmp_path / name), "cpu")
        assert [b.attn.num_heads for b in model.net.blocks] == [2, 2], name
        reference = PasstBasicWrapper(mel=model.mel, net=net, mode="logits").eval()
        with torch.no_grad(), evaluate._quiet(), evaluate._real_stft():
            got, want = model(window), reference(window)
        assert got.shape == (1, 527) and torch.equal(got, want), name


# ------------------------------------------------------------------------------------------------
# evaluate.py end to end


def test_report_names_both_folders_and_every_setting_of_an_fd_and_clap_run(tmp_path, monkeypatch):
    """An FD + CLAP run from relative paths with --seed 7 (OpenL3 and CLAP stood in by stubs of known
    numbers): the report's folders are absolute, its settings what the command line said, key for key."""
    monkeypatch.chdir(tmp_path)
    for folder in ("gen", "ref"):
        os.mkdir(folder)
        for name, seconds in (("a", 1.2), ("b", 1.5)):
            sf.write(f"{folder}/{name}.wav", tone(seconds, 48000, 440 if folder == "gen" else 330), 48000)
    with open("p.jsonl", "w") as f:
        f.write(json.dumps({"id": "a", "caption": "ab"}) + "\n" + json.dumps({"id": "b", "caption": "abcd"}) + "\n")
    open("openl3.pt", "wb").write(b"stand-in")

    class Encoding(dict):
        def to(self, device):
            return self

    class Tokenizer:  # one token: the text's length
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            return Encoding(input_ids=torch.tensor([[len(t)] for t in texts]), attention_mask=torch.ones(len(texts), 1))

    class Model:
        def get_text_features(self, input_ids, attention_mask):
            return input_ids.float() * torch.tensor([[3.0, 4.0, 0.0]])  # unit: (0.6, 0.8, 0)

        def get_audio_features(self, input_features, is_longer=None):
            return input_features.sum(-1)  # (0, 6, 8), unit: (0, 0.6, 0.8)

    class Extractor:
        sampling_rate = 48000

        def __call__(self, audio, sampling_rate, return_tensors):
            return {"input_features": torch.tensor([[[0.0, 0.0], [2.0, 4.0], [3.0, 5.0]]])}

    monkeypatch.setattr(evaluate, "load_clap", lambda name, device: (Model(), Extractor(), Tokenizer()))
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: "openl3")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(evaluate, "openl3_embeddings", lambda m, a, d, batch_size=32: rng.standard_normal((3, 4)))
    report = evaluate.main(["--generated", "gen", "--reference", "ref", "--metrics", "fd,clap", "--prompts", "p.jsonl",
                            "--openl3", "openl3.pt", "--clap", "stub/clap", "--seed", "7", "--device", "cpu",
                            "--out", "r.json"])
    assert (report["generated"], report["reference"]) == (str(tmp_path / "gen"), str(tmp_path / "ref"))
    assert report["settings"] == {"metrics": ["fd", "clap"], "openl3": "openl3.pt", "passt": None, "clap": "stub/clap",
                                  "prompts": "p.jsonl", "seed": 7, "device": "cpu", "cache": None, "openl3_sr": 48000,
                                  "openl3_hop_s": 0.5, "passt_sr": 32000, "passt_window_s": 10.0, "passt_hop_s": 5.0,
                                  "kl_eps": 1e-6, "peak_dbfs": -1.0}
    # CLAP by hand: cos((0.6, 0.8, 0), (0, 0.6, 0.8)) = 0.48 for each file
    assert [report["per_file"][n]["clap"] for n in "ab"] == pytest.approx([0.48, 0.48], abs=1e-12)
    assert report["clap_score"] == pytest.approx(0.48, abs=1e-12) and report["counts"]["clap_clips"] == 2
    assert json.load(open(tmp_path / "r.json")) == json.loads(json.dumps(report))


def test_evaluate_replaces_only_its_own_report(tmp_path, monkeypatch, capsys):
    """--out that is another program's JSON object is kept (exit 2, before any model loads); an earlier
    report of evaluate.py is replaced."""
    monkeypatch.chdir(tmp_path)
    for folder in ("gen", "ref"):
        os.mkdir(folder)
        sf.write(f"{folder}/a.wav", tone(1.2, 48000, 440), 48000)
    open("openl3.pt", "wb").write(b"stand-in")
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: pytest.fail("a model loaded"))
    argv = ["--generated", "gen", "--reference", "ref", "--metrics", "fd", "--openl3", "openl3.pt", "--out"]
    other = '{"model": "someone else\'s", "settings": {}}'
    open("other.json", "w").write(other)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["other.json"])
    assert e.value.code == 2 and open("other.json").read() == other
    assert _one_line_error(capsys) == ("evaluate.py: error: --out other.json: exists and is not a report of "
                                       "evaluate.py; give a new file name")
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: "openl3")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(evaluate, "openl3_embeddings", lambda m, a, d, batch_size=32: rng.standard_normal((3, 4)))
    first = evaluate.main(argv + ["r.json"])
    second = evaluate.main(argv + ["r.json"])  # a rerun replaces its own report
    assert json.load(open("r.json")) == json.loads(json.dumps(second)) and second["fd_openl3"] != first["fd_openl3"]


def test_fd_alone_lists_every_short_clip_counts_each_set_and_names_only_its_model(tmp_path, capsys, monkeypatch):
    # OpenL3's embeddings stood in for (no weights needed): clips shorter than its 1 s window (0.75 s here)
    # are all listed, however many; each set's files are counted on their own (a reference file without a
    # generated one of its name still counts for FD); the settings name the model run and no other
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    for d in (gen, ref):
        d.mkdir()
        sf.write(d / "long.wav", tone(1.2, 48000, 440), 48000)
        for i in range(3):
            sf.write(d / f"short{i}.wav", tone(0.75, 48000, 440), 48000)
    sf.write(ref / "only-reference.wav", tone(1.2, 48000, 330), 48000)
    weights = tmp_path / "openl3.pt"
    weights.write_bytes(b"stand-in")
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: "openl3")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(evaluate, "openl3_embeddings", lambda m, a, d, batch_size=32: rng.standard_normal((3, 4)))
    out = tmp_path / "report.json"
    report, _ = run_main(["--generated", str(gen), "--reference", str(ref), "--metrics", "fd", "--openl3",
                          str(weights), "--device", "cpu", "--out", str(out)], capsys)
    assert report["short_clips"]["openl3"] == [f"{side}/short{i}.wav" for side in ("generated", "reference")
                                               for i in range(3)]
    assert (report["counts"]["generated"], report["counts"]["reference"]) == (4, 5)
    settings = json.load(open(out))["settings"]
    assert (settings["openl3"], settings["passt"], settings["clap"]) == (str(weights), None, None)


@needs_openl3
@needs_passt
def test_evaluate_end_to_end_identical_sets(weights, sets, capsys):
    """Reference = copies of the generated files: FD ~ 0 and KL ~ 0 (it pairs by name), CLAP is
    the mean of the per-file cosines, frame counts and short clips as worked out by hand."""
    out = str(sets["root"] / "report.json")
    report, cap = run_main(["--generated", sets["generated"], "--reference", sets["same"], "--prompts", sets["prompts"],
                            "--openl3", weights["openl3"], "--passt", weights["passt"], "--clap", weights["clap"],
                            "--device", "cpu", "--out", out], capsys)
    assert json.load(open(out)) == json.loads(json.dumps(report))
    # OpenL3 frames: 1 s windows every 0.5 s after 0.5 s of zeros in front; the end padded to the
    # hop grid: 1.6 s -> 2.1 s -> 4 frames; 1 s -> 2 frames; 0.5 s -> 1 frame. 7 per side.
    assert report["counts"]["openl3_frames_generated"] == report["counts"]["openl3_frames_reference"] == 7
    assert abs(report["fd_openl3"]) < 1e-9
    assert report["counts"]["kl_pairs"] == 1 and report["short_clips"]["passt"] == ["b", "c"]  # 1 s, 0.5 s
    assert -527 * evaluate.KL_EPS < report["kl_passt"] <= 0
    assert report["short_clips"]["openl3"] == ["generated/c.wav", "reference/c.wav"]
    clap = [report["per_file"][n]["clap"] for n in "abc"]
    assert report["clap_score"] == pytest.approx(np.mean(clap), rel=1e-12) and report["counts"]["clap_clips"] == 3
    assert all(math.isfinite(report[k]) for k in ("fd_openl3", "kl_passt", "clap_score"))
    table = cap.out.splitlines()
    assert table[1].startswith("FD_openl3") and table[2].startswith("KL_passt") and table[3].startswith("CLAP")
    assert "shorter than OpenL3's 1 s window" in cap.err and "left out of KL" in cap.err


# the only report test of fd_openl3 with two different sets (with identical ones FD is 0 however the
# statistics are paired): the embeddings stood in by cheap ones (OpenL3 has tests of its own)
def test_fd_openl3_compares_the_generated_frames_with_the_reference_frames(sets, monkeypatch, tmp_path, capsys):
    dummy = tmp_path / "openl3.bin"
    dummy.write_bytes(b"x")
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: "openl3")
    seen = []

    def fake_embeddings(model, audio, device, batch_size=32):  # 4 frames of 5 numbers a file, each of size ~1
        rows = np.array_split(np.asarray(audio, np.float64), 4)
        emb = np.stack([[10 * r.std(), 100 * np.abs(np.diff(r)).mean(), 100 * (r[1:] * r[:-1]).mean(),
                         5 * (r.max() - r.min()), 10 * np.abs(r).mean()] for r in rows])
        seen.append(emb)
        return emb
    monkeypatch.setattr(evaluate, "openl3_embeddings", fake_embeddings)
    # the reference set with one more file, d, that no generated file pairs with (README: it counts for FD)
    extra = tmp_path / "reference"
    shutil.copytree(sets["other"], extra)
    sf.write(extra / "d.wav", tone(1.5, 16000, 300), 16000)
    for reference, n_ref in ((sets["other"], 3), (str(extra), 4)):
        seen.clear()
        check_fd(run_main(["--generated", sets["generated"], "--reference", reference, "--metrics", "fd",
                           "--openl3", str(dummy), "--out", str(tmp_path / "r.json")], capsys)[0], seen, n_ref)
        os.remove(tmp_path / "r.json")


def check_fd(report, seen, n_ref):
    """test_fd_openl3_compares_the_generated_frames_with_the_reference_frames' FD by hand."""
    assert len(seen) == 3 + n_ref                                  # generated a, b, c, then the references
    gen, ref = np.concatenate(seen[:3]), np.concatenate(seen[3:])
    # tr((S1 S2)^(1/2)) as the nuclear norm of A B^T, S1 = A^T A and S2 = B^T B (A, B the centred frames over
    # sqrt(n - 1)): the route test_frechet_distance_of_samples_and_rank_deficient takes. These covariances are
    # ill-conditioned (eigenvalues 3e-7 to 5e2)
    m1, m2 = gen.mean(0), ref.mean(0)
    a, b = (gen - m1) / math.sqrt(len(gen) - 1), (ref - m2) / math.sqrt(len(ref) - 1)
    want = (m1 - m2) @ (m1 - m2) + (a * a).sum() + (b * b).sum() - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum()
    assert want > 1.0                                              # the sets differ: not a trivial 0
    assert report["fd_openl3"] == pytest.approx(want, rel=1e-9)
    assert (report["counts"]["openl3_frames_generated"], report["counts"]["openl3_frames_reference"]) == (12, 4 * n_ref)


@needs_passt
def test_evaluate_kl_by_hand(weights, sets, capsys):
    """Other reference sounds: each pair's KL equals the one computed by hand from the model's
    logits on the files read, resampled and peak-normalised; the mean is the reported number."""
    sf.write(os.path.join(sets["generated"], "d.wav"), noise(3.0, 16000, 5), 16000)   # one padded window
    sf.write(os.path.join(sets["other"], "d.wav"), tone(12.0, 44100, 660), 44100)     # windows at 0 and 5 s
    report, _ = run_main(["--generated", sets["generated"], "--reference", sets["other"], "--metrics", "kl",
                          "--passt", weights["passt"], "--openl3", "/nonexistent/not-needed"], capsys)
    assert "fd_openl3" not in report
    model = evaluate.load_passt(weights["passt"], "cpu")

    def probs(path):
        x, sr = sf.read(path, always_2d=True)
        import soxr
        x = x.mean(1) if sr == 32000 else soxr.resample(x.mean(1), sr, 32000, quality="HQ")
        x = x / np.abs(x).max() * 10 ** (-1 / 20)
        starts = range(0, max(160000, len(x) - 160000), 160000)
        pieces = [x[s:s + 320000] for s in starts]
        w = [np.pad(p, (0, max(0, 320000 - len(p)))) for p in pieces if len(p) > 48000]
        with torch.no_grad(), evaluate._quiet(), evaluate._real_stft():
            return torch.softmax(model(torch.tensor(np.stack(w), dtype=torch.float32)).double().mean(0), 0)

    kl, back = [], []
    for name, gen in (("a", "a.wav"), ("d", "d.wav")):
        p, q = probs(os.path.join(sets["other"], f"{name}.wav")), probs(os.path.join(sets["generated"], gen))
        kl.append(float((p * (p.log() - (q + 1e-6).log())).sum()))
        back.append(float((q * (q.log() - (p + 1e-6).log())).sum()))
        assert report["per_file"][name]["kl_passt"] == pytest.approx(kl[-1], rel=1e-5)
    assert report["counts"]["kl_pairs"] == 2 and report["short_clips"]["passt"] == ["b", "c"]
    assert report["kl_passt"] == pytest.approx(np.mean(kl), rel=1e-5) and report["kl_passt"] > 0.01
    # the reverse direction, KL(gen || ref), by hand too: the mean of two different numbers
    assert report["kl_passt_gen_ref"] == pytest.approx(np.mean(back), rel=1e-5)
    assert abs(back[0] - back[1]) > 1e-3 * max(back)


@pytest.mark.parametrize("case", ["openl3_weights", "passt_weights", "passt_not_passt", "clap_weights", "empty",
                                  "not_a_folder", "unpaired", "no_prompt", "no_prompts_file", "bad_audio",
                                  "nan_audio", "out_nowhere", "out_a_folder", "seed", "clap_no_folder", "clap_a_file"])
def test_evaluate_one_line_errors(case, weights, sets, capsys, tmp_path):
    argv = ["--generated", sets["generated"], "--reference", sets["same"], "--prompts", sets["prompts"],
            "--openl3", weights.get("openl3", "x"), "--passt", weights.get("passt", "x"), "--clap", weights["clap"]]
    culprit = {"openl3_weights": f"--openl3 {tmp_path}/missing.pth.tar: no such weights file (see README, Evaluation, "
                                 "for where to fetch it)", "passt_weights": "--passt", "passt_not_passt": "--passt",
               "clap_weights": "--clap", "empty": "--generated",
               "not_a_folder": "--reference", "unpaired": "--reference", "no_prompt": "--prompts",
               "no_prompts_file": "--prompts", "bad_audio": "bad.wav", "nan_audio": "nan.wav: NaN or infinite samples",
               "out_nowhere": "--out", "out_a_folder": "--out", "seed": "--seed",
               "clap_no_folder": f"--clap {tmp_path}/none: no such local folder",
               "clap_a_file": f"--clap {sets['prompts']}: a file, not a model's folder"}[case]
    if case == "openl3_weights":
        argv[argv.index("--openl3") + 1] = str(tmp_path / "missing.pth.tar")
    elif case == "passt_weights":
        argv += ["--metrics", "kl", "--passt", str(tmp_path / "missing.pt")]
    elif case == "passt_not_passt":  # a file that is there but holds something else
        if "passt" not in weights:
            pytest.skip("hear21passt not installed")
        torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
        argv += ["--metrics", "kl", "--passt", str(tmp_path / "other.pt")]
    elif case == "clap_weights":
        argv += ["--metrics", "clap", "--clap", "laion/not-in-the-cache"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv[1] = str(tmp_path / "empty")
    elif case == "not_a_folder":
        argv[3] = str(tmp_path / "nowhere")
    elif case == "unpaired":
        sf.write(os.path.join(sets["generated"], "d.wav"), tone(1, 16000, 100), 16000)
    elif case == "no_prompt":
        open(sets["prompts"], "w").write(json.dumps({"id": "a", "caption": "x"}) + "\n")
    elif case == "no_prompts_file":
        argv = argv[:4] + argv[6:]
    elif case == "bad_audio":
        if "passt" not in weights:
            pytest.skip("hear21passt not installed")
        for d in (sets["generated"], sets["same"]):
            open(os.path.join(d, "bad.wav"), "wb").write(b"RIFF not really a wav file")
        argv += ["--metrics", "kl"]
    elif case == "nan_audio":  # would come out of every metric as NaN, or stop FD's matrix square root
        sf.write(os.path.join(sets["generated"], "nan.wav"), np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
        open(sets["prompts"], "a").write(json.dumps({"id": "nan", "caption": "x"}) + "\n")
        argv += ["--metrics", "clap"]
    elif case == "out_nowhere":  # found before any model loads, not when the report is written
        argv += ["--metrics", "clap", "--out", str(tmp_path / "nowhere" / "report.json")]
    elif case == "out_a_folder":  # (CLAP: its model is there without the optional OpenL3 and PaSST packages)
        argv += ["--metrics", "clap", "--out", str(tmp_path)]
    elif case == "seed":
        argv += ["--seed", "-1"]
    elif case in ("clap_no_folder", "clap_a_file"):  # found before any model loads: the only line
        argv += ["--clap", str(tmp_path / "none") if case == "clap_no_folder" else sets["prompts"]]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 2
    if case in ("clap_no_folder", "clap_a_file"):
        assert capsys.readouterr().err == f"evaluate.py: error: {culprit}\n"
        return
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("Loading weights")]
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: ") and culprit in err[0], err


# ------------------------------------------------------------------------------------------------
# The convergence comparison


def test_convergence_four_variants(tmp_path, capsys):
    out = str(tmp_path / "rq1")
    budget = ["--layers", "2", "--steps", "3", "--eval-every", "3", "--batch-size", "2", "--d-model", "32",
              "--frames", "16"]
    table = evaluate.main(["--convergence", out] + budget)
    rows = list(csv.DictReader(open(os.path.join(out, "convergence.csv"))))
    assert [r["variant"] for r in rows] == [v for v in evaluate.VARIANTS for _ in range(3)]
    for v in evaluate.VARIANTS:
        own = list(csv.DictReader(open(os.path.join(out, v, "metrics.csv"))))
        mine = [r for r in rows if r["variant"] == v]
        assert [float(r["loss"]) for r in mine] == [float(r["loss"]) for r in own]
        assert [r["caption_score"] != "" for r in mine] == [False, False, True]
        # training time: the sum of the step times, batch 2 x 16 frames over tokens/s
        train_time = sum(32 / float(r["tokens_per_s"]) for r in own)
        assert float(mine[-1]["train_time_s"]) == pytest.approx(train_time, abs=0.01)
        cfg = json.load(open(os.path.join(out, v, "config.json")))["args"]
        settings = (cfg["variant"], cfg["layers"], cfg["steps"], cfg["batch_size"], cfg["seed"], cfg["d_model"])
        assert settings == (v, 2, 3, 2, 0, 32)
    assert float(rows[0]["loss"]) == pytest.approx(math.log(1025), abs=0.5)       # the first step: about uniform
    assert open(os.path.join(out, "convergence.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(table) == 12
    # run again: the finished runs are kept (not trained over); other settings are refused;
    # --plot-only redraws from the runs
    mtime = os.path.getmtime(os.path.join(out, "cross_simba", "ckpt.pt"))
    assert evaluate.main(["--convergence", out] + budget) == table
    assert os.path.getmtime(os.path.join(out, "cross_simba", "ckpt.pt")) == mtime
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", out] + budget[:-2] + ["--frames", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--convergence" in err[0] and "other settings" in err[0]
    os.remove(os.path.join(out, "convergence.png"))
    assert evaluate.main(["--convergence", out, "--plot-only"]) == table
    assert os.path.exists(os.path.join(out, "convergence.png"))


def ssm_state_norm(cache):
    """The mean norm ||h|| of the Mamba-2 states of an InferenceCache over every (layer, row, head), in
    float64 (the conv's states left out), written out apart from evaluate.StateNorms."""
    return np.mean([math.sqrt((h.double() ** 2).sum()) for states in cache.states for state in states
                    if isinstance(state, ssmttm.Mamba2State) for row in state.ssm for h in row])

def test_state_norms_decodes_as_generate_and_keeps_a_norm_per_step():
    # evaluate.window_scores' probe (StateNorms, a generate() decoder, with its prefill and decode):
    # the tokens of generate's own loop, and one mean state norm per decoded step
    torch.manual_seed(0)
    model = ssmttm.TextToMusicLM(ssmttm.ModelConfig(variant="prefix_simba", n_layers=2, d_model=64, d_state=16,
                                                    headdim=16, n_heads=4, d_ff=128, dropout=0.0, n_codebooks=1,
                                                    chunk_size=8)).eval()
    text, mask = data.WordEncoder()(["a calm piano", "fast drums"])
    kw = dict(cfg_scale=3.0, top_k=50, temperature=0.3)
    probe, seen, step = evaluate.StateNorms(), [], model.step

    def recording_step(tokens, cache):  # after each step: ||h|| of every (layer, row, head), in float64
        out = step(tokens, cache)
        seen.append(ssm_state_norm(cache))
        return out
    model.step = recording_step
    got = model.generate(text, mask, 12, decoder=probe, generator=torch.Generator().manual_seed(3), **kw)
    del model.step
    want = model.generate(text, mask, 12, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, want)
    assert len(probe.norms) == len(seen) == 11
    np.testing.assert_allclose(probe.norms, seen, rtol=1e-6)  # the SSM states' norms (not the conv's)


def test_evaluate_out_of_memory_is_one_line(monkeypatch, capsys):
    # the metrics' models on a GPU (a traceback before); any other error is not taken for one
    monkeypatch.setattr(evaluate, "evaluate", lambda args: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--generated", "g", "--reference", "r"])
    assert e.value.code == 2 and _one_line_error(capsys) == (
        "evaluate.py: error: out of memory (CUDA out of memory. Tried to allocate 4.00 GiB); try --device cpu, or "
        "fewer or shorter files")
    monkeypatch.setattr(evaluate, "evaluate", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        evaluate.main(["--generated", "g", "--reference", "r"])


def _one_line_error(capsys):
    """The single error line of a fail() (the 'Loading weights' lines of transformers left out)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(err) == 1, err
    return err[0]


def test_list_audio_and_read_prompts_edges(tmp_path, capsys):
    d = tmp_path / "g"
    d.mkdir()
    sf.write(d / "B.WAV", np.zeros(100), 16000)                  # upper-case extension: an audio file
    sf.write(d / "a.flac", np.zeros(100), 16000)
    (d / "notes.txt").write_text("x")
    (d / "c.wav").mkdir()                                         # a folder named like audio: not a file
    assert evaluate.list_audio(str(d), "--generated") == {"B": str(d / "B.WAV"), "a": str(d / "a.flac")}
    assert list(evaluate.list_audio(str(d), "--generated")) == ["B", "a"]  # sorted by file name
    sf.write(d / "a.wav", np.zeros(100), 16000)                   # a.flac and a.wav: one name twice
    with pytest.raises(SystemExit) as e:
        evaluate.list_audio(str(d), "--generated")
    assert e.value.code == 2
    assert _one_line_error(capsys) == f"evaluate.py: error: --generated {d}: two files are named a (a.flac, a.wav)"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    with pytest.raises(SystemExit):
        evaluate.list_audio(str(empty), "--reference")
    assert _one_line_error(capsys) == (f"evaluate.py: error: --reference {empty}: "
                                       f"no audio files (.wav, .flac, .ogg, .mp3)")
    with pytest.raises(SystemExit):
        evaluate.list_audio(str(tmp_path / "nowhere"), "--reference")
    assert _one_line_error(capsys) == f"evaluate.py: error: --reference {tmp_path / 'nowhere'}: not a folder"
    # prompts: MusicCaps' CSV (ytid, caption), extension in any case; a missing file; another format
    p = tmp_path / "MC.CSV"
    p.write_text("ytid,caption,other\nabc,a calm piece,1\nxyz,\"fast, loud drums\",2\n")
    assert evaluate.read_prompts(str(p)) == {"abc": "a calm piece", "xyz": "fast, loud drums"}
    with pytest.raises(SystemExit) as e:
        evaluate.read_prompts(str(tmp_path / "none.jsonl"))
    assert e.value.code == 2
    assert _one_line_error(capsys) == f"evaluate.py: error: --prompts {tmp_path / 'none.jsonl'}: file not found"
    (tmp_path / "p.txt").write_text("a calm piece\n")
    with pytest.raises(SystemExit):
        evaluate.read_prompts(str(tmp_path / "p.txt"))
    assert _one_line_error(capsys) == (f"evaluate.py: error: --prompts {tmp_path / 'p.txt'}: want a .jsonl or .csv "
                                       "file with an id and a text per entry")
    # "café" with the accent composed in one name and apart in the other (as macOS's HFS+ stores names):
    # one name, which pairs with the prompts' id ("no file named like ..." before)
    nfd = tmp_path / "nfd"
    nfd.mkdir()
    sf.write(nfd / "cafe\u0301.wav", np.zeros(100), 16000)
    assert evaluate.list_audio(str(nfd), "--reference") == {"caf\u00e9": str(nfd / "cafe\u0301.wav")}
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "cafe\u0301", "caption": "a calm piece"}\n', encoding="utf-8")
    assert evaluate.read_prompts(str(p)) == {"caf\u00e9": "a calm piece"}
    p.write_text('{"id": "cafe\u0301", "caption": "x"}\n{"id": "caf\u00e9", "caption": "y"}\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        evaluate.read_prompts(str(p))
    assert _one_line_error(capsys) == (f"evaluate.py: error: --prompts {p}: two ids read 'caf\u00e9' (one with accents "
                                       "composed, one not)")


def test_load_mono_averages_channels_resamples_hq_and_keeps_silence(tmp_path, capsys):
    import soxr
    t = np.arange(22050) / 44100
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 3000 * t + 1)], 1).astype(np.float32)
    sf.write(tmp_path / "st.wav", x, 44100, subtype="FLOAT")
    mono = (x[:, 0] + x[:, 1]) / 2                                           # channels averaged
    want = soxr.resample(mono, 44100, 32000, quality="HQ")
    want = want / np.abs(want).max() * 10 ** (-1 / 20)                         # peak at -1 dBFS
    got = evaluate.load_mono(str(tmp_path / "st.wav"), 32000)
    assert got.dtype == np.float32 and got.shape == want.shape == (16000,)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.abs(got).max() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    # same rate: no resampling, only the peak
    np.testing.assert_allclose(evaluate.load_mono(str(tmp_path / "st.wav"), 44100),
                               mono / np.abs(mono).max() * 10 ** (-1 / 20), rtol=0, atol=2e-7)  # (mixed in fp64)
    # samples far past full scale, as large as float32 holds: the channels' float32 sum was inf, and the
    # peak's division NaN (the scores' JSON then failed); the mix in float64 keeps the waveform
    huge = (x.astype(np.float64) * 6e38).astype(np.float32)  # peaks of 3e38 and 1.2e38
    sf.write(tmp_path / "huge.wav", huge, 44100, subtype="FLOAT")
    np.testing.assert_allclose(evaluate.load_mono(str(tmp_path / "huge.wav"), 44100),
                               mono / np.abs(mono).max() * 10 ** (-1 / 20), rtol=0, atol=1e-6)
    sf.write(tmp_path / "silent.wav", np.zeros((4800, 2)), 48000)
    silent = evaluate.load_mono(str(tmp_path / "silent.wav"), 48000)
    assert silent.shape == (4800,) and not silent.any() and np.isfinite(silent).all()
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(SystemExit) as e:
        evaluate.load_mono(str(tmp_path / "empty.wav"), 16000)
    assert e.value.code == 2
    assert _one_line_error(capsys) == (f"evaluate.py: error: {tmp_path / 'empty.wav'}: no audio samples (an empty or "
                                       "damaged file)")
    # 1 Hz: 100 000 samples would be resampled to 48 kHz, 19 GB
    sf.write(tmp_path / "1hz.wav", np.zeros(100), 1)
    with pytest.raises(SystemExit) as e:
        evaluate.load_mono(str(tmp_path / "1hz.wav"), 48000)
    assert e.value.code == 2 and _one_line_error(capsys) == (
        f"evaluate.py: error: {tmp_path / '1hz.wav'}: sampled at 1 Hz; audio files here are sampled at 8000 Hz or more")


def test_clap_audio_input_clips_and_truncates_to_int16():
    class Recorder:  # stands in for the feature extractor: keeps what it is given
        sampling_rate = 48000

        def __call__(self, audio, sampling_rate, return_tensors):
            self.audio, self.sr, self.rt = audio, sampling_rate, return_tensors
            return "features"

    rec = Recorder()
    audio = np.array([2.0, -3.0, 0.7, -0.7, 0.5, 1.0, -1.0, 1e-5], np.float32)
    assert evaluate.clap_audio_input(rec, audio) == "features"
    # clipped to [-1, 1], times 32767, truncated to int16 (toward zero), back over 32767
    ints = np.array([32767, -32767, 22936, -22936, 16383, 32767, -32767, 0], np.float32)
    assert rec.audio.dtype == np.float32 and np.array_equal(rec.audio, ints / np.float32(32767))
    assert rec.sr == 48000 and rec.rt == "pt"


def test_clap_per_file_scores_pair_each_file_with_its_prompt(weights, sets, capsys):
    """Each file's CLAP value by hand from the raw model: its own prompt (77 tokens at most), the
    file read at 48 kHz, int16-truncated, the extractor's crops after np.random.seed(--seed)."""
    import soxr
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
    np.random.seed(12345)  # another global state: the report must not depend on it
    report, cap = run_main(["--generated", sets["generated"], "--reference", sets["same"], "--prompts", sets["prompts"],
                            "--metrics", "clap", "--clap", weights["clap"], "--seed", "1",
                            "--out", str(sets["root"] / "clap.json")], capsys)
    raw = ClapModel.from_pretrained(weights["clap"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(weights["clap"])
    extract = ClapFeatureExtractor.from_pretrained(weights["clap"])
    prompts = {"a": "a calm sine piece", "b": "noisy drums", "c": "a short beep"}
    np.random.seed(1)
    want = {}
    for name, file in (("a", "a.wav"), ("b", "b.flac"), ("c", "c.wav")):
        x, sr = sf.read(os.path.join(sets["generated"], file), dtype="float32", always_2d=True)
        x = x.mean(1, dtype=np.float64)
        if sr != 48000:
            x = soxr.resample(x, sr, 48000, quality="HQ")
        x = (x * (10 ** (-1 / 20) / np.abs(x).max())).astype(np.float32)  # evaluate.py's steps, in its order
        x = (np.clip(x, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
        feats = extract(x, sampling_rate=48000, return_tensors="pt")
        tok = tokenizer(prompts[name], truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            t = raw.text_projection(raw.text_model(**tok).pooler_output)[0].double()
            pooled = raw.audio_model(input_features=feats["input_features"], is_longer=feats["is_longer"]).pooler_output
            a = raw.audio_projection(pooled)[0].double()
        want[name] = (t @ a / (t.norm() * a.norm())).item()
    for name in "abc":
        assert report["per_file"][name]["clap"] == pytest.approx(want[name], abs=1e-6), name
    assert len({round(v, 4) for v in want.values()}) == 3                      # three different numbers
    assert report["clap_score"] == pytest.approx(np.mean(list(want.values())), abs=1e-6)
    # a (1.6 s) is longer than the 1 s window; b (1 s = 48000 samples) is not
    assert "note: 1 clip(s) longer than CLAP's 1 s window, fusion (seed 1): a" in cap.err.splitlines()
    # the text embeddings: unit length, in order, the same in batches of 2 as one by one
    model, _, tok = evaluate.load_clap(weights["clap"], "cpu")
    texts = [prompts[n] for n in "abc"]
    emb = evaluate.clap_text_embeddings(model, tok, texts, "cpu", batch_size=2)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    with torch.no_grad():
        for i, text in enumerate(texts):
            t = raw.text_projection(raw.text_model(**tokenizer(text, return_tensors="pt")).pooler_output)[0].double()
            assert torch.allclose(emb[i], t / t.norm(), atol=1e-6)


def test_check_inputs_messages_and_notes(sets, tmp_path, capsys):
    dummy = tmp_path / "weights.bin"
    dummy.write_bytes(b"x")
    gen, ref, prompts = sets["generated"], sets["same"], sets["prompts"]

    def check(*extra):
        args = evaluate.parse_args(["--generated", gen, "--reference", ref, "--openl3", str(dummy),
                                    "--passt", str(dummy), *extra])
        return evaluate.check_inputs(args)

    for value in (",", "fd,mfcc"):
        with pytest.raises(SystemExit) as e:
            check("--metrics", value)
        assert e.value.code == 2
        assert _one_line_error(capsys) == (f"evaluate.py: error: --metrics {value}: "
                                           f"choose from fd, kl, clap (comma-separated)")
    metrics, g, r, p = check("--metrics", " kl , fd ", "--prompts", prompts)
    assert metrics == ["kl", "fd"] and list(g) == ["a", "b", "c"] and p == {}
    # a generated file without a reference: refused for KL (pairs by name), fine for FD alone
    sf.write(os.path.join(gen, "d.wav"), tone(0.2, 16000, 100), 16000)
    with pytest.raises(SystemExit):
        check("--metrics", "fd,kl")
    assert _one_line_error(capsys) == (f"evaluate.py: error: --reference {ref}: no file named like 1 generated "
                                       "file(s), e.g. d.wav (KL pairs files by name)")
    assert list(check("--metrics", "fd")[1]) == ["a", "b", "c", "d"]
    assert capsys.readouterr().err == ""
    os.remove(os.path.join(gen, "d.wav"))
    # a reference file without a generated one: a note, which says what it is used for
    sf.write(os.path.join(ref, "e.wav"), tone(0.2, 16000, 100), 16000)
    check("--metrics", "fd")
    assert capsys.readouterr().err == ("note: 1 reference file(s) have no generated file of the same name: "
                                       "used for FD only\n")
    check("--metrics", "kl")
    assert capsys.readouterr().err == "note: 1 reference file(s) have no generated file of the same name: not used\n"
    # prompts for CLAP: each generated file needs one
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"id": "a", "caption": "x"}) + "\n")
    with pytest.raises(SystemExit):
        check("--metrics", "clap", "--prompts", str(few))
    assert _one_line_error(capsys) == (f"evaluate.py: error: --prompts {few}: "
                                       f"no prompt for 2 generated file(s), e.g. id b")
    assert check("--metrics", "clap", "--prompts", prompts)[3] == {"a": "a calm sine piece", "b": "noisy drums",
                                                                   "c": "a short beep", "z": "unused"}
    capsys.readouterr()


def test_parse_args_bounds_and_conflicts(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2
        return _one_line_error(capsys)

    out = str(tmp_path / "rq1")
    for flag in ("--layers", "--steps", "--eval-every", "--batch-size", "--d-model", "--frames"):
        assert error(["--convergence", out, flag, "0"]) == f"evaluate.py: error: {flag} must be at least 1"
        assert getattr(evaluate.parse_args(["--convergence", out, flag, "1"]), flag[2:].replace("-", "_")) == 1
    assert error(["--convergence", out, "--generated", "g"]) == \
        "evaluate.py: error: --convergence trains and plots; it takes no --generated/--reference/--cache"
    assert error(["--convergence", out, "--reference", "r"]) == \
        "evaluate.py: error: --convergence trains and plots; it takes no --generated/--reference/--cache"
    for argv in ([], ["--generated", "g"], ["--reference", "r"]):
        assert error(argv) == "evaluate.py: error: give --generated DIR and --reference DIR (or --convergence OUT)"
    none = tmp_path / "none.pt"
    assert error(["--long", str(none)]) == f"evaluate.py: error: --long {none}: no such file"
    assert error(["--long", "x", "--times", "0"]).startswith("evaluate.py: error: argument --times")
    # past sys.maxsize a progress bar over them raised OverflowError
    for flag, hi in (("--times", 1000), ("--seeds", 1000), ("--n-prompts", 10000)):
        assert error(["--long", "x", flag, "1" + "0" * 20]) == (
            f"evaluate.py: error: argument {flag}: expected a whole number from 1 to {hi}, not '1{'0' * 20}'")
    # --device as train.py, generate.py and data.py take it
    assert error(["--generated", "g", "--reference", "r", "--device", "tpu"]) == \
        "evaluate.py: error: argument --device: expected auto, cpu, cuda or cuda:N, not 'tpu'"
    if not torch.cuda.is_available():
        assert error(["--generated", "g", "--reference", "r", "--device", "cuda"]) == \
            "evaluate.py: error: argument --device: 'cuda', but torch sees no CUDA device here"
    args = evaluate.parse_args(["--generated", "g", "--reference", "r"])
    assert (args.metrics, args.seed, args.device, args.out) == ("fd,kl,clap", 0, "auto", None)


def test_print_table_exact(capsys):
    report = {"counts": {"generated": 3, "reference": 4, "openl3_frames_generated": 7, "openl3_frames_reference": 9,
                         "kl_pairs": 2, "clap_clips": 3},
              "fd_openl3": 12.345678, "kl_passt": 0.123456, "kl_passt_gen_ref": 0.654321, "clap_score": -0.05}
    evaluate.print_table(report)
    evaluate.print_table({"counts": {"kl_pairs": 0}, "kl_passt": None, "kl_passt_gen_ref": None})
    assert capsys.readouterr().out.splitlines() == [
        "metric                         value  over",
        "FD_openl3 (lower is better)  12.3457  3 generated files (7 frames) vs 4 reference files (9 frames)",
        "KL_passt (lower is better)    0.1235  2 pairs, KL(reference || generated); KL(generated || reference) 0.6543",
        "CLAP (higher is better)      -0.0500  3 generated files and their prompts",
        "metric                      value  over",
        "KL_passt (lower is better)    n/a  0 pairs, KL(reference || generated)"]


@needs_passt
def test_kl_report_default_path_settings_and_pairs_left_out(weights, sets, capsys, tmp_path):
    report, cap = run_main(["--generated", sets["generated"], "--reference", sets["other"], "--metrics", "kl",
                            "--passt", weights["passt"]], capsys)
    path = os.path.join(sets["generated"], "evaluation.json")                # the default: beside the generated files
    assert json.load(open(path)) == json.loads(json.dumps(report))
    assert not os.path.exists(os.path.join(sets["other"], "evaluation.json"))
    assert report["settings"] == {"metrics": ["kl"], "openl3": None, "passt": weights["passt"], "clap": None,
                                  "prompts": None, "seed": 0, "cache": None,
                                  "device": "cpu",  # --device auto, the CPU in the tests (conftest.py)
                                  "openl3_sr": 48000, "openl3_hop_s": 0.5, "passt_sr": 32000, "passt_window_s": 10.0,
                                  "passt_hop_s": 5.0, "kl_eps": 1e-6, "peak_dbfs": -1.0}
    assert report["counts"]["kl_pairs"] == 1 and report["short_clips"]["passt"] == ["b", "c"]
    assert cap.err.splitlines()[-1] == ("note: 2 pair(s) left out of KL, "
                                        "a clip of 1.5 s or less (PaSST window 10 s): b, c")
    # a pair whose generated file is long enough but whose reference is not is left out too;
    # no pair at all: no number (null), not 0
    g, r = tmp_path / "g", tmp_path / "r"
    g.mkdir(), r.mkdir()
    sf.write(g / "x.wav", noise(3.0, 32000, 7), 32000)
    sf.write(r / "x.wav", noise(1.0, 32000, 8), 32000)
    sf.write(g / "y.wav", noise(1.2, 32000, 9), 32000)
    sf.write(r / "y.wav", noise(3.0, 32000, 10), 32000)
    report, cap = run_main(["--generated", str(g), "--reference", str(r), "--metrics", "kl",
                            "--passt", weights["passt"]],
                           capsys)
    assert report["short_clips"]["passt"] == ["x", "y"] and report["counts"]["kl_pairs"] == 0
    assert report["kl_passt"] is None and report["kl_passt_gen_ref"] is None
    assert report["per_file"] == {"x": {}, "y": {}}
    assert "KL_passt (lower is better)    n/a  0 pairs, KL(reference || generated)" in cap.out.splitlines()


@needs_openl3
def test_openl3_batches_and_one_frame_sets(weights, sets, capsys, tmp_path):
    from torchopenl3.utils import preprocess_audio_batch
    model = evaluate.load_openl3(weights["openl3"], "cpu")
    audio = evaluate.load_mono(os.path.join(sets["generated"], "a.wav"), 48000)  # 1.6 s: 4 frames
    emb = evaluate.openl3_embeddings(model, audio, "cpu", batch_size=3)       # batches of 3 and 1
    frames = preprocess_audio_batch(torch.from_numpy(audio)[None], 48000, center=True, hop_size=0.5)
    with torch.no_grad():
        want = model(frames.float()).double().numpy()
    assert emb.shape == want.shape == (4, 512) and emb.dtype == np.float64
    # what a cache entry is checked against: the model's width and the frame count of the clip's length
    assert (evaluate.openl3_frame_count(len(audio)), model.embedding_size) == emb.shape
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-5)
    # a set whose clips give one frame in all has no covariance: one line naming that side's folder
    g, r = tmp_path / "g", tmp_path / "r"
    g.mkdir(), r.mkdir()
    shutil.copy(os.path.join(sets["generated"], "c.wav"), g / "c.wav")      # 0.5 s: 1 frame
    shutil.copy(os.path.join(sets["generated"], "a.wav"), r / "c.wav")
    for gen, ref, side, folder in ((g, r, "generated", g), (r, g, "reference", g)):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--generated", str(gen), "--reference", str(ref), "--metrics", "fd",
                           "--openl3", weights["openl3"], "--out", str(tmp_path / "o.json")])
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py")]
        assert err == [f"evaluate.py: error: --{side} {folder}: one OpenL3 frame in all (a clip under 1 s); "
                       "a covariance needs at least 2"]
    wav = (r / "c.wav").read_bytes()  # --out naming a reference clip by mistake: kept, before any work
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--generated", str(r), "--reference", str(g), "--metrics", "fd", "--openl3", weights["openl3"],
                       "--out", str(r / "c.wav")])
    assert e.value.code == 2 and (r / "c.wav").read_bytes() == wav
    assert capsys.readouterr().err.endswith(f"--out {r / 'c.wav'}: exists and is not a report of evaluate.py; give a "
                                            "new file name\n")


def _fake_runs(out, n=25, lr=None):
    """The four run folders of a convergence comparison as train.py leaves them (metrics.csv,
    config.json, ckpt.pt), with known numbers."""
    budget = {"layers": 2, "steps": n, "batch_size": 2, "grad_accum": 3, "seed": 0, "eval_every": 5, "d_model": 32,
              "frames": 16, "lr": 1e-3}
    losses = {}
    for i, v in enumerate(evaluate.VARIANTS):
        d = os.path.join(out, v)
        os.makedirs(d)
        loss = [7.0 - 0.1 * s - 0.01 * i + 0.05 * (s % 3) for s in range(n)]
        losses[v] = loss
        with open(os.path.join(d, "metrics.csv"), "w") as f:
            f.write("step,loss,caption_score,elapsed_s,tokens_per_s\n")
            for s in range(n):
                score = f"{0.2 + 0.01 * s + 0.1 * i:.2f}" if (s + 1) % 5 == 0 else ""
                f.write(f"{s + 1},{loss[s]},{score},{0.5 * (s + 1)},{1000 * (i + 1)}\n")
        args = {**budget, "variant": v, "lr": lr if (lr and i == 2) else budget["lr"]}
        json.dump({"args": args}, open(os.path.join(d, "config.json"), "w"))
        torch.save({"model": {"w": torch.zeros(3, 4 + i), "b": torch.zeros(5)}}, os.path.join(d, "ckpt.pt"))
    return losses


def test_convergence_plot_only_csv_summary_and_plot(tmp_path, capsys, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes
    out = str(tmp_path / "rq1")
    losses = _fake_runs(out)
    drawn, plot = [], matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        drawn.append((np.asarray(args[0], float), np.asarray(args[1], float), kwargs.get("label")))
        return plot(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    capsys.readouterr()
    evaluate.main(["--convergence", out, "--plot-only"])
    printed = capsys.readouterr().out.splitlines()
    text = open(os.path.join(out, "convergence.csv")).read().splitlines()
    assert text[0] == "variant,params,step,loss,caption_score,train_time_s,elapsed_s,tokens_per_s"
    assert len(text) == 1 + 4 * 25
    # tokens per step 2 x 3 x 16 = 96; prefix_mamba at 1000 tokens/s: 0.096 s a step, rounded to 0.01 s
    assert text[1] == f"prefix_mamba,17,1,{losses['prefix_mamba'][0]},,0.1,0.5,1000.0"
    assert text[5] == f"prefix_mamba,17,5,{losses['prefix_mamba'][4]},0.24,0.48,2.5,1000.0"
    assert text[-1] == f"cross_transformer,26,25,{losses['cross_transformer'][24]},0.74,0.6,12.5,4000.0"
    for i, v in enumerate(evaluate.VARIANTS):
        loss = losses[v]
        tt = 96 * 25 / (1000 * (i + 1))
        curve = " ".join(f"{0.2 + 0.01 * s + 0.1 * i:.2f}" for s in range(4, 25, 5))
        assert printed[i] == (f"{v:<18} loss (mean of the last 20 steps) {sum(loss[5:]) / 20:.3f}  "
                              f"caption score {curve}  training {tt:.0f} s")
        # the plotted loss: running mean of 10 steps, at the step (and training time) of its last one
        mine = [d for d in drawn if d[2] == f"{v.replace('_', ' ')} ({(12 + 3 * i + 5) / 1e6:.2f} M)"]
        assert len(mine) == 4
        run_mean = [sum(loss[j - 9:j + 1]) / 10 for j in range(9, 25)]
        np.testing.assert_allclose(mine[0][0], np.arange(10, 26))
        np.testing.assert_allclose(mine[0][1], run_mean, rtol=1e-12)
        np.testing.assert_allclose(mine[2][1], run_mean, rtol=1e-12)
        np.testing.assert_allclose(mine[2][0], [round(96 * j / (1000 * (i + 1)), 2) for j in range(10, 26)])
        np.testing.assert_allclose(mine[1][0], np.arange(5, 26, 5))
    assert printed[-1].startswith("wrote ")
    # a second --convergence in the folder while one runs (holding OUT/.lock) is refused in one line: the two
    # wrote the table and the plot through one temporary name, and one failed with a traceback
    import data as datamod
    with datamod.exclusive_lock(os.path.join(out, ".lock"), "held"):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--convergence", out, "--plot-only"])
    assert e.value.code == 2
    assert _one_line_error(capsys) == f"--convergence {out}: another evaluate.py is using this folder"


def test_convergence_refuses_other_budgets_missing_runs_and_failed_training(tmp_path, capsys, monkeypatch):
    import train
    out = str(tmp_path / "rq1")
    _fake_runs(out, n=12, lr=3e-3)                                             # cross_simba: another lr
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", out, "--plot-only"])
    assert e.value.code == 2
    assert _one_line_error(capsys) == (f"evaluate.py: error: --convergence {out}: "
                                       f"the four runs were not trained with the same budget")
    shutil.rmtree(os.path.join(out, "cross_simba"))
    with pytest.raises(SystemExit):
        evaluate.main(["--convergence", out, "--plot-only"])
    assert _one_line_error(capsys) == (f"evaluate.py: error: --convergence: {os.path.join(out, 'cross_simba')} has no "
                                       "finished run (metrics.csv, config.json)")
    # training that stops: its own exit code (train.py has printed its one line), not the rest of the runs;
    # OUT's name is on disk (its folder synced) before the first run writes in it
    calls, synced, fsync_dir = [], [], evaluate.datamod.fsync_dir

    def stopped(argv, **kw):
        calls.append(argv)
        raise SystemExit(130)
    monkeypatch.setattr(train, "main", stopped)
    monkeypatch.setattr(evaluate.datamod, "fsync_dir", lambda path: (synced.append((path, len(calls))),
                                                                      fsync_dir(path))[1])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(tmp_path / "new"), "--steps", "4", "--layers", "1"])
    assert e.value.code == 130 and len(calls) == 1 and "error" not in capsys.readouterr().err
    assert calls[0][:4] == ["--variant", "prefix_mamba", "--out", str(tmp_path / "new" / "prefix_mamba")]
    assert synced == [(str(tmp_path), 0)]


def test_convergence_checks_its_folder_and_every_variant_before_any_trains(tmp_path, capsys, monkeypatch):
    """--convergence OUT that cannot be a folder, or settings that one variant refuses (whichever
    comes first in VARIANTS), stop with one line before the first variant trains."""
    import train
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, **kw: calls.append(argv))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(tmp_path / "a_file"), "--steps", "4", "--layers", "1"])
    assert e.value.code == 2 and calls == []
    assert _one_line_error(capsys) == f"--convergence {tmp_path / 'a_file'}: it exists and is not a folder"
    # --d-model 24 splits into the Cross Transformer's 4 heads, not into Mamba-2's heads of 32
    monkeypatch.setattr(evaluate, "VARIANTS", tuple(reversed(evaluate.VARIANTS)))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(tmp_path / "new"), "--steps", "4", "--layers", "1", "--d-model", "24"])
    assert e.value.code == 2 and calls == [] and not os.path.exists(tmp_path / "new")
    # (its program: evaluate.py, whose flag it is; it said "train.py: error:")
    assert _one_line_error(capsys).startswith("evaluate.py: error: argument --d-model: expected a multiple of 16 for "
                                              "cross_simba")
    # a flag in evaluate.py's bounds that train.py refuses; a variant's folder that cannot be one, named as
    # --convergence's (train.py's check named --out, a flag evaluate.py does not take)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(tmp_path / "new"), "--steps", "4", "--layers", "3000000000"])
    assert e.value.code == 2 and calls == [] and not os.path.exists(tmp_path / "new")
    assert _one_line_error(capsys) == ("evaluate.py: error: argument --layers: expected a whole number from 1 to "
                                       "2147483647, not '3000000000'")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "cross_transformer").write_text("x")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(tmp_path / "taken"), "--steps", "4", "--layers", "1"])
    assert e.value.code == 2 and calls == []
    assert _one_line_error(capsys) == (f"--convergence {tmp_path / 'taken' / 'cross_transformer'}: it exists and is "
                                       "not a folder")
    with pytest.raises(SystemExit):  # settings every variant takes: each trains, in order (then no runs to read)
        evaluate.main(["--convergence", str(tmp_path / "new"), "--steps", "4", "--layers", "1", "--d-model", "32"])
    assert [argv[1] for argv in calls] == list(evaluate.VARIANTS)


def test_convergence_names_a_damaged_run_folder_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "rq1")
    _fake_runs(out, n=6)
    run = os.path.join(out, "cross_simba")
    metrics, config, ckpt = (os.path.join(run, f) for f in ("metrics.csv", "config.json", "ckpt.pt"))
    good = {f: open(f, "rb").read() for f in (metrics, config, ckpt)}
    for path, damaged, message in (
            (metrics, b"step,loss,caption_score,elapsed_s,tokens_per_s\n",
             f"--convergence: {metrics} has no logged step"),
            (metrics, good[metrics].replace(b"\n2,", b"\nx,", 1),
             f"{metrics}:3: not a row of train.py's metrics; move the file away to resume without the earlier rows"),
            (config, b"{not json",
             f"--convergence: {config}: not a train.py config (with {', '.join(evaluate.BUDGET)})"),
            (ckpt, b"PK cut short", None)):
        open(path, "wb").write(damaged)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--convergence", out, "--plot-only"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert err.endswith(f"{message}\n") if message else err.startswith(f"{ckpt}: not a readable checkpoint")
        open(path, "wb").write(good[path])
    (tmp_path / "rq1" / "cross_simba" / "metrics.csv").write_bytes(good[metrics] + b"7,1.5")  # a row a crash cut
    assert len(evaluate.read_run(run)[0]) == 6


def test_training_time_and_read_run(tmp_path, capsys):
    rows = [{"tokens_per_s": 100.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": 200.0}]
    got = evaluate.training_time(rows, {"batch_size": 2, "grad_accum": 3, "frames": 10})  # 60 tokens a step
    np.testing.assert_allclose(got, [0.6, 1.8, 2.1], rtol=1e-12)
    # under torchrun, tokens_per_s counts every process's tokens: a step of 2 processes is 120 tokens
    got = evaluate.training_time(rows, {"batch_size": 2, "grad_accum": 3, "frames": 10}, processes=2)
    np.testing.assert_allclose(got, [1.2, 3.6, 4.2], rtol=1e-12)
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.csv").write_text("step,loss,caption_score\n1,2.5,\n2,2.0,0.5\n")
    saved = {"args": {k: 1 for k in evaluate.BUDGET}}
    (d / "config.json").write_text(json.dumps(saved))
    rows = [{"step": 1.0, "loss": 2.5, "caption_score": None}, {"step": 2.0, "loss": 2.0, "caption_score": 0.5}]
    assert evaluate.read_run(str(d)) == (rows, saved["args"], 1)  # saved before train.py kept processes: 1
    (d / "config.json").write_text(json.dumps({**saved, "processes": 2}))
    assert evaluate.read_run(str(d)) == (rows, saved["args"], 2)
    for processes in (0, 1.5, "2", True):  # a config.json edited by hand: one line, not a traceback later
        (d / "config.json").write_text(json.dumps({**saved, "processes": processes}))
        with pytest.raises(SystemExit) as e:
            evaluate.read_run(str(d))
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"evaluate.py: error: --convergence: {d / 'config.json'}: processes {processes!r}, want a whole number of "
            "1 or more\n")


def test_long_windows_state_norms_and_default_report(tmp_path, capsys, monkeypatch):
    """--long on a tiny synthetic-set checkpoint: the windowed run is generate_in_windows' codes (not
    a second one-pass run), std over prompts x seeds with ddof 0, the state norm at each window's last
    step, the JSON beside the checkpoint."""
    import train
    run = tmp_path / "run"
    train.main(["--variant", "prefix_simba", "--out", str(run), "--steps", "1", "--batch-size", "2", "--d-model", "32",
                "--d-state", "16", "--frames", "8", "--layers", "1", "--eval-every", "0"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.json").write_text('{"a": 1}')  # another program's JSON: kept, before any work
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--long", str(run / "ckpt.pt"), "--out", str(tmp_path / "other.json")])
    assert e.value.code == 2 and (tmp_path / "other.json").read_text() == '{"a": 1}'
    assert "exists and is not a report of evaluate.py" in capsys.readouterr().err
    report = evaluate.main(["--long", str(run / "ckpt.pt"), "--times", "3", "--n-prompts", "3", "--seeds", "2"])
    assert json.load(open(run / "long.json")) == report                        # beside the checkpoint
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    model = ssmttm.TextToMusicLM(ssmttm.ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    captions = data.SyntheticMusic(8, seed=0).captions(3)
    text, mask = data.WordEncoder()(captions)
    kw = dict(cfg_scale=3.0, top_k=50, temperature=0.3)
    score = lambda codes: [[data.caption_score(c[:, w * 8:(w + 1) * 8], cap) for w in range(3)]
                           for c, cap in zip(codes.numpy(), captions)]
    one, win, norms = [], [], []
    step = model.step
    for seed in range(2):
        seen = []

        def recording_step(tokens, cache):
            out = step(tokens, cache)
            seen.append(ssm_state_norm(cache))
            return out
        model.step = recording_step
        one += score(model.generate(text, mask, 24, generator=torch.Generator().manual_seed(seed), **kw))
        del model.step
        win += score(ssmttm.generate_in_windows(model, text, mask, 24, 8, generator=torch.Generator().manual_seed(seed),
                                                **kw))
        assert len(seen) == 23                                                    # steps 1..23 write frames 1..23
        norms.append(seen)
    one, win = np.array(one), np.array(win)
    assert report["one_pass"]["mean"] == np.round(one.mean(0), 4).tolist()
    assert report["windows"]["mean"] == np.round(win.mean(0), 4).tolist()
    assert report["windows"]["std"] == np.round(np.sqrt(((win - win.mean(0)) ** 2).mean(0)), 4).tolist()
    assert report["one_pass"]["std"] == np.round(np.sqrt(((one - one.mean(0)) ** 2).mean(0)), 4).tolist()
    assert win.std(0).max() > 0 and not np.array_equal(one[:, 1:], win[:, 1:])  # the test tells these apart
    # the state norm after the step that writes each window's last frame (frames 7, 15 and 23)
    for w, s in ((0, 7), (1, 15), (2, 23)):
        assert report["one_pass"]["state_norm"][w] == pytest.approx((norms[0][s - 1] + norms[1][s - 1]) / 2, abs=6e-4)
    assert report["sampling"] == {"cfg_scale": 3.0, "top_k": 50, "temperature": 0.3}
    assert (report["ckpt"], report["step"], report["trained_frames"], report["times"], report["prompts"],
            report["seeds"]) == (str(run / "ckpt.pt"), 1, 8, 3, 3, 2)


def test_long_state_norms_follow_the_step_that_completes_each_windows_last_frame_with_nine_codebooks():
    """window_scores with K = 9: in the delay pattern a frame is whole only when its codebook 9 is
    written, K - 1 steps after its codebook 1; the norm of each window is read after that step."""
    torch.manual_seed(0)
    K, frames, times = 9, 18, 2
    model = ssmttm.TextToMusicLM(ssmttm.ModelConfig(variant="prefix_simba", n_layers=1, d_model=32, d_state=16,
                                                    headdim=16, n_heads=2, d_ff=64, dropout=0.0, n_codebooks=K,
                                                    chunk_size=8)).eval()
    captions = data.SyntheticMusic(frames, seed=0).captions(2)
    seen, step = [], model.step

    def recording_step(tokens, cache):
        out = step(tokens, cache)
        seen.append(ssm_state_norm(cache))
        return out
    model.step = recording_step
    _, norms = evaluate.window_scores(model, captions, frames, times, 0, windows=False)
    # the step that writes codebook K of frame f, from the layout itself: step s reads seen[s - 1]
    layout = ssmttm.delay_pattern(torch.arange(frames * times)[None, None].repeat(1, K, 1), special=-1)[0, K - 1]
    last = [int((layout == (w + 1) * frames - 1).nonzero()) for w in range(times)]
    assert last == [25, 43] and len(seen) == frames * times + K - 2
    np.testing.assert_allclose(norms, [seen[s - 1] for s in last], rtol=1e-6)
    assert norms[0] != pytest.approx(seen[frames - 2], rel=1e-6)  # K = 1's step: codebook 1 of the last frame


def test_convergence_refuses_an_eval_interval_past_its_steps(tmp_path, capsys):
    # --eval-every 0 is refused (no caption score); --eval-every past --steps scored no step either, silently: the
    # plot's and table's caption scores were empty. The default 25 comes down to a shorter run's --steps
    out = str(tmp_path / "rq1")
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--convergence", out, "--steps", "2", "--eval-every", "3"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "evaluate.py: error: --eval-every 3: more than --steps 2, so no step would be scored; pass at most 2\n")
    assert evaluate.parse_args(["--convergence", out, "--steps", "2", "--eval-every", "2"]).eval_every == 2
    assert evaluate.parse_args(["--convergence", out, "--steps", "10"]).eval_every == 10
    assert evaluate.parse_args(["--convergence", out]).eval_every == 25
    assert not os.path.exists(out)



def test_check_output_file_messages(tmp_path, capsys, monkeypatch):
    assert evaluate.check_output_file(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    for path, flag, message in ((tmp_path, "--out", f"--out {tmp_path}: is a folder; give the report's file name"),
                                (tmp_path / "no" / "r.json", "--out",
                                 f"--out {tmp_path / 'no' / 'r.json'}: no folder {tmp_path / 'no'}")):
        with pytest.raises(SystemExit) as e:
            evaluate.check_output_file(str(path), flag)
        assert e.value.code == 2 and _one_line_error(capsys) == f"evaluate.py: error: {message}"
    # a folder that takes no new files (as a non-root user would see a read-only one)
    seen = []
    monkeypatch.setattr(evaluate.os, "access", lambda p, mode: seen.append((p, mode)) or False)
    with pytest.raises(SystemExit):
        evaluate.check_output_file(str(tmp_path / "r.json"), "--out")
    assert seen == [(str(tmp_path), os.W_OK | os.X_OK)]
    assert _one_line_error(capsys) == f"evaluate.py: error: --out {tmp_path / 'r.json'}: cannot write in {tmp_path}"
    monkeypatch.undo()
    # an existing file: replaced only when it is a report of the same kind (a rerun's), else kept
    (tmp_path / "old.json").write_text('{"generated": "g", "reference": "r", "settings": {}}')
    assert evaluate.check_output_file(str(tmp_path / "old.json"), keys=("generated", "settings")).endswith("old.json")
    for name, content in (("take.wav", b"RIFF audio"), ("victim.pt", b"PK weights"), ("other.json", b'{"a": 1}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit) as e:
            evaluate.check_output_file(str(tmp_path / name), keys=("generated", "settings"))
        assert e.value.code == 2 and (tmp_path / name).read_bytes() == content
        assert _one_line_error(capsys) == (f"evaluate.py: error: --out {tmp_path / name}: exists and is not a report "
                                           "of evaluate.py; give a new file name")


def test_convergence_skips_finished_runs_and_resumes_the_others(tmp_path, capsys, monkeypatch):
    import train
    out = tmp_path / "rq1"
    _fake_runs(str(out), n=12)
    budget = ["--layers", "2", "--steps", "12", "--seed", "0", "--eval-every", "5", "--log-every", "1",
              "--batch-size", "2", "--d-model", "32", "--frames", "16"]
    for i, v in enumerate(evaluate.VARIANTS):  # as train.py saved them: prefix_simba stopped at step 11 of 12
        want = vars(train.parse_args(["--variant", v, "--out", str(out / v)] + budget)[0])
        json.dump({"args": {k: want[k] for k in evaluate.BUDGET}}, open(out / v / "config.json", "w"))
        torch.save({"model": {"w": torch.zeros(2)}, "args": want, "step": 11 if i == 1 else 12}, out / v / "ckpt.pt")
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, **kw: calls.append(argv))
    capsys.readouterr()
    evaluate.main(["--convergence", str(out), "--layers", "2", "--steps", "12", "--eval-every", "5",
                   "--batch-size", "2", "--d-model", "32", "--frames", "16"])
    assert calls == [["--variant", "prefix_simba", "--out", str(out / "prefix_simba")] + budget + ["--resume"]]
    printed = capsys.readouterr().out.splitlines()
    assert printed[:4] == ["== prefix_mamba: done earlier (12 steps)",
                           "== prefix_simba: train.py "
                           + " ".join(["--variant", "prefix_simba", "--out", str(out / "prefix_simba")] + budget
                                      + ["--resume"]),
                           "== cross_simba: done earlier (12 steps)", "== cross_transformer: done earlier (12 steps)"]


def test_convergence_prints_the_train_command_it_runs(tmp_path, capsys, monkeypatch):
    """The "== variant: train.py ..." line, split as a shell splits it, is the argv train.main was given: the
    variant included (it was left out, so that the line run trained prefix_simba into every variant's folder)
    and a folder with a space or a quote quoted."""
    import shlex
    import train
    out = tmp_path / "rq 1's"
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, **kw: calls.append(list(argv)))
    monkeypatch.setattr(evaluate, "read_run", lambda folder: ([{"step": 1.0, "loss": 1.0, "caption_score": None,
                                                                "elapsed_s": 1.0, "tokens_per_s": 1.0}],
                                                              {k: 1 for k in evaluate.BUDGET}, 1))
    monkeypatch.setattr(evaluate, "plot_convergence", lambda *a: None)
    capsys.readouterr()
    evaluate.main(["--convergence", str(out), "--layers", "2", "--steps", "3", "--eval-every", "1",
                   "--batch-size", "2", "--d-model", "32", "--frames", "16"])
    printed = [line.split(": train.py ", 1)[1] for line in capsys.readouterr().out.splitlines()
               if ": train.py " in line]
    assert [shlex.split(line) for line in printed] == calls and len(calls) == len(evaluate.VARIANTS)
    for variant, line in zip(evaluate.VARIANTS, printed):  # as train.py reads it: that variant, that folder
        args = train.parse_args(shlex.split(line))[0]
        assert (args.variant, args.out) == (variant, str(out / variant))


def test_long_refuses_a_checkpoint_of_one_frame(tmp_path, capsys):
    """A window of one frame has no decoding step before its last frame (the prefill writes frame 0);
    with K codebooks a window needs 2K frames (generate_in_windows' default context)."""
    import train
    run = tmp_path / "run"
    train.main(["--variant", "prefix_simba", "--out", str(run), "--steps", "1", "--batch-size", "2", "--d-model", "32",
                "--d-state", "16", "--frames", "1", "--layers", "1", "--eval-every", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--long", str(run / "ckpt.pt")])
    assert e.value.code == 2 and _one_line_error(capsys) == (
        f"evaluate.py: error: --long {run / 'ckpt.pt'}: trained on 1 frame; a window needs at least 2 with K = 1")
    run = tmp_path / "run9"  # with the delay pattern of 9 codebooks, at least 18
    train.main(["--variant", "prefix_simba", "--out", str(run), "--steps", "1", "--batch-size", "2", "--d-model", "32",
                "--d-state", "16", "--frames", "17", "--layers", "1", "--eval-every", "0", "--codebooks", "9"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--long", str(run / "ckpt.pt")])
    assert e.value.code == 2 and _one_line_error(capsys) == (
        f"evaluate.py: error: --long {run / 'ckpt.pt'}: trained on 17 frames; a window needs at least 18 with K = 9")


def test_cosine_is_row_wise_and_scale_free():
    # evaluate.cosine on vectors that are NOT unit length: transformers' get_*_features happen to
    # return unit vectors today, so the CLAP tests cannot tell a cosine from a plain dot product
    a = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 2.0, 2.0]])
    b = np.array([[6.0, 8.0, 0.0], [-5.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    want = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]  # 1, -1, 1/sqrt2, 2/3
    got = evaluate.cosine(a, b)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got.tolist() == pytest.approx([1.0, -1.0, 2 ** -0.5, 2 / 3], abs=1e-12)


def test_clap_embeddings_are_unit_length_whatever_the_model_returns():
    # the docstrings promise unit-length projections; evaluate.py normalises them itself, so the CLAP
    # score stays a cosine if a transformers release stops normalising (stub model, tokenizer, extractor)
    class Encoding(dict):
        def to(self, device):
            return self

    class Tokenizer:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            assert truncation and max_length == evaluate.CLAP_MAX_TOKENS
            return Encoding(input_ids=torch.tensor([[len(t)] for t in texts]), attention_mask=torch.ones(len(texts), 1))

    class Model:
        def get_text_features(self, input_ids, attention_mask):  # the transformers-4 form: a tensor
            return input_ids.float() * torch.tensor([[3.0, 4.0, 0.0]])  # norms 5 x len(text)

        def get_audio_features(self, input_features, is_longer=None):
            return input_features.sum(-1)  # (1, 3): (0, 6, 8), norm 10

    class Extractor:
        sampling_rate = 48000

        def __call__(self, audio, sampling_rate, return_tensors):
            return {"input_features": torch.tensor([[[0.0, 0.0], [2.0, 4.0], [3.0, 5.0]]])}

    text = evaluate.clap_text_embeddings(Model(), Tokenizer(), ["ab", "abcd", "abcdef"], "cpu", batch_size=2)
    assert text.dtype == torch.float64 and text.shape == (3, 3)
    assert torch.allclose(text, torch.tensor([[0.6, 0.8, 0.0]] * 3, dtype=torch.float64), atol=1e-12)
    audio = evaluate.clap_audio_embedding(Model(), Extractor(), np.zeros(4800, np.float32), "cpu")
    assert audio.dtype == torch.float64 and audio.shape == (3,)
    assert torch.allclose(audio, torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64), atol=1e-12)


def test_gaussian_stats_of_two_points_and_too_few():
    # two embeddings x0, x1: mean (x0 + x1) / 2, covariance with ddof 1 = d d^T / 2 (d = x1 - x0), by hand;
    # one embedding, or a flat vector, has no covariance: a ValueError, not a NaN matrix (np.cov with
    # ddof 1 over one row divides by 0 and only warns; FD would then come out NaN)
    x = np.array([[1.0, 2.0, -1.0], [3.0, -2.0, 0.0]])
    d = x[1] - x[0]
    mu, s = evaluate.gaussian_stats(x)
    assert mu.dtype == s.dtype == np.float64
    np.testing.assert_array_equal(mu, [2.0, 0.0, -0.5])
    np.testing.assert_allclose(s, np.outer(d, d) / 2, rtol=0, atol=1e-15)
    for bad in (x[:1], x[0], np.zeros((0, 3))):
        with pytest.raises(ValueError, match="need at least 2 embeddings"):
            evaluate.gaussian_stats(bad)


def test_passt_probabilities_softmax_of_mean_logits_in_float64(monkeypatch):
    # a stand-in tagger with logits far apart (float32's exp underflows below ~1e-45, float64's does not):
    # p must be softmax(mean over windows of the logits), in float64, to float64 precision (the
    # test with the real network compares with allclose's default rtol of 1e-5, which a float32 softmax passes)
    logits = torch.linspace(-120.0, 5.0, 527, dtype=torch.float32)[None] * torch.tensor([[1.0], [0.5]])
    logits[1, 7] = 3.0  # the windows differ
    seen = []

    def tagger(windows):
        seen.append(windows.shape)
        return logits.clone()
    audio = np.random.default_rng(0).standard_normal(12 * evaluate.PASST_SR).astype(np.float32)  # 2 windows
    p = evaluate.passt_probabilities(tagger, audio, "cpu")
    assert seen == [(2, 10 * evaluate.PASST_SR)]
    m = logits.double().mean(0)
    want = torch.exp(m - m.max()) / torch.exp(m - m.max()).sum()
    assert p.dtype == torch.float64 and p.shape == (527,)
    assert torch.allclose(p, want, rtol=1e-12, atol=0)
    assert p.min().item() > 0 and p.sum().item() == pytest.approx(1, abs=1e-12)


def test_clap_score_seeds_numpy_once_for_all_long_clips(weights, tmp_path, capsys):
    # two identical clips longer than CLAP's 1 s window, same prompt: the extractor's fusion crops come
    # from numpy's global RNG seeded once (--seed) and carried from file to file, as the docstring says;
    # so the two get different crops. By hand with evaluate's own pieces in that order
    gen = tmp_path / "g"
    gen.mkdir()
    for name in ("x", "y"):
        sf.write(gen / f"{name}.wav", noise(1.6, 48000, 11), 48000)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": n, "caption": "noisy drums"}) + "\n" for n in ("x", "y")))
    report, _ = run_main(["--generated", str(gen), "--reference", str(gen), "--prompts", str(prompts),
                          "--metrics", "clap", "--clap", weights["clap"], "--seed", "3",
                          "--out", str(tmp_path / "r.json")], capsys)
    model, extractor, tok = evaluate.load_clap(weights["clap"], "cpu")
    text = evaluate.clap_text_embeddings(model, tok, ["noisy drums"], "cpu")[0]
    np.random.seed(3)
    want = [float(evaluate.clap_audio_embedding(model, extractor, evaluate.load_mono(str(gen / f"{n}.wav"), 48000),
                                                "cpu") @ text) for n in ("x", "y")]
    assert abs(want[0] - want[1]) > 1e-4                                       # different crops
    assert [report["per_file"][n]["clap"] for n in ("x", "y")] == pytest.approx(want, abs=1e-6)


def test_clap_score_pairs_each_file_with_its_own_prompt_in_any_order_of_the_prompts(monkeypatch):
    # the prompts file lists b before a (and an unused z first): each file's text embedding must be its
    # own id's, not the one at its position among the prompts. 2-d embeddings by hand: a's audio (1, 0)
    # with "diagonal" (0.6, 0.8) gives 0.6, b's (0.6, 0.8) with "up" (0, 1) gives 0.8; in the prompts'
    # order the cosines would be 0 and 1
    text = {"up": [0.0, 1.0], "diagonal": [0.6, 0.8], "right": [1.0, 0.0]}
    audio = {"g/a": [1.0, 0.0], "g/b": [0.6, 0.8]}
    monkeypatch.setattr(evaluate, "clap_text_embeddings", lambda model, tokenizer, prompts, device: torch.tensor(
        [text[p] for p in prompts], dtype=torch.float64))
    monkeypatch.setattr(evaluate, "load_mono", lambda path, sr: path)
    monkeypatch.setattr(evaluate, "clap_audio_embedding",
                        lambda model, extractor, path, device: torch.tensor(audio[path], dtype=torch.float64))
    extractor = types.SimpleNamespace(sampling_rate=48000)
    prompts = {"z": "right", "b": "up", "a": "diagonal"}
    report = {"per_file": {"a": {}, "b": {}}, "counts": {}}
    evaluate.clap_score((None, extractor, None), {"a": "g/a", "b": "g/b"}, prompts, types.SimpleNamespace(seed=0),
                        "cpu", report)
    assert [report["per_file"][n]["clap"] for n in "ab"] == pytest.approx([0.6, 0.8], abs=1e-12)
    assert report["clap_score"] == pytest.approx(0.7, abs=1e-12) and report["counts"]["clap_clips"] == 2


def test_frechet_distance_takes_a_covariance_by_its_symmetric_part():
    # a covariance whose two triangles differ a little (saved by another tool, a float32 round trip):
    # np.linalg.eigh reads only one triangle, so without evaluate's symmetrisation FD(S) != FD(S^T);
    # with it, S counts as (S + S^T) / 2, whose trace is S's
    rng = np.random.default_rng(5)
    d = 8
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    k = 1e-3 * rng.standard_normal((d, d))
    k = k - k.T                                                              # antisymmetric, zero diagonal
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert evaluate.frechet_distance(mu1, s1 + k, mu2, s2 - k) == pytest.approx(want, rel=1e-12)
    assert evaluate.frechet_distance(mu1, (s1 + k).T, mu2, s2) == pytest.approx(want, rel=1e-12)


def test_passt_stand_in_masks_refuse_to_run_and_the_filterbank_is_kaldis():
    # the stand-ins given to hear21passt when torchaudio cannot be imported: SpecAugment masks that
    # raise (PaSST masks only in training; a tagger left in training mode must fail, not mask), and
    # evaluate's own Kaldi filterbank
    mods = evaluate._stand_ins()
    if "torchaudio.transforms" not in mods:
        pytest.skip("torchaudio imports here: hear21passt gets the real one")
    t = mods["torchaudio.transforms"]
    for cls in (t.FrequencyMasking, t.TimeMasking):
        with pytest.raises(RuntimeError, match="SpecAugment masking is for training"):
            cls(48, iid_masks=True)(torch.zeros(1, 128, 10))
    assert mods["torchaudio.compliance.kaldi"].get_mel_banks is evaluate.kaldi_mel_banks
    assert mods["torchaudio"].compliance.kaldi is mods["torchaudio.compliance.kaldi"]
    assert mods["torchaudio"].transforms is t


@needs_openl3
def test_load_openl3_reads_a_wrapped_state_dict_and_refuses_other_weights(tmp_path, capsys):
    # load_openl3 takes a plain state dict or one under "state_dict" (a training checkpoint), and every
    # weight must be there: a file of another network stops with one line, not random OpenL3 weights
    from torchopenl3.models import PytorchOpenl3
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="Empty filters"):  # librosa, on OpenL3's lowest mel bands
        sd = PytorchOpenl3(content_type="music", input_repr="mel256", embedding_size=512).state_dict()
    wrapped = tmp_path / "wrapped.pth.tar"
    torch.save({"state_dict": sd, "epoch": 3}, wrapped)
    model = evaluate.load_openl3(str(wrapped), "cpu")
    assert not model.training
    got = model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    bad = dict(sd)
    missing = sorted(bad)[0]
    bad.pop(missing)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.load_openl3(str(tmp_path / "bad.pt"), "cpu")
    assert e.value.code == 2
    assert _one_line_error(capsys).startswith(
        f"evaluate.py: error: --openl3 {tmp_path / 'bad.pt'}: not OpenL3 mel256/music/512 weights (")


def test_load_mono_at_the_files_own_rate_only_mixes_and_scales(tmp_path):
    # a file already at the metric's rate goes through no filter: the channels' float64 mean times
    # 10^(-1/20) / peak, rounded once to float32, bit for bit (soxr at equal rates is not an identity:
    # it moves samples by ~1e-7)
    x = np.random.default_rng(7).uniform(-0.9, 0.9, (4800, 2)).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, 48000, subtype="FLOAT")
    mono = x.astype(np.float64).mean(axis=1)
    want = (mono * (10 ** (-1 / 20) / np.abs(mono).max())).astype(np.float32)
    np.testing.assert_array_equal(evaluate.load_mono(str(tmp_path / "x.wav"), 48000), want)


def test_passt_windows_at_another_rate_take_its_samples():
    # sample_rate sets the window (10 s) and the hop (5 s) in samples: at 16 kHz, 160 000 and 80 000
    sr = 16000
    audio = np.arange(25 * sr, dtype=np.float32)
    w = evaluate.passt_windows(audio, sample_rate=sr)
    assert w.shape == (4, 10 * sr) and [int(x[0]) for x in w] == [0, 5 * sr, 10 * sr, 15 * sr]
    assert w[-1, -1] == 25 * sr - 1
    assert evaluate.passt_windows(audio[:int(1.5 * sr)], sample_rate=sr).shape == (0, 10 * sr)
    w = evaluate.passt_windows(audio[:int(1.6 * sr)], sample_rate=sr)      # just over 15 %: kept, padded
    assert w.shape == (1, 10 * sr) and np.array_equal(w[0, :int(1.6 * sr)], audio[:int(1.6 * sr)])
    assert not w[0, int(1.6 * sr):].any()


def test_load_mono_brings_a_quiet_file_up_to_minus_one_dbfs(tmp_path):
    # peak normalisation holds for any level above silence: a file peaking at 1e-4 (-80 dBFS) comes
    # out peaking at -1 dBFS, the waveform scaled by one factor
    x = 1e-4 * np.sin(2 * np.pi * 440 * np.arange(4800) / 48000)
    sf.write(tmp_path / "quiet.wav", x, 48000, subtype="DOUBLE")
    got = evaluate.load_mono(str(tmp_path / "quiet.wav"), 48000)
    want = x / np.abs(x).max() * 10 ** (-1 / 20)
    assert np.abs(got).max() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_read_run_refuses_a_config_without_the_whole_budget(tmp_path, capsys):
    # config.json must hold every setting of the budget (the comparison and training_time read them):
    # one without "frames" (or with no settings) stops with one line, not a KeyError later
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.csv").write_text("step,loss,caption_score\n1,2.5,\n")
    for args in ({k: 1 for k in evaluate.BUDGET if k != "frames"}, {}):
        (d / "config.json").write_text(json.dumps({"args": args, "processes": 1}))
        with pytest.raises(SystemExit) as e:
            evaluate.read_run(str(d))
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"evaluate.py: error: --convergence: {d / 'config.json'}: not a train.py config "
            f"(with {', '.join(evaluate.BUDGET)})\n")


def test_kaldi_mel_banks_refuse_vtln_warping():
    # the stand-in implements factor 1 only (PaSST's): another factor must stop, not be ignored
    with pytest.raises(NotImplementedError, match="VTLN"):
        evaluate.kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0, 100.0, -500.0, 0.9)


# ------------------------------------------------------------------------------------------------
# --cache: each file's model output kept between runs


def test_weights_digest_is_the_weights_wherever_they_come_from():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert evaluate.weights_digest(a) != evaluate.weights_digest(b)
    b.load_state_dict(a.state_dict())
    assert evaluate.weights_digest(a) == evaluate.weights_digest(b)    # the same numbers, another module
    with torch.no_grad():
        b[0].bias[2] += 2 ** -20
    assert evaluate.weights_digest(a) != evaluate.weights_digest(b)    # one weight one ulp-ish away
    b.load_state_dict(a.state_dict())
    b[1].num_batches_tracked += 1                                     # a buffer counts too
    assert evaluate.weights_digest(a) != evaluate.weights_digest(b)
    b.load_state_dict(a.state_dict())
    assert evaluate.weights_digest(b.double()) != evaluate.weights_digest(a)  # the same values in float64


@needs_passt
def test_a_cache_gives_the_uncached_numbers_resumes_a_stopped_run_and_reads_no_changed_file(weights, sets, tmp_path,
                                                                                             capsys, monkeypatch):
    # PaSST and CLAP real (tiny), OpenL3 a cheap module of the same kind (a real one costs 20 GFLOP a frame).
    # Generated a and z (1.6 s) are longer than CLAP's 1 s window, b (1 s) and c (0.5 s) are not: z's crops come
    # after theirs from numpy's RNG, so a cache that read b and c but drew otherwise would give z another score.
    # b and c have no PaSST window (1.5 s or less)
    sf.write(os.path.join(sets["generated"], "z.wav"), noise(1.6, 48000, 5), 48000)
    sf.write(os.path.join(sets["other"], "z.wav"), noise(2.0, 48000, 6), 48000)
    openl3 = torch.nn.Linear(2, 2)
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: openl3)
    calls = []

    def embeddings(model, audio, device, batch_size=32):  # OpenL3's frames of 2 numbers, a function of the audio
        calls.append("openl3")
        rows = np.array_split(np.asarray(audio, np.float64), evaluate.openl3_frame_count(len(audio)))
        return np.stack([[r.std(), np.abs(r).mean() + len(audio) / 48000] for r in rows])
    monkeypatch.setattr(evaluate, "openl3_embeddings", embeddings)
    for name in ("passt_probabilities", "clap_audio_embedding"):
        real = getattr(evaluate, name)
        monkeypatch.setattr(evaluate, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    (tmp_path / "openl3.pt").write_bytes(b"stand-in")
    cache = tmp_path / "cache"

    def run(*extra, out="r.json"):
        calls.clear()
        report = evaluate.main(["--generated", sets["generated"], "--reference", sets["other"], "--prompts",
                                sets["prompts"], "--openl3", str(tmp_path / "openl3.pt"), "--passt", weights["passt"],
                                "--clap", weights["clap"], "--device", "cpu", "--out", str(tmp_path / out), *extra])
        return report, collections.Counter(calls)

    def numbers(report):
        return {k: report[k] for k in ("fd_openl3", "kl_passt", "kl_passt_gen_ref", "clap_score", "per_file",
                                       "short_clips")}

    uncached, counted = run()
    assert counted == {"openl3": 8, "passt_probabilities": 8, "clap_audio_embedding": 4}
    assert "from_cache" not in uncached["counts"] and uncached["settings"]["cache"] is None
    first, counted = run("--cache", str(cache))                       # computes every file and keeps it
    assert numbers(first) == numbers(uncached) and counted == {"openl3": 8, "passt_probabilities": 8,
                                                                "clap_audio_embedding": 4}
    assert first["counts"]["from_cache"] == {"openl3": 0, "passt": 0, "clap": 0}
    assert sorted(len(list((cache / m).rglob("*.npz"))) for m in ("openl3", "passt", "clap")) == [2, 8, 8]
    again, counted = run("--cache", str(cache))                       # only the long clips' CLAP crops are drawn
    assert numbers(again) == numbers(uncached) and counted == {"clap_audio_embedding": 2}
    assert again["counts"]["from_cache"] == {"openl3": 8, "passt": 8, "clap": 2}
    assert again["settings"]["cache"] == str(cache)
    assert capsys.readouterr().err.splitlines()[-1] == (f"note: --cache {cache}: outputs read from it, not computed: "
                                                        "openl3 8, passt 8, clap 2")
    assert not list(cache.rglob("*.tmp"))
    # stopped at the fifth OpenL3 file: the four before are kept whole, the rerun computes the other four
    stopped = tmp_path / "stopped"

    def stop_at_the_fifth(model, audio, device, batch_size=32):
        if calls.count("openl3") == 4:
            raise KeyboardInterrupt
        return embeddings(model, audio, device)
    with monkeypatch.context() as m:
        m.setattr(evaluate, "openl3_embeddings", stop_at_the_fifth)
        with pytest.raises(KeyboardInterrupt):
            run("--cache", str(stopped), "--metrics", "fd")
    assert len(list((stopped / "openl3").rglob("*.npz"))) == 4 and not list(stopped.rglob("*.tmp"))
    resumed, counted = run("--cache", str(stopped), "--metrics", "fd", out="fd.json")
    assert resumed["fd_openl3"] == uncached["fd_openl3"] and counted == {"openl3": 4}
    assert resumed["counts"]["from_cache"] == {"openl3": 4}
    # a damaged entry is computed again, with a note
    damaged = next((cache / "passt").rglob("*.npz"))
    damaged.write_bytes(damaged.read_bytes()[:40])
    capsys.readouterr()
    again, counted = run("--cache", str(cache), "--metrics", "kl", out="kl.json")
    assert (again["kl_passt"], counted, again["counts"]["from_cache"]) == (uncached["kl_passt"],
                                                                           {"passt_probabilities": 1}, {"passt": 7})
    assert f"note: {damaged}: a damaged cache entry" in capsys.readouterr().err
    # a generated file changed in place (same name): its old entries are not read
    sf.write(os.path.join(sets["generated"], "c.wav"), tone(0.5, 48000, 700), 48000)
    changed, counted = run("--cache", str(cache), out="changed.json")
    fresh, _ = run(out="fresh.json")
    assert numbers(changed) == numbers(fresh) and numbers(fresh) != numbers(uncached)
    assert changed["counts"]["from_cache"] == {"openl3": 7, "passt": 7, "clap": 1}
    assert counted == {"openl3": 1, "passt_probabilities": 1, "clap_audio_embedding": 3}


def test_cache_flag_errors_are_one_line(sets, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    base = ["--generated", sets["generated"], "--reference", sets["other"], "--metrics", "fd",
            "--openl3", str(tmp_path / "file"), "--out", str(tmp_path / "r.json")]
    for argv, message in (
            (base + ["--cache", str(tmp_path / "file")], f"--cache {tmp_path / 'file'}: cannot make this folder "
                                                         "(File exists)"),
            (base + ["--cache", str(tmp_path / "file" / "sub")], f"--cache {tmp_path / 'file' / 'sub'}: cannot make "
                                                                 "this folder (Not a directory)"),
            (["--convergence", str(tmp_path / "c"), "--cache", str(tmp_path / "k")],
             "--convergence trains and plots; it takes no --generated/--reference/--cache"),
            (["--long", str(tmp_path / "file"), "--cache", str(tmp_path / "k")],
             "--cache keeps the metrics' model outputs (--generated/--reference); --long takes none")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2 and _one_line_error(capsys) == f"evaluate.py: error: {message}"
    assert not (tmp_path / "k").exists() and not (tmp_path / "r.json").exists()


def test_a_cache_that_takes_no_more_files_is_read_and_the_run_goes_on(sets, tmp_path, capsys, monkeypatch):
    # a full disk (or a read-only cache shared by a team): one note, the entries it holds read, the rest computed
    openl3 = torch.nn.Linear(2, 2)
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: openl3)
    computed = []

    def embeddings(model, audio, device, batch_size=32):
        computed.append(len(audio))
        frames = np.array_split(np.asarray(audio, np.float64), evaluate.openl3_frame_count(len(audio)))
        return np.stack([[r.std(), r.mean()] for r in frames])
    monkeypatch.setattr(evaluate, "openl3_embeddings", embeddings)
    (tmp_path / "openl3.pt").write_bytes(b"stand-in")
    cache = tmp_path / "cache"

    def run(*extra):
        computed.clear()
        return evaluate.main(["--generated", sets["generated"], "--reference", sets["other"], "--metrics", "fd",
                              "--openl3", str(tmp_path / "openl3.pt"), "--out", str(tmp_path / "r.json"), *extra])
    run("--cache", str(cache))
    sf.write(os.path.join(sets["generated"], "d.wav"), tone(1.2, 48000, 550), 48000)
    uncached = run()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    capsys.readouterr()
    report = run("--cache", str(cache))
    assert report["fd_openl3"] == uncached["fd_openl3"] and report["counts"]["from_cache"] == {"openl3": 6}
    assert len(computed) == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "cannot keep" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: --cache: cannot keep {cache / 'openl3'}")
    assert notes[0].endswith(".npz (No space left on device); this run keeps no more outputs")
    assert not list(cache.rglob("*.tmp")) and len(list(cache.rglob("*.npz"))) == 6


def test_weights_digest_holds_the_names():
    torch.manual_seed(0)
    a = torch.nn.ModuleDict({"x": torch.nn.Linear(2, 2)})
    b = torch.nn.ModuleDict({"y": torch.nn.Linear(2, 2)})
    b.y.load_state_dict(a.x.state_dict())
    assert evaluate.weights_digest(a) != evaluate.weights_digest(b)    # the same numbers under other names
    half, bf16 = torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2).bfloat16()
    for m in (half, bf16):
        torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)
    assert evaluate.weights_digest(half) != evaluate.weights_digest(bf16)  # the same bytes (zeros), other dtypes


def test_cache_entry_is_keyed_by_all_the_bytes_weights_settings_and_device_type(tmp_path, capsys):
    torch.manual_seed(0)
    model, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(bytes(3 << 20))
    b.write_bytes(bytes(3 << 20)[:-1] + b"\1")               # the same first MiB, the last byte not
    folder = str(tmp_path / "cache")

    def entry(path=a, metric="passt", m=model, settings={"sr": 1}, device="cpu"):
        return evaluate.ResultCache(folder, metric, m, settings, device).entry(str(path))
    assert entry() == entry() and entry().startswith(os.path.join(folder, "passt", ""))
    assert entry(device="cuda:0") == entry(device="cuda:1") == entry(device=torch.device("cuda"))  # the type only
    for changed in (entry(b), entry(metric="clap"), entry(m=other), entry(settings={"sr": 2}), entry(device="cuda")):
        assert changed != entry()
    assert evaluate.ResultCache().entry(str(a)) is None
    # a missing entry is no note; a kept one comes back whole and is counted; no temporary file stays
    cache = evaluate.ResultCache(folder, "passt", model, {"sr": 1}, "cpu")
    assert cache.read(cache.entry(str(a))) is None and cache.read_count == 0
    cache.write(cache.entry(str(a)), np.arange(3.0), 48000)
    output, samples = cache.read(cache.entry(str(a)))
    assert (output.tolist(), samples, cache.read_count) == ([0.0, 1.0, 2.0], 48000, 1)
    assert [p.suffix for p in (tmp_path / "cache").rglob("*.*")] == [".npz"]
    assert capsys.readouterr().err == ""


def test_cache_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = evaluate.ResultCache(str(tmp_path / "cache"), "clap", torch.nn.Linear(2, 2), {}, "cpu")
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    entry = cache.entry(str(tmp_path / "a.wav"))

    def full(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(KeyboardInterrupt):
        cache.write(entry, np.zeros(2), 1)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_cache_settings_of_each_metric_are_what_shapes_its_output(sets, tmp_path, monkeypatch):
    # the entry's name holds every setting that changes a model's output, PEAK_DB included
    for name in ("openl3", "passt"):
        (tmp_path / name).write_bytes(b"x")

    class extractor:
        to_json_string = staticmethod(lambda: '{"feature_size": 64}')
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(evaluate, "load_openl3", lambda path, device: model)
    monkeypatch.setattr(evaluate, "load_passt", lambda path, device: model)
    monkeypatch.setattr(evaluate, "load_clap", lambda name, device: (model, extractor, None))
    monkeypatch.setattr(evaluate, "check_inputs", lambda args: (["fd", "kl", "clap"], {}, {}, {}))
    seen = {}

    class Seen(Exception):
        pass

    def record(metric, last=False):
        def stub(*args, cache=None):
            seen[metric] = json.loads(args[-1].prefix)["settings"]
            if last:
                raise Seen
        return stub
    monkeypatch.setattr(evaluate, "fd_openl3", record("openl3"))
    monkeypatch.setattr(evaluate, "kl_passt", record("passt"))
    monkeypatch.setattr(evaluate, "clap_score", record("clap", last=True))
    with pytest.raises(Seen):
        evaluate.main(["--generated", sets["generated"], "--reference", sets["other"], "--openl3",
                       str(tmp_path / "openl3"), "--passt", str(tmp_path / "passt"), "--clap", "stub",
                       "--device", "cpu", "--out", str(tmp_path / "r.json"), "--cache", str(tmp_path / "cache")])
    assert seen == {"openl3": {"sr": 48000, "hop_s": 0.5, "peak": "before_resampling", "peak_dbfs": -1.0},
                    "passt": {"sr": 32000, "window_s": 10.0, "hop_s": 5.0, "min_window": evaluate.PASST_MIN_WINDOW,
                              "peak_dbfs": -1.0},
                    "clap": {"extractor": '{"feature_size": 64}', "peak_dbfs": -1.0}}


def test_cache_entry_of_another_shape_or_not_finite_is_computed_again(tmp_path, capsys):
    # an .npz that loads but is not this metric's output (another shape, NaN, integers) is a damaged entry
    cache = evaluate.ResultCache(str(tmp_path / "cache"), "clap", torch.nn.Linear(2, 2), {}, "cpu")
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    entry = cache.entry(str(tmp_path / "a.wav"))
    for output in (np.ones(3), np.full(16, np.nan), np.ones(16, np.int64)):
        cache.write(entry, output, 48000)
        assert cache.read(entry, lambda o, samples: o.shape == (16,)) is None and cache.read_count == 0
        assert "a damaged cache entry" in capsys.readouterr().err
    cache.write(entry, np.ones(16), 48000)
    assert cache.read(entry, lambda o, samples: o.shape == (16,))[0].shape == (16,) and cache.read_count == 1


def test_cache_entry_of_the_right_shape_but_not_the_models_values_is_computed_again(tmp_path, capsys, monkeypatch):
    # a PaSST entry of negative "probabilities" gave NaN KL and a ValueError traceback from the report's
    # json.dumps; zeros gave KL 0 and a CLAP cosine 0 without a word. They are damaged entries, computed again
    monkeypatch.setattr(evaluate, "passt_probabilities", lambda model, audio, device: torch.softmax(
        torch.arange(527.0, dtype=torch.float64) * float(np.abs(audio).mean()), -1))
    monkeypatch.setattr(evaluate, "clap_text_embeddings", lambda model, tok, prompts, device: F.normalize(
        torch.ones(len(prompts), 4, dtype=torch.float64), dim=-1))
    monkeypatch.setattr(evaluate, "clap_audio_embedding", lambda model, ext, audio, device: F.normalize(
        torch.tensor([1.0, 2.0, 3.0, float(len(audio))], dtype=torch.float64), dim=-1))
    extractor = types.SimpleNamespace(sampling_rate=48000, nb_max_samples=10 * 48000)
    gen, ref = tmp_path / "g", tmp_path / "r"
    for folder, freq in ((gen, 440), (ref, 220)):
        folder.mkdir()
        sf.write(str(folder / "a.wav"), tone(2.0, 48000, freq), 48000)
    files = {"g": {"a": str(gen / "a.wav")}, "r": {"a": str(ref / "a.wav")}}
    args = types.SimpleNamespace(seed=0)

    def scores(make_cache):
        report = {"per_file": {"a": {}}, "short_clips": {}, "counts": {}}
        evaluate.kl_passt(None, files["g"], files["r"], "cpu", report, make_cache("passt"))
        evaluate.clap_score((None, extractor, None), files["g"], {"a": "x"}, args, "cpu", report, make_cache("clap"))
        return report["kl_passt"], report["clap_score"]
    want = scores(lambda metric: evaluate.ResultCache())
    caches = {m: evaluate.ResultCache(str(tmp_path / "cache"), m, torch.nn.Linear(2, 2), {}, "cpu")
              for m in ("passt", "clap")}
    for passt, clap in ((-np.ones(527), np.zeros(4)), (np.zeros(527), np.full(4, 0.9))):
        for metric, output in (("passt", passt), ("clap", clap)):
            for path in (files["g"]["a"], files["r"]["a"]):
                caches[metric].write(caches[metric].entry(path), output, 96000)
        capsys.readouterr()
        assert scores(caches.get) == want and all(c.read_count == 0 for c in caches.values())
        assert capsys.readouterr().err.count("a damaged cache entry") == 3  # PaSST's 2 files, CLAP's generated one
    assert scores(caches.get) == want and [c.read_count for c in caches.values()] == [2, 1]  # the entries rewritten


@needs_openl3
def test_openl3_frame_count_is_torchopenl3s():
    # center=True, hop 0.5 s at 48 kHz: under 1 s, at and off the hop's multiples, and past 1024 hops, where
    # torchopenl3's float32 ceil drops a last sample (ceil(samples / hop) would say 1026 frames)
    from torchopenl3.utils import preprocess_audio_batch
    lengths = (1, 100, 23999, 24000, 24001, 47999, 48000, 48001, 50000, 71999, 72001, 24600001, 24624000)
    counts = [evaluate.openl3_frame_count(n) for n in lengths]
    assert counts == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 1025, 1026]
    for n, count in zip(lengths, counts):
        frames = preprocess_audio_batch(torch.zeros(1, n), 48000, center=True, hop_size=0.5)
        assert frames.shape == (count, 1, 48000), n


def test_passt_has_window_is_passt_windows():
    for n in (1, 47999, 48000, 48001, 160000, 320000, 480001):
        assert evaluate.passt_has_window(n) == (len(evaluate.passt_windows(np.zeros(n, np.float32))) > 0), n
    assert (evaluate.passt_has_window(48000), evaluate.passt_has_window(48001)) == (False, True)  # 1.5 s at 32 kHz


def _fd_openl3_files(tmp_path):
    # clips of lengths off the hop's multiples, one under 1 s
    files = {}
    for side, lengths in (("g", (1.3, 0.7, 2.05)), ("r", (1.9, 0.45, 1.55))):
        (tmp_path / side).mkdir()
        files[side] = {}
        for i, seconds in enumerate(lengths):
            path = str(tmp_path / side / f"{i}.wav")
            sf.write(path, noise(seconds, 48000, 10 * len(files) + i), 48000)
            files[side][str(i)] = path
    return files


@pytest.mark.parametrize("case", ["zeros of another width", "OpenL3's 6144-d", "a frame more", "a frame less",
                                  "hop 0.1 s", "0 samples"])
def test_cache_entry_of_another_openl3_width_or_frame_count_is_computed_again(case, tmp_path, capsys, monkeypatch):
    # entries of (frames, 6144) or (frames, 7) where the model gives (frames, 4), or of a frame count that is not
    # torchopenl3's for the entry's samples, or of 0 samples, were read: FD came out as a number (0 from zeros)
    def embeddings(model, audio, device, batch_size=32):  # OpenL3's frame count (clips under 512 s), of width 4
        rows = np.array_split(np.asarray(audio, np.float64), max(1, math.ceil(len(audio) / 24000)))
        return np.stack([[r.std(), r.mean(), np.abs(r).max(), len(r) / 48000] for r in rows])
    monkeypatch.setattr(evaluate, "openl3_embeddings", embeddings)
    model = torch.nn.Linear(2, 2)
    model.embedding_size = 4                           # as PytorchOpenl3 says its width
    files = _fd_openl3_files(tmp_path)
    args = types.SimpleNamespace(generated=str(tmp_path / "g"), reference=str(tmp_path / "r"))

    def fd(cache):
        report = {"counts": {}, "short_clips": {}}
        evaluate.fd_openl3(model, files["g"], files["r"], args, "cpu", report, cache)
        return report["fd_openl3"], report["counts"], report["short_clips"]
    want = fd(evaluate.ResultCache())
    paths = [*files["g"].values(), *files["r"].values()]
    samples = {path: len(evaluate.load_mono(path, 48000, peak_first=True)) for path in paths}

    def right(path):
        return embeddings(None, evaluate.load_mono(path, 48000, peak_first=True), "cpu")
    poison = {"zeros of another width": lambda p: (np.zeros((len(right(p)), 7)), samples[p]),
              "OpenL3's 6144-d": lambda p: (np.ones((len(right(p)), 6144)), samples[p]),
              "a frame more": lambda p: (np.vstack([right(p), np.ones((1, 4))]), samples[p]),
              "a frame less": lambda p: (right(p)[:-1], samples[p]),
              "hop 0.1 s": lambda p: (np.ones((samples[p] // 4800 + 1, 4)), samples[p]),
              "0 samples": lambda p: (np.ones((1, 4)), 0)}[case]
    cache = evaluate.ResultCache(str(tmp_path / "cache"), "openl3", model, {}, "cpu")
    for path in paths:
        cache.write(cache.entry(path), *poison(path))
    capsys.readouterr()
    assert fd(cache) == want and cache.read_count == 0
    assert capsys.readouterr().err.count("a damaged cache entry") == len(paths)
    assert fd(cache) == want and cache.read_count == len(paths)  # the entries rewritten


def test_cache_entry_of_a_passt_output_not_of_its_clips_windows_is_computed_again(tmp_path, capsys, monkeypatch):
    # a (0,) entry (no window) for a clip with windows left its pair out of KL as "1.5 s or less", and a
    # distribution for a clip without a window put a pair in; with every pair so, KL came out None or a number
    def probabilities(model, audio, device):
        if len(evaluate.passt_windows(audio)) == 0:
            return None
        return torch.softmax(torch.arange(527.0, dtype=torch.float64) * float(np.abs(audio).mean()), -1)
    monkeypatch.setattr(evaluate, "passt_probabilities", probabilities)
    gen, ref = tmp_path / "g", tmp_path / "r"
    files = {}
    for folder, seed in ((gen, 1), (ref, 2)):
        folder.mkdir()
        for name, seconds in (("long", 2.0), ("short", 1.2)):
            sf.write(str(folder / f"{name}.wav"), noise(seconds, 48000, seed), 48000)
        files[folder.name] = {name: str(folder / f"{name}.wav") for name in ("long", "short")}

    def kl(cache):
        report = {"per_file": {"long": {}, "short": {}}, "short_clips": {}, "counts": {}}
        evaluate.kl_passt(None, files["g"], files["r"], "cpu", report, cache)
        return report["kl_passt"], report["counts"]["kl_pairs"], report["short_clips"]["passt"]
    want = kl(evaluate.ResultCache())
    assert want[1:] == (1, ["short"]) and want[0] > 0
    cache = evaluate.ResultCache(str(tmp_path / "cache"), "passt", torch.nn.Linear(2, 2), {}, "cpu")
    uniform = np.full(527, 1 / 527)
    for side in ("g", "r"):
        for name, output in (("long", np.zeros(0)), ("short", uniform)):
            path = files[side][name]
            cache.write(cache.entry(path), output, len(evaluate.load_mono(path, 32000)))
    capsys.readouterr()
    assert kl(cache) == want and cache.read_count == 0
    assert capsys.readouterr().err.count("a damaged cache entry") == 4
    assert kl(cache) == want and cache.read_count == 4


def test_cache_entry_of_a_clap_clip_longer_than_the_window_is_computed_again(tmp_path, capsys, monkeypatch):
    # such an entry is never kept (its crops come from numpy's RNG in this run), but one that was there was read:
    # its score was another run's crops', and the clips after it drew other crops, without a word
    monkeypatch.setattr(evaluate, "clap_text_embeddings", lambda model, tok, prompts, device: F.normalize(
        torch.ones(len(prompts), 4, dtype=torch.float64), dim=-1))
    monkeypatch.setattr(evaluate, "clap_audio_embedding", lambda model, ext, audio, device: F.normalize(
        torch.tensor([1.0, 2.0, 3.0, float(np.random.rand())], dtype=torch.float64), dim=-1))
    extractor = types.SimpleNamespace(sampling_rate=48000, nb_max_samples=48000, truncation="fusion")
    (tmp_path / "g").mkdir()
    files = {}
    for name, freq in (("a", 440), ("b", 330)):
        files[name] = str(tmp_path / "g" / f"{name}.wav")
        sf.write(files[name], tone(2.0, 48000, freq), 48000)
    args = types.SimpleNamespace(seed=0)

    def scores(cache):
        report = {"per_file": {"a": {}, "b": {}}, "counts": {}}
        evaluate.clap_score((None, extractor, None), files, {"a": "x", "b": "y"}, args, "cpu", report, cache)
        return [report["per_file"][n]["clap"] for n in ("a", "b")]
    want = scores(evaluate.ResultCache())
    cache = evaluate.ResultCache(str(tmp_path / "cache"), "clap", torch.nn.Linear(2, 2), {}, "cpu")
    cache.write(cache.entry(files["a"]), np.array([1.0, 0.0, 0.0, 0.0]), 96000)
    capsys.readouterr()
    assert scores(cache) == want and cache.read_count == 0
    assert capsys.readouterr().err.count("a damaged cache entry") == 1
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1    # the long clips' outputs are not kept


def test_cache_never_keeps_a_clap_clip_one_sample_longer_than_the_window(weights, tmp_path):
    # 48001 samples at 48 kHz: the extractor crops it at random (numpy's RNG), so it is not kept; 48000 is kept
    clap = evaluate.load_clap(weights["clap"], "cpu")
    (tmp_path / "g").mkdir()
    sf.write(str(tmp_path / "g" / "long.wav"), noise(48001 / 48000, 48000, 1), 48000)
    sf.write(str(tmp_path / "g" / "fits.wav"), noise(1.0, 48000, 2), 48000)
    generated = {"fits": str(tmp_path / "g" / "fits.wav"), "long": str(tmp_path / "g" / "long.wav")}
    args = evaluate.parse_args(["--generated", "g", "--reference", "r"])
    for _ in range(2):
        cache = evaluate.ResultCache(str(tmp_path / "cache"), "clap", clap[0], {"x": 1}, "cpu")
        report = {"per_file": {"fits": {}, "long": {}}, "counts": {}}
        evaluate.clap_score(clap, generated, {"fits": "a", "long": "b"}, args, "cpu", report, cache)
    assert cache.read_count == 1 and len(list((tmp_path / "cache").rglob("*.npz"))) == 1


def test_cache_removes_the_temporary_files_of_killed_writes_and_not_a_write_in_flight(tmp_path):
    old, new = tmp_path / "c[1]" / "passt" / "ab" / "tmpold.tmp", tmp_path / "c[1]" / "passt" / "cd" / "tmpnew.tmp"
    entry = tmp_path / "c[1]" / "passt" / "ab" / "old.npz"
    for path in (old, new, entry):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for path in (old, entry):  # a kill -9 two hours ago
        os.utime(path, (os.path.getmtime(path) - 7200,) * 2)
    evaluate.ResultCache(str(tmp_path / "c[1]"), "passt", torch.nn.Linear(2, 2), {}, "cpu")
    assert (old.exists(), new.exists(), entry.exists()) == (False, True, True)


def test_fd_openl3_peak_normalises_before_resampling_as_stable_audio_metrics(tmp_path, monkeypatch):
    # stable-audio-metrics' openl3_fd.py: librosa.load(sr=None) -> pyln.normalize.peak(-1 dB) at the
    # file's own rate -> soxr.resample(..., 48000) (HQ). A clipped signal's peak grows when resampled
    # (inter-sample peaks), so the two orders feed OpenL3 different levels.
    import soxr
    x = np.clip(np.random.default_rng(3).standard_normal(44100) * 0.8, -0.7, 0.7)
    sf.write(tmp_path / "a.wav", x, 44100, subtype="DOUBLE")
    seen = []

    def fake_embeddings(model, audio, device, batch_size=32):
        seen.append(np.asarray(audio, np.float64))
        return np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.2]])
    monkeypatch.setattr(evaluate, "openl3_embeddings", fake_embeddings)
    report = {"counts": {}, "short_clips": {}}
    files = {"a": str(tmp_path / "a.wav")}
    evaluate.fd_openl3("openl3", files, files, None, "cpu", report)
    want = soxr.resample(x * (10 ** (-1 / 20) / np.abs(x).max()), 44100, 48000, quality="HQ")
    assert np.abs(want).max() > 1.2 * 10 ** (-1 / 20)          # the resampled peak is well above -1 dBFS
    np.testing.assert_allclose(seen[0], want, rtol=0, atol=1e-6)


def test_frechet_distance_refuses_means_and_covariances_of_other_sizes():
    # a mean of 2 with covariances of 3 gave 0.0, silently (audit h21)
    with pytest.raises(ValueError, match=r"want means \(D,\) and covariances \(D, D\) of one D; got mu1 \(2,\), "
                                         r"S1 \(3, 3\), mu2 \(2,\), S2 \(3, 3\)"):
        evaluate.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="of one D"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="of one D"):
        evaluate.frechet_distance(0.0, np.eye(2), np.ones(2), np.eye(2))
    assert evaluate.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)) == pytest.approx(2.0)


def test_gaussian_stats_refuses_non_finite_embeddings():
    # a NaN embedding gave NaN statistics, then "SVD did not converge" from inside numpy's FD (audit h21)
    x = np.array([[np.nan, 1.0], [2.0, 3.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"embeddings with NaN or infinite values \(1 of 6\)"):
        evaluate.gaussian_stats(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate.gaussian_stats(np.array([[np.inf, 1.0], [2.0, 3.0]]))


def test_kl_divergence_refuses_distributions_of_other_shapes():
    # (10,) against (1,) broadcast silently to a number (audit h21)
    with pytest.raises(ValueError, match=r"p_ref \(10,\) and p_gen \(1,\): want one shape"):
        evaluate.kl_divergence(torch.ones(10) / 10, torch.ones(1))


def test_passt_windows_refuses_audio_that_is_not_mono():
    # a stereo (n, 2) clip came back as windows of shape (1, 1000, 702), silently (audit h21)
    with pytest.raises(ValueError, match=r"want mono audio \(n,\), got shape \(300, 2\)"):
        evaluate.passt_windows(np.ones((300, 2), np.float32), 100)


def test_convergence_checks_every_earlier_run_before_the_first_variant_trains(tmp_path, capsys, monkeypatch):
    """A run of another budget in OUT (here the last variant's, its checkpoint's settings alone tell it) is
    refused with one line before any variant trains: it stopped only after the variants before it had trained."""
    import train
    out = tmp_path / "rq1"
    budget = ["--layers", "2", "--steps", "12", "--seed", "0", "--eval-every", "5", "--log-every", "1",
              "--batch-size", "2", "--d-model", "32", "--frames", "16"]
    last = evaluate.VARIANTS[-1]
    os.makedirs(out / last)
    want = vars(train.parse_args(["--variant", last, "--out", str(out / last)] + budget)[0])
    torch.save({"model": {"w": torch.zeros(2)}, "args": {**want, "lr": 1e-4}, "step": 12}, out / last / "ckpt.pt")
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, **kw: calls.append(argv))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(out), "--layers", "2", "--steps", "12", "--eval-every", "5",
                       "--batch-size", "2", "--d-model", "32", "--frames", "16"])
    assert e.value.code == 2 and calls == []
    assert _one_line_error(capsys) == (f"evaluate.py: error: --convergence {out}: {out / last} was trained with other "
                                       "settings (choose another folder, or --plot-only to redraw it)")


def test_convergence_names_itself_in_a_training_error(tmp_path, capsys, monkeypatch):
    """A variant's training that cannot write its checkpoint (a full disk) stops with one line naming
    evaluate.py, the command that was run (it said "train.py: cannot write in ...")."""
    import errno

    import train

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.torch, "save", full)
    out = tmp_path / "rq1"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--convergence", str(out), "--steps", "1", "--layers", "1", "--d-model", "32",
                       "--batch-size", "2", "--frames", "16"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"evaluate.py: cannot write in {out / 'prefix_mamba'} "
                                                        "(no space left on device); what it saved before is kept whole")


def test_cosine_refuses_embeddings_of_other_shapes():
    # one text embedding (1, D) or (D,) against N audio ones was broadcast: N scores against the one text
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    for b in (np.array([[6.0, 8.0]]), np.array([6.0, 8.0]), np.ones((3, 1))):
        with pytest.raises(ValueError) as e:
            evaluate.cosine(a, b)
        assert str(e.value) == f"cosine: a (3, 2) and b {b.shape}: want one shape (N, D)"
    assert evaluate.cosine(a, a * 2).tolist() == [1.0, 1.0, 1.0]


def test_frechet_statistics_take_torch_tensors_of_any_float_dtype():
    # a bf16 tensor failed in numpy ("Got unsupported ScalarType BFloat16"), one that requires grad with
    # "Can't call numpy() on Tensor that requires grad"
    emb = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mu, cov = evaluate.gaussian_stats(emb.float().numpy())
    for given in (emb, emb.float().requires_grad_()):
        got_mu, got_cov = evaluate.gaussian_stats(given)
        assert np.array_equal(got_mu, mu) and np.array_equal(got_cov, cov)
    torch_args = [torch.from_numpy(a).to(torch.bfloat16) for a in (mu, cov)]
    assert evaluate.frechet_distance(*torch_args, *torch_args) == evaluate.frechet_distance(
        *[a.double().numpy() for a in torch_args], *[a.double().numpy() for a in torch_args])
    assert evaluate.trace_sqrt_product(torch_args[1], cov) == evaluate.trace_sqrt_product(
        torch_args[1].double().numpy(), cov)


def test_trace_sqrt_product_refuses_covariances_of_other_shapes():
    # (3, 3) against (4, 4): numpy's "matmul: Input operand 1 has a mismatch in its core dimension 0";
    # a (3,) vector: "LinAlgError: 1-dimensional array given"
    for s1, s2 in ((np.eye(3), np.eye(4)), (np.eye(3), np.ones(3)), (np.ones((3, 2)), np.ones((3, 2)))):
        with pytest.raises(ValueError) as e:
            evaluate.trace_sqrt_product(s1, s2)
        assert str(e.value) == (f"trace_sqrt_product: S1 {s1.shape} and S2 {s2.shape}: want covariances (D, D) "
                                "of one D")
    assert evaluate.trace_sqrt_product(np.diag([4.0, 9.0]), np.diag([1.0, 4.0])) == pytest.approx(2.0 + 6.0, abs=1e-12)
