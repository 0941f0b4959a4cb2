"""import-hf: tiny Hugging Face BERT folders written here (tests/hf_folders.py; no torch) become
weights files: every tensor where the format wants it (transposed, split into heads), the same file
from model.safetensors and pytorch_model.bin, sentence-transformers settings in the config, and
every folder the engine cannot run refused by name. Then encode's pooling, normalize and length
defaults from the file."""

import hashlib
import json
import math
import os

import numpy as np
import pytest

import weights
from engine.cli.main import main
from tests import hf_folders as hf
from tests.hf_folders import D, H, I, L, N, P, V, VOCAB, bert_config, bert_tensors, make_folder, make_sentence_folder
from weights import format as fmt
from weights.hf_import import HfImportError, import_hf, read_hf_folder
from weights.safetensors_file import SafetensorsError


def test_tensors_land_transposed_and_split_into_heads(tmp_path):
    src = bert_tensors()
    config, tensors, sources, vocab, provenance = read_hf_folder(make_folder(tmp_path / "m"))
    assert (config.attention, config.feed_forward, config.hidden_activation) == ("multi_head", "dense", "gelu_erf")
    assert config.has_mlm and config.do_lower_case and (config.pooling, config.normalize, config.max_seq_length) == (
        "pooled", False, 0)
    assert set(tensors) == set(fmt.expected_shapes(config)) and vocab == VOCAB
    for i in range(L):
        b, ours = f"bert.encoder.layer.{i}.", fmt.block_prefix(i)
        for name in ("query", "key", "value"):
            w, bias = src[b + f"attention.self.{name}.weight"], src[b + f"attention.self.{name}.bias"]
            kernel = tensors[ours + f"attention/{name}/kernel"]                       # [H,N,D]
            for n in range(N):
                for d in range(D):
                    assert np.array_equal(kernel[:, n, d], w[n * D + d, :])
                    assert tensors[ours + f"attention/{name}/bias"][n, d] == bias[n * D + d]
        out = tensors[ours + "attention/output/kernel"]                               # [N,D,H]
        assert all(np.array_equal(out[n, d], src[b + "attention.output.dense.weight"][:, n * D + d])
                   for n in range(N) for d in range(D))
        assert np.array_equal(tensors[ours + "feedforward/intermediate/kernel"], src[b + "intermediate.dense.weight"].T)
        assert np.array_equal(tensors[ours + "feedforward/output/kernel"], src[b + "output.dense.weight"].T)
        assert np.array_equal(tensors[ours + "feedforward_layer_norm/gamma"], src[b + "output.LayerNorm.weight"])
        assert np.array_equal(tensors[ours + "attention_layer_norm/beta"], src[b + "attention.output.LayerNorm.bias"])
        assert sources[ours + "attention/query/kernel"] == b + "attention.self.query.weight"
    assert np.array_equal(tensors["pooler/kernel"], src["bert.pooler.dense.weight"].T)
    assert np.array_equal(tensors["mlm/transform/kernel"], src["cls.predictions.transform.dense.weight"].T)
    assert np.array_equal(tensors["mlm/output_bias"], src["cls.predictions.bias"])
    assert np.array_equal(tensors["embeddings/type"], src["bert.embeddings.token_type_embeddings.weight"])
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in tensors.values())


def test_round_trip_through_the_weights_file(tmp_path):
    folder = make_folder(tmp_path / "m", tokenizer_config={"do_lower_case": False, "tokenizer_class": "BertTokenizer"},
                         config=bert_config(hidden_act="gelu_new", layer_norm_eps=1e-6))
    model = read_hf_folder(folder)
    out = import_hf(folder, str(tmp_path / "m.h5"))
    w = weights.load(out, verify_checksums=True)
    assert w.config == model.config and w.config.hidden_activation == "gelu_tanh"
    assert w.config.layer_norm_epsilon == 1e-6 and w.config.do_lower_case is False
    assert w.config.attention_mask_constant == -1e9
    assert all(np.array_equal(w.tensors[p], model.tensors[p]) for p in model.tensors) and w.vocab == VOCAB
    assert w.sources["embeddings/word"] == "bert.embeddings.word_embeddings.weight"
    p = w.provenance
    assert p["importer"] == "weights.hf_import" and p["source_path"] == os.path.abspath(folder)
    assert p["weights_file"] == "model.safetensors" and p["do_lower_case_source"] == "tokenizer_config.json"
    for name, key in (("config.json", "config_sha256"), ("model.safetensors", "weights_sha256")):
        assert p[key] == hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
    assert p["imported_at"].endswith("+00:00")
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        import_hf(folder, out)
    assert import_hf(folder, out, force=True) == out


