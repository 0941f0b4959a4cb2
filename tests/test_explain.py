"""The explain page: its numbers are the trace's, it loads nothing from the network, and it opens in
a real headless browser (Debian's chromium, installed by scripts/setup_browser.sh) without errors,
with views that switch and a screenshot that is not blank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import engine
from engine.cli.main import main as cli_main
from engine.tools import explain

TEXT_A = "the quick brown fox jumps over the [MASK] dog."
TEXT_B = "it was not amused"


@pytest.fixture(scope="module")
def tiny(tiny_h5):
    enc = engine.load(tiny_h5)
    prep = engine.Preprocessor.from_weights(enc, max_seq_length=None)
    data = explain.explain_data(enc, prep, TEXT_A, TEXT_B)
    return enc, prep, data, explain.render_page(data)


def _float64_softmax(scores):
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_page_numbers_equal_the_trace(tiny):
    enc, prep, data, html = tiny
    page = explain.page_data(html)                     # read back from the HTML, as the browser does
    inputs, tokens = explain.model_inputs(enc, prep, TEXT_A, TEXT_B)
    trace = enc.trace(inputs)
    weights = enc.to_numpy(enc.parameters())
    assert page["tokens"] == tokens and tokens[0] == "[CLS]" and "[MASK]" in tokens
    assert page["segments"] == inputs["input_type_ids"][0].tolist()
    worst_unmixed = 0.0
    for i, layer in enumerate(page["layers"]):
        p = f"layers/{i}/"
        # the two mixed stages and the mixing weights: the trace's float32 values, bit for bit
        np.testing.assert_array_equal(np.float32(layer["attention"]["after_pre"]), trace[p + "probs"][0])
        np.testing.assert_array_equal(np.float32(layer["attention"]["after_post"]), trace[p + "mixed_probs"][0])
        np.testing.assert_array_equal(np.float32(layer["mixing"]["pre"]), weights[p + "attention/pre_softmax_weight"])
        np.testing.assert_array_equal(np.float32(layer["mixing"]["post"]), weights[p + "attention/post_softmax_weight"])
        # the unmixed reference view: softmax of the trace's scaled scores (no padding here)
        want = _float64_softmax(trace[p + "scaled_scores"][0])
        got = np.float64(layer["attention"]["unmixed"])
        worst_unmixed = max(worst_unmixed, float(np.abs(got - want).max()))
        for stage in ("pre", "post"):
            w = np.float64(weights[p + f"attention/{stage}_softmax_weight"])
            assert layer["mixing"][f"{stage}_distance"] == pytest.approx(
                np.linalg.norm(w - np.eye(len(w))) / np.sqrt(len(w)), rel=1e-12)
        gate = np.float64(trace[p + "gate_branch"][0])
        assert layer["gate"]["closed"] == pytest.approx(np.mean(np.abs(gate) < page["gate_closed"]), abs=0)
        assert sum(layer["gate"]["counts"]) == gate.size
        block_input = trace["embeddings/layer_norm"] if i == 0 else trace[f"layers/{i - 1}/feedforward_layer_norm"]
        for key, tensor in (("input", block_input), ("attention_update", trace[p + "attention_output"]),
                            ("feedforward_update", trace[p + "feedforward_output"])):
            assert layer["residual"][key] == pytest.approx(np.sqrt(np.mean(np.float64(tensor[0]) ** 2)), rel=1e-12)
    print(f"unmixed attention vs float64 softmax of the trace's scores: max |diff| {worst_unmixed:.2e}")
    assert worst_unmixed < 1e-6
    # predictions at the [MASK]: the trace's best tokens, in order
    mask_at = tokens.index("[MASK]")
    rows = page["predictions"]["rows"]
    assert page["predictions"]["at_masks"] and [r["position"] for r in rows] == [mask_at]
    best = np.argsort(-np.float64(trace["mlm/logits"][0][mask_at]))[:len(rows[0]["candidates"])]
    assert [c[0] for c in rows[0]["candidates"]] == [enc.vocab[j] for j in best]


def _assert_self_contained(html):
    for pattern in (r"\bsrc\s*=", r"\bhref\s*=", r"url\(", r"https?://", r"\bfetch\(", r"XMLHttpRequest",
                    r"\bimport\s*\(", r"<link\b", r"<iframe\b", r"@import"):
        hits = re.findall(pattern, html)
        assert not hits, f"the page refers outside itself: {pattern} found {hits[:3]}"


def test_page_loads_nothing_from_the_network(tiny):
    _assert_self_contained(tiny[3])


def test_page_refuses_a_text_longer_than_the_model(tiny):
    enc, prep, _, _ = tiny
    with pytest.raises(explain.ExplainError, match=r"needs \d+ tokens .* has 512 positions"):
        explain.explain_data(enc, prep, "word " * 600)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def _chromium(tmp_path, *args):
    profile = tmp_path / "profile"
    run = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return run


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup_browser.sh installs Debian's (needs root and apt)")
def test_page_opens_in_chromium_and_its_views_switch(tiny, tmp_path):
    enc, _, data, html = tiny
    page = tmp_path / "page.html"
    page.write_text(html, encoding="utf-8")
    run = _chromium(tmp_path, "--dump-dom", page.as_uri() + "#selftest")
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body[^>]*>", run.stdout)
    assert body, run.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    print(f"body: {attrs}; console lines: {len(console)}")
    assert attrs.get("data-ready") == "1", f"the page's script did not finish: {attrs}; {console}"
    assert attrs.get("data-errors") == "0", re.search(r'<pre id="errors">([^<]*)', run.stdout).group(1)
    assert not console, console
    L, N = enc.config.num_layers, enc.config.num_heads
    switches, distinct = map(int, re.match(r"switches=(\d+) distinct=(\d+)", attrs["data-selftest"]).groups())
    assert switches == L * N + 3
    assert distinct == L * N, f"only {distinct} of {L * N} heads drew a picture of their own"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup_browser.sh installs Debian's (needs root and apt)")
def test_page_screenshot_is_not_blank(tiny, tmp_path):
    from matplotlib import image
    page = tmp_path / "page.html"
    page.write_text(tiny[3], encoding="utf-8")
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    pixels = image.imread(str(shot))[..., :3]
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    blue = np.mean((pixels[..., 2] > pixels[..., 0] + 0.2))          # attention cells are blue
    print(f"screenshot {pixels.shape[1]}x{pixels.shape[0]}: {len(colours)} colours, {blue:.1%} blue pixels")
    assert len(colours) > 50 and blue > 0.01


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup_browser.sh installs Debian's (needs root and apt)")
def test_a_model_without_mixing_says_so(tiny, tmp_path):
    """A layer without mixing weights (a standard BERT block) is drawn without error, and both the
    attention and the mixing views say there is no mixing."""
    data = dict(tiny[2], layers=[dict(layer, mixing=None) for layer in tiny[2]["layers"]])
    page = tmp_path / "plain.html"
    page.write_text(explain.render_page(data), encoding="utf-8")
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body[^>]*>", run.stdout).group(0)))
    assert attrs.get("data-ready") == "1" and attrs.get("data-errors") == "0", attrs
    assert "This model has no talking-heads mixing" in run.stdout
    assert "This model has no mixing matrices" in run.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup_browser.sh installs Debian's (needs root and apt)")
def test_a_standard_bert_page(tmp_path):
    """A standard BERT file (multi-head attention, a dense feed-forward: no mixing, no gate) gets the
    page from its own trace: the three attention stages equal, no mixing matrices, no gate."""
    from tests.random_weights import random_tensors
    from weights.format import ModelConfig
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "it", "was", "not",
             "amused", "a", "dog", "##s", "."]
    cfg = ModelConfig(num_layers=2, hidden_size=16, num_heads=2, head_size=8, intermediate_size=32,
                      vocab_size=len(vocab), max_position_embeddings=32, type_vocab_size=2,
                      attention="multi_head", feed_forward="dense", hidden_activation="gelu_erf")
    enc = engine.Encoder(cfg, random_tensors(cfg, seed=4), vocab=vocab)
    data = explain.explain_data(enc, engine.Preprocessor(vocab), "the cat sat on the [MASK]")
    layer = data["layers"][0]
    assert layer["mixing"] is None and layer["gate"] is None
    assert layer["attention"]["after_pre"] == layer["attention"]["after_post"]
    page = tmp_path / "bert.html"
    page.write_text(explain.render_page(data), encoding="utf-8")
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body[^>]*>", run.stdout).group(0)))
    assert attrs.get("data-ready") == "1" and attrs.get("data-errors") == "0", attrs
    for note in ("This model has no talking-heads mixing", "This model has no mixing matrices", "This model has no gate"):
        assert note in run.stdout, note


# ------------------------------------------------------------------------------------ the command


def _cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_cli_writes_the_page(tiny, tiny_h5, tmp_path, capsys):
    enc, prep, data, _ = tiny
    out = tmp_path / "page.html"
    code, _, err = _cli(capsys, "explain", "--weights", tiny_h5, TEXT_A, "--text-b", TEXT_B, "--output", out)
    assert code == 0, err
    assert f"explain: wrote {out}" in err and f"{len(data['tokens'])} tokens through 2 layers x 4 heads" in err
    html = out.read_text(encoding="utf-8")
    _assert_self_contained(html)
    page = explain.page_data(html)
    assert page["tokens"] == data["tokens"] and page["tokens"][:3] == ["[CLS]", "the", "quick"]
    assert page["text_b"] == TEXT_B and 1 in page["segments"]
    assert page["layers"] == data["layers"]               # the numbers the module's own tests check
    assert not [p for p in tmp_path.iterdir() if p.name != "page.html"]   # no temporary file left behind


def test_cli_refuses_an_existing_page_without_force(tiny_h5, tmp_path, capsys):
    out = tmp_path / "page.html"
    out.write_text("keep me", encoding="utf-8")
    code, _, err = _cli(capsys, "explain", "--weights", tiny_h5, "the cat sat", "--output", out)
    assert code == 2
    assert _error_line(err) == f"error: --output {out}: exists; pass --force to replace it"
    assert out.read_text(encoding="utf-8") == "keep me"
    code, _, err = _cli(capsys, "explain", "--weights", tiny_h5, "the cat sat", "--output", out, "--force")
    assert code == 0, err
    assert explain.page_data(out.read_text(encoding="utf-8"))["tokens"] == ["[CLS]", "the", "cat", "sat", "[SEP]"]


def test_cli_refuses_a_missing_output_folder_and_an_empty_text(tiny_h5, tmp_path, capsys):
    missing = tmp_path / "typo"
    code, _, err = _cli(capsys, "explain", "--weights", tiny_h5, "the cat sat", "--output", missing / "page.html")
    assert code == 2
    assert _error_line(err) == f"error: --output {missing / 'page.html'}: the folder {missing} does not exist"
    assert not missing.exists()                                       # never created
    code, _, err = _cli(capsys, "explain", "--weights", tiny_h5, "   ", "--output", tmp_path / "page.html")
    assert code == 2
    assert _error_line(err) == "error: the text has no tokens: it is empty or all whitespace"
    assert not (tmp_path / "page.html").exists()


def test_cli_predicts_at_each_mask_with_the_mlm_head(tiny_trained_h5, tmp_path, capsys):
    out = tmp_path / "page.html"
    text = "the cat sat on the [MASK] because it was [MASK]"
    code, _, err = _cli(capsys, "explain", "--weights", tiny_trained_h5, text, "--output", out)
    assert code == 0, err
    page = explain.page_data(out.read_text(encoding="utf-8"))
    masks = [i for i, token in enumerate(page["tokens"]) if token == "[MASK]"]
    predictions = page["predictions"]
    assert len(masks) == 2 and predictions["at_masks"]
    assert [row["position"] for row in predictions["rows"]] == masks
    # the same candidates fill-mask gives (one tokenizer for [MASK], one softmax), most probable first
    from engine.tools.fill_mask import fill_mask
    enc = engine.load(tiny_trained_h5)
    want = fill_mask(enc, engine.Preprocessor.from_weights(enc, max_seq_length=None), text,
                     top_k=explain.TOP_PREDICTIONS).candidates
    for row, candidates in zip(predictions["rows"], want):
        assert [c[0] for c in row["candidates"]] == [c[0] for c in candidates]
        np.testing.assert_allclose([c[1] for c in row["candidates"]], [c[1] for c in candidates], rtol=1e-4)
    best = ", ".join(f"{row['candidates'][0][0]} ({row['candidates'][0][1]:.2f})" for row in predictions["rows"])
    assert f"best at each [MASK]: {best}" in err