def test_pytorch_bin_gives_the_same_tensors_as_safetensors(tmp_path):
    """With the NSP head and the position_ids buffer left out (and listed), a strided kernel, a tied
    decoder sharing the word table's storage, TF-style LayerNorm gamma/beta names."""
    src = bert_tensors(nsp=True, buffers=True)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in src.items()}
    del renamed["cls.predictions.decoder.weight"]
    renamed["cls.predictions.decoder.weight"] = src["bert.embeddings.word_embeddings.weight"]
    a = read_hf_folder(make_folder(tmp_path / "st", tensors=src))
    b = read_hf_folder(make_folder(tmp_path / "pt", tensors=renamed, weights="torch",
                                   transposed=("bert.encoder.layer.1.output.dense.weight",),
                                   tied=("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")))
    assert a.config == b.config and set(a.tensors) == set(b.tensors)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert b.provenance["weights_file"] == "pytorch_model.bin"
    for m in (a, b):
        assert set(m.provenance["ignored_tensors"].split(", ")) == {
            "bert.embeddings.position_ids", "cls.seq_relationship.weight", "cls.seq_relationship.bias"}


def test_names_without_the_bert_prefix_and_without_heads(tmp_path):
    model = read_hf_folder(make_folder(tmp_path / "m", tensors=bert_tensors(prefix="", mlm=False),
                                       config=bert_config(architectures=["BertModel"])))
    assert not model.config.has_mlm and "mlm/output_bias" not in model.tensors
    assert model.sources["pooler/kernel"] == "pooler.dense.weight"


def test_a_custom_class_on_bert_is_read_by_its_tensors_and_its_task_heads_left_out(tmp_path):
    """As AntiBERTy: BertModel + BertLMPredictionHead + classifiers on the pooled output under cls."""
    tensors = bert_tensors()
    tensors.update({"cls.species.weight": np.ones((6, H), np.float32), "cls.species.bias": np.ones(6, np.float32),
                    "cls.predictions.decoder.bias": tensors["cls.predictions.bias"]})
    folder = make_folder(tmp_path / "m", tensors=tensors, config=bert_config(architectures=["AntiBERTy"]))
    model = read_hf_folder(folder)
    assert model.config.has_mlm and model.provenance["ignored_tensors"] == "cls.species.weight, cls.species.bias"
    assert "architectures ['AntiBERTy']: not a transformers BERT class" in model.provenance["import_warnings"]
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"] + 1
    with pytest.raises(HfImportError, match="cls.predictions.decoder.bias differs from cls.predictions.bias"):
        read_hf_folder(make_folder(tmp_path / "b", tensors=tensors))


def test_a_checkpoint_without_a_pooler_gets_zeros_and_cls_pooling(tmp_path):
    model = read_hf_folder(make_folder(tmp_path / "m", tensors=bert_tensors(pooler=False, decoder=False)))
    assert not model.tensors["pooler/kernel"].any() and not model.tensors["pooler/bias"].any()
    assert model.config.pooling == "cls" and "no pooler" in model.provenance["import_warnings"]
    assert model.sources["pooler/kernel"].startswith("zeros")


@pytest.mark.parametrize("act, ours", [("gelu", "gelu_erf"), ("gelu_python", "gelu_erf"), ("gelu_new", "gelu_tanh"),
                                       ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
                                       ("gelu_accurate", "gelu_tanh"), ("gelu_python_tanh", "gelu_tanh")])
def test_hidden_act_names(tmp_path, act, ours):
    config = read_hf_folder(make_folder(tmp_path / "m", config=bert_config(hidden_act=act))).config
    assert config.hidden_activation == ours


def test_gelu_fast_is_the_tanh_formula_within_float32():
    """transformers' gelu_fast writes x*0.7978845608*(1 + 0.044715x^2) for sqrt(2/pi)(x + 0.044715x^3)."""
    x = np.linspace(-12, 12, 200001)
    tanh_formula = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    fast = 0.5 * x * (1 + np.tanh(x * 0.7978845608 * (1 + 0.044715 * x * x)))
    # under 1e-11 absolute: far below float32's spacing at any value the GELU takes outside its flat tail
    assert np.max(np.abs(fast - tanh_formula)) < 1e-11


def _edit(tensors, **changes):
    out = dict(tensors)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


BASE = bert_tensors()
NAN = BASE["bert.encoder.layer.1.output.dense.weight"].copy()
NAN[0, 3] = np.nan
REFUSALS = {
    "roberta": (dict(config=bert_config(model_type="roberta")),
                "model_type 'roberta' is not supported: import-hf reads BERT checkpoints (BertModel, BertForMaskedLM)"),
    "classifier": (dict(config=bert_config(architectures=["BertForSequenceClassification"])),
                   "architectures ['BertForSequenceClassification'] are not supported"),
    "relative": (dict(config=bert_config(position_embedding_type="relative_key")),
                 "position_embedding_type 'relative_key' is not supported"),
    "decoder": (dict(config=bert_config(is_decoder=True)), "is_decoder is true: import-hf reads BERT encoders only"),
    "relu": (dict(config=bert_config(hidden_act="relu")), "hidden_act 'relu' is not supported"),
    "heads": (dict(config=bert_config(num_attention_heads=3)),
              "hidden_size 8 is not a multiple of num_attention_heads 3"),
    "untied": (dict(tensors=_edit(BASE, cls__predictions__decoder__weight=BASE["cls.predictions.bias"][:, None]
                                  + BASE["bert.embeddings.word_embeddings.weight"])),
               "cls.predictions.decoder.weight differs from the word embeddings (an untied MLM decoder)"),
    "untied config": (dict(config=bert_config(tie_word_embeddings=False)),
                      "the MLM head is untied (config.json's tie_word_embeddings is false)"),
    "unknown": (dict(tensors=_edit(BASE, **{"bert.encoder.layer.0.attention.self.rotary.weight": np.ones(3, np.float32),
                                            "classifier.weight": np.ones((2, H), np.float32)})),
                "unknown tensors (2): bert.encoder.layer.0.attention.self.rotary.weight, classifier.weight"),
    "missing": (dict(tensors=_edit(BASE, **{"bert.encoder.layer.1.intermediate.dense.bias": None})),
                "missing (1): encoder.layer.1.intermediate.dense.bias"),
    "mis-shaped": (dict(config=bert_config(intermediate_size=12)),
                   f"bert.encoder.layer.0.intermediate.dense.weight has shape [{I}, {H}], expected [12, {H}]"),
    "more layers": (dict(config=bert_config(num_hidden_layers=3)), "missing (16): encoder.layer.2.attention"),
    "nan": (dict(tensors=_edit(BASE, **{"bert.encoder.layer.1.output.dense.weight": NAN})),
            "tensors with NaN or infinite values (1): bert.encoder.layer.1.output.dense.weight"),
    "twice": (dict(tensors=_edit(BASE, **{"pooler.dense.bias": BASE["bert.pooler.dense.bias"]})),
              "tensors present twice under two spellings (1): bert.pooler.dense.bias and pooler.dense.bias"),
    "integer weight": (dict(tensors=_edit(BASE, **{"bert.pooler.dense.bias": np.zeros(H, np.int64)})),
                       "weights that are not floating point: bert.pooler.dense.bias (I64)"),
    "vocab": (dict(vocab=VOCAB[:-1]), f"vocab.txt: {V - 1} tokens but config.json's vocab_size is {V}"),
    "no vocab": (dict(vocab=None), "no vocab.txt (nor a tokenizer.json)"),
    "accents": (dict(tokenizer_config={"do_lower_case": True, "strip_accents": False}),
                "strip_accents False with do_lower_case True is not supported"),
    "tokenizer": (dict(tokenizer_config={"tokenizer_class": "BertJapaneseTokenizer"}),
                  "tokenizer_class 'BertJapaneseTokenizer' is not supported"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_names_what_is_wrong(tmp_path, case):
    options, message = REFUSALS[case]
    folder = make_folder(tmp_path / "m", **options)
    with pytest.raises(HfImportError) as e:
        read_hf_folder(folder)
    assert message in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "m.h5")


def test_refusals_of_the_folder_itself(tmp_path):
    with pytest.raises(HfImportError, match="no such folder"):
        read_hf_folder(tmp_path / "absent")
    folder = make_folder(tmp_path / "m")
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "tf_model.h5"))
    with pytest.raises(HfImportError, match=r"no model.safetensors or pytorch_model.bin \(it has tf_model.h5\)"):
        read_hf_folder(folder)
    hf.write_json(os.path.join(folder, "model.safetensors.index.json"), {"weight_map": {}})
    with pytest.raises(HfImportError, match="a sharded checkpoint"):
        read_hf_folder(folder)
    truncated = make_folder(tmp_path / "cut")
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(SafetensorsError, match="run past the data"):
        read_hf_folder(truncated)


def test_a_tokenizer_json_vocab_when_there_is_no_vocab_txt(tmp_path):
    folder = make_folder(tmp_path / "m", vocab=None)
    hf.write_json(os.path.join(folder, "tokenizer.json"),
                  {"model": {"type": "WordPiece", "vocab": {t: i for i, t in reversed(list(enumerate(VOCAB)))}}})
    model = read_hf_folder(folder)
    assert model.vocab == VOCAB and model.provenance["vocab_source"].endswith("tokenizer.json")


# ---------------------------------------------------------------------------------------- sentence-transformers

def test_sentence_transformers_settings_become_the_config(tmp_path):
    model = read_hf_folder(make_sentence_folder(tmp_path / "mean"))
    c = model.config
    assert (c.pooling, c.normalize, c.max_seq_length, c.has_mlm) == ("mean", True, 8, False)
    assert model.provenance["sentence_transformers"] == "Transformer, Pooling (mean), Normalize"
    c = read_hf_folder(make_sentence_folder(tmp_path / "cls", pooling_modes=("pooling_mode_cls_token",),
                                            normalize=False, max_seq_length=None)).config
    assert (c.pooling, c.normalize, c.max_seq_length) == ("cls", False, 0)
    capped = read_hf_folder(make_sentence_folder(tmp_path / "long", max_seq_length=4 * P))
    assert capped.config.max_seq_length == P and "capped" in capped.provenance["import_warnings"]


@pytest.mark.parametrize("modes, named", [(("pooling_mode_max_tokens",), "pooling_mode_max_tokens"),
                                          (("pooling_mode_mean_tokens", "pooling_mode_cls_token"),
                                           "pooling_mode_cls_token, pooling_mode_mean_tokens"), ((), "with no mode")])
def test_unsupported_pooling_is_refused_by_name(tmp_path, modes, named):
    with pytest.raises(HfImportError, match=f"pooling {named} is not supported"):
        read_hf_folder(make_sentence_folder(tmp_path / "m", pooling_modes=modes))


def test_unsupported_sentence_modules_are_refused(tmp_path):
    folder = make_sentence_folder(tmp_path / "m")
    modules = json.load(open(os.path.join(folder, "modules.json")))
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    hf.write_json(os.path.join(folder, "modules.json"), modules)
    with pytest.raises(HfImportError, match=r"sentence_transformers.models.Dense'\] are not supported"):
        read_hf_folder(folder)


# ---------------------------------------------------------------------------------------- the command line

def test_import_hf_command(tmp_path, capsys):
    folder, out = make_folder(tmp_path / "m", tensors=bert_tensors(nsp=True)), str(tmp_path / "m.h5")
    assert main(["import-hf", folder, "--output", out]) == 0
    err = capsys.readouterr().err
    assert "import-hf: wrote" in err and "multi_head+dense+gelu_erf" in err and "left out: cls.seq_relationship" in err
    assert weights.load(out).config.has_mlm
    assert main(["import-hf", folder, "--output", out]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output {out}: exists; pass --force to replace it"
    assert main(["import-hf", folder, "--output", out, "--force"]) == 0
    capsys.readouterr()
    assert main(["import-hf", folder, "--output", str(tmp_path / "typo" / "m.h5")]) == 2
    assert f"the folder {tmp_path / 'typo'} does not exist" in capsys.readouterr().err
    roberta = make_folder(tmp_path / "r", config=bert_config(model_type="roberta"))
    assert main(["import-hf", roberta, "--output", str(tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "model_type 'roberta' is not supported" in err[-1]
    assert not os.path.exists(tmp_path / "r.h5")
    with pytest.raises(SystemExit):
        main(["import-hf", "--help"])
    assert "python -m engine import-hf all-MiniLM-L6-v2/ --output minilm.h5" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- encode

def _model_file(tmp_path, **config_changes):
    """A small talking-heads file (random weights, the tiny vocab) with encode's defaults changed."""
    from tests.random_weights import random_tensors
    config = fmt.ModelConfig(num_layers=1, hidden_size=H, num_heads=N, head_size=D, intermediate_size=I,
                             vocab_size=V, max_position_embeddings=P, type_vocab_size=2, **config_changes)
    return weights.write.write_weights(str(tmp_path / "model.h5"), config, random_tensors(config), vocab=VOCAB)


TEXTS = ["the cat sat on the mat the cat sat on the mat", "hello world", "a dog"]


def _reference(path, seq_length):
    import engine
    enc = engine.load(path)
    inputs = engine.Preprocessor(enc.vocab)(TEXTS, seq_length=seq_length)
    out = enc(inputs)
    mask = inputs["input_mask"][:, :, None].astype(np.float32)
    mean = (out["sequence_output"] * mask).sum(1) / mask.sum(1)
    return {"mean": mean, "cls": out["sequence_output"][:, 0], "pooled": out["pooled_output"]}


def _encode(capsys, *args):
    code = main(["encode", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, pooling, normalized", [([], "mean", True), (["--pooling", "cls"], "cls", True),
                                                        (["--no-normalize"], "mean", False),
                                                        (["--pooling", "pooled", "--no-normalize"], "pooled", False)])
def test_encode_pools_and_normalizes_by_the_file_defaults(tmp_path, capsys, flags, pooling, normalized):
    path = _model_file(tmp_path, pooling="mean", normalize=True, max_seq_length=6)
    out = tmp_path / "e.npy"
    code, err = _encode(capsys, "--weights", path, *TEXTS, "--output", str(out), *flags)
    assert code == 0, err
    expected = _reference(path, seq_length=6)[pooling]        # the file's max_seq_length truncates
    if normalized:
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(out), expected, rtol=2e-5, atol=2e-6)
    assert "truncated" in err and f"{'pooled_output' if pooling == 'pooled' else pooling + '_embedding'}" in err


def test_embed_in_the_python_api(tmp_path):
    import engine
    path = _model_file(tmp_path, pooling="mean", normalize=True)
    enc = engine.load(path, fast=True)
    inputs = engine.Preprocessor(enc.vocab)(TEXTS, seq_length=16)
    vectors = enc.embed(inputs)                                            # the file's defaults: mean, normalized
    reference = _reference(path, 16)
    np.testing.assert_allclose(vectors, reference["mean"] / np.linalg.norm(reference["mean"], axis=1, keepdims=True),
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(enc.embed(inputs, "cls", normalize=False, skip_padding=True), reference["cls"],
                               rtol=2e-5, atol=2e-6)
    assert np.array_equal(engine.load(path).embed(inputs, "pooled", False), reference["pooled"])
    with pytest.raises(ValueError, match="pooling 'max': expected one of"):
        enc.embed(inputs, "max")


def test_encode_seq_length_overrides_the_file_and_sequence_excludes_pooling(tmp_path, capsys):
    path = _model_file(tmp_path, pooling="cls", max_seq_length=6)
    out = tmp_path / "e.h5"
    code, err = _encode(capsys, "--weights", path, *TEXTS, "--output", str(out), "--seq-length", "16")
    assert code == 0, err
    import h5py
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["cls_embedding"][()], _reference(path, 16)["cls"], rtol=2e-5, atol=2e-6)
    code, err = _encode(capsys, "--weights", path, "hi", "--output", str(tmp_path / "s.npy"), "--sequence",
                        "--pooling", "mean")
    assert code == 2 and "--pooling and --normalize make sentence embeddings" in err
