"""A Hugging Face BERT checkpoint folder -> one HDF5 weights file. NumPy, h5py and the standard
library only: no torch, no transformers, no safetensors package.

    python -m engine import-hf MODEL_DIR --output OUT.h5 [--force]

    from weights.hf_import import import_hf, read_hf_folder
    config, tensors, sources, vocab, provenance = read_hf_folder("all-MiniLM-L6-v2/")
    import_hf("all-MiniLM-L6-v2/", "minilm.h5")

What the folder holds, and what becomes of it:
- config.json: model_type "bert" (or none, as the oldest configs), architectures BertModel,
  BertForMaskedLM or BertForPreTraining (or none; another transformers Bert* class is refused, a
  custom class built on BertModel, such as AntiBERTy, is read by its tensors with a warning),
  absolute position embeddings, an encoder (not a decoder, no cross-attention). The sizes
  (transformers' BertConfig defaults where a key is absent), `layer_norm_eps` and `hidden_act`
  ("gelu" is the erf GELU; "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate" and
  "gelu_python_tanh" all compute the tanh formula) become the file's config; anything else is
  refused by name.
- model.safetensors (preferred) or pytorch_model.bin (weights/safetensors_file.py,
  weights/torch_checkpoint.py), matched by weights/hf_names.py. The file is standard BERT:
  attention "multi_head", feed_forward "dense"; has_mlm when the checkpoint has the MLM head.
  A checkpoint without a pooler (BertForMaskedLM saves none) gets a zero pooler, so pooled_output
  is exactly 0, and `cls` pooling, with a warning.
- vocab.txt (else tokenizer.json's WordPiece vocab), one token per row of the word table;
  tokenizer_config.json's do_lower_case (BertTokenizer's default, true, when absent).
- a sentence-transformers folder (modules.json): Transformer, Pooling (mean or cls), optional
  Normalize; sentence_bert_config.json's max_seq_length. They become the file's `pooling`,
  `normalize` and `max_seq_length`, what `encode` does by default. A plain folder gets "pooled",
  false and 0.

The provenance (root attributes, strings) names the folder, the importer, the time (UTC), the
sha256 of config.json and of the weights file, the tensors left out, and any warnings.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import NamedTuple

from weights import format as fmt
from weights.hf_names import HfImportError, MLM_PREFIX, canonical_name, convert, match_names
from weights.safetensors_file import FLOAT_DTYPES, SafetensorsFile
from weights.torch_checkpoint import TorchCheckpoint
from weights.vocab import read_vocab
from weights.write import check_output_path, write_weights

__all__ = ["HfImportError", "HfModel", "read_hf_folder", "import_hf", "write_model"]

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# hidden_act -> the file's hidden_activation. The tanh names all compute 0.5x(1 + tanh(sqrt(2/pi)(x +
# 0.044715x^3))): gelu_fast as x*0.7978845608*(1 + 0.044715x^2), whose constant is sqrt(2/pi) to 3e-12,
# far below float32's resolution; gelu_pytorch_tanh in torch's C code.
ACTIVATIONS = {"gelu": "gelu_erf", "gelu_python": "gelu_erf", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_python_tanh": "gelu_tanh"}
# ModelConfig field -> (config.json key, transformers' BertConfig default)
SIZES = {"num_layers": ("num_hidden_layers", 12), "hidden_size": ("hidden_size", 768),
         "num_heads": ("num_attention_heads", 12), "intermediate_size": ("intermediate_size", 3072),
         "vocab_size": ("vocab_size", 30522), "max_position_embeddings": ("max_position_embeddings", 512),
         "type_vocab_size": ("type_vocab_size", 2)}
TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")


class HfModel(NamedTuple):
    """What read_hf_folder returns: everything write_weights needs."""
    config: fmt.ModelConfig
    tensors: dict            # dataset path -> float32 array
    sources: dict            # dataset path -> the checkpoint's tensor name
    vocab: list
    provenance: dict         # root attributes, strings


@dataclasses.dataclass
class Sentence:
    """A sentence-transformers folder's settings."""
    model_dir: str           # where the Transformer module's files are
    pooling: str
    normalize: bool
    max_seq_length: int | None
    lower_case: bool         # sentence_bert_config.json's do_lower_case: the text is lowercased first
    dimension: int | None    # the Pooling's word_embedding_dimension: the hidden size it was made for
    modules: str             # "Transformer, Pooling (mean), Normalize"


def read_json(path: str, kind=dict):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise HfImportError(f"{path}: holds a JSON {type(value).__name__}, expected a {kind.__name__}")
    return value


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- config.json

def check_model(path: str, hf: dict) -> list[str]:
    """Refuses, by name, every config.json that is not a BERT encoder with absolute positions;
    returns the warnings (a custom architecture, read by its tensors)."""
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise HfImportError(f"{path}: model_type {model_type!r} is not supported: import-hf reads BERT checkpoints "
                            f"(BertModel, BertForMaskedLM)")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise HfImportError(f"{path}: architectures is {architectures!r}, not a list of class names")
    # transformers' other Bert* classes put task layers (a classifier, a decoder) where the format
    # has none; a class of another name is a model built on BertModel, judged by its tensors.
    other = [a for a in architectures if a not in ARCHITECTURES and a.startswith("Bert")]
    if other:
        raise HfImportError(f"{path}: architectures {other} are not supported: import-hf reads "
                            f"{', '.join(ARCHITECTURES)} (its MLM part)")
    custom = [a for a in architectures if not a.startswith("Bert")]
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise HfImportError(f"{path}: position_embedding_type {position!r} is not supported: the engine adds "
                            f"absolute position embeddings only")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            raise HfImportError(f"{path}: {key} is true: import-hf reads BERT encoders only")
    return [f"architectures {custom}: not a transformers BERT class; read by its tensor names (the encoder, the "
            f"MLM head; other heads left out)"] if custom else []


def hidden_activation(path: str, hf: dict) -> str:
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        erf = [k for k, v in ACTIVATIONS.items() if v == "gelu_erf"]
        tanh = [k for k, v in ACTIVATIONS.items() if v == "gelu_tanh"]
        raise HfImportError(f"{path}: hidden_act {act!r} is not supported: the engine's GELU is the erf one "
                            f"({', '.join(erf)}) or the tanh one ({', '.join(tanh)})")
    return ACTIVATIONS[act]


def sizes(path: str, hf: dict) -> dict:
    out = {}
    for field, (key, default) in SIZES.items():
        value = hf.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HfImportError(f"{path}: {key} is {value!r}, not a positive integer")
        out[field] = value
    if out["hidden_size"] % out["num_heads"]:
        raise HfImportError(f"{path}: hidden_size {out['hidden_size']} is not a multiple of num_attention_heads "
                            f"{out['num_heads']}")
    out["head_size"] = out["hidden_size"] // out["num_heads"]
    eps = hf.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise HfImportError(f"{path}: layer_norm_eps is {eps!r}, not a small positive number")
    out["layer_norm_epsilon"] = float(eps)
    return out


# ---------------------------------------------------------------------------- tokenizer and vocab

def tokenizer_lower_case(folder: str) -> tuple[bool, str]:
    """(do_lower_case, where it came from), refusing tokenizer settings the preprocessor cannot follow."""
    path = os.path.join(folder, "tokenizer_config.json")
    tc = read_json(path) if os.path.isfile(path) else {}
    cls = tc.get("tokenizer_class")
    if cls is not None and cls not in TOKENIZER_CLASSES:
        raise HfImportError(f"{path}: tokenizer_class {cls!r} is not supported: the engine's preprocessor is "
                            f"BERT's WordPiece ({', '.join(TOKENIZER_CLASSES)})")
    lower = tc.get("do_lower_case", True)   # BertTokenizer's default
    if not isinstance(lower, bool):
        raise HfImportError(f"{path}: do_lower_case is {lower!r}, not true or false")
    strip = tc.get("strip_accents")
    if strip is not None and bool(strip) != lower:
        raise HfImportError(f"{path}: strip_accents {strip} with do_lower_case {lower} is not supported: the "
                            f"preprocessor strips accents exactly when it lowercases")
    if tc.get("tokenize_chinese_chars", True) is False:
        raise HfImportError(f"{path}: tokenize_chinese_chars false is not supported: the preprocessor splits "
                            f"CJK characters")
    return lower, ("tokenizer_config.json" if "do_lower_case" in tc else "default")


def wordpiece_vocab(folder: str, vocab_size: int) -> tuple[list[str], str]:
    """(tokens, the file they came from): vocab.txt, else tokenizer.json's WordPiece vocab."""
    path = os.path.join(folder, "vocab.txt")
    if os.path.isfile(path):
        try:
            tokens = read_vocab(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise HfImportError(f"{path}: {e}") from None
    else:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise HfImportError(f"{folder}: no vocab.txt (nor a tokenizer.json): the file needs the WordPiece vocab")
        model = read_json(path).get("model") or {}
        ids = model.get("vocab") if model.get("type") == "WordPiece" else None
        if not isinstance(ids, dict) or sorted(ids.values()) != list(range(len(ids))):
            raise HfImportError(f"{path}: no WordPiece vocab with ids 0..n-1 (and no vocab.txt)")
        tokens = sorted(ids, key=ids.get)
    if len(tokens) != vocab_size:
        raise HfImportError(f"{path}: {len(tokens)} tokens but config.json's vocab_size is {vocab_size}: the file "
                            f"needs one token per row of the word table")
    return tokens, path


# ---------------------------------------------------------------------------- sentence-transformers

def pooling_mode(path: str) -> tuple[str, int | None]:
    """('mean' or 'cls', word_embedding_dimension) from a Pooling module's config.json; every
    other mode refused by name."""
    cfg = read_json(path)
    on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    if len(on) != 1 or on[0] not in POOLING_MODES:
        raise HfImportError(f"{path}: pooling {', '.join(on) or 'with no mode'} is not supported: import-hf reads "
                            f"one of {', '.join(POOLING_MODES)}")
    return POOLING_MODES[on[0]], cfg.get("word_embedding_dimension")


def sentence_transformers(folder: str) -> Sentence | None:
    """The settings of a sentence-transformers folder (modules.json), None for a plain one."""
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return None
    modules = read_json(path, list)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else repr(m) for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        named = [str(m.get("type")) if isinstance(m, dict) else repr(m) for m in modules]
        raise HfImportError(f"{path}: modules {named} are not supported: import-hf reads Transformer, Pooling "
                            f"and an optional Normalize, in that order")
    model_dir = os.path.join(folder, str(modules[0].get("path", "")))
    pooling, dimension = pooling_mode(os.path.join(folder, str(modules[1].get("path", "")), "config.json"))
    sbert_path = os.path.join(model_dir, "sentence_bert_config.json")
    sbert = read_json(sbert_path) if os.path.isfile(sbert_path) else {}
    length = sbert.get("max_seq_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 2):
        raise HfImportError(f"{sbert_path}: max_seq_length is {length!r}, not an integer of at least 2")
    return Sentence(model_dir=model_dir, pooling=pooling, normalize=len(kinds) == 3, max_seq_length=length,
                    lower_case=bool(sbert.get("do_lower_case", False)), dimension=dimension,
                    modules=", ".join([kinds[0], f"Pooling ({pooling})"] + kinds[2:]))


# ---------------------------------------------------------------------------- the checkpoint

def weights_file(folder: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(folder, index)):
            raise HfImportError(f"{folder}: a sharded checkpoint ({index}) is not supported: save it as one "
                                f"{WEIGHT_FILES[0]}")
    others = sorted(n for n in os.listdir(folder) if n.endswith((".h5", ".msgpack", ".ckpt.index", ".onnx")))
    found = f" (it has {', '.join(others)})" if others else ""
    raise HfImportError(f"{folder}: no {' or '.join(WEIGHT_FILES)}{found}: import-hf reads PyTorch weights")


def open_checkpoint(path: str):
    return SafetensorsFile(path) if path.endswith(".safetensors") else TorchCheckpoint(path)


def read_tensors(path: str, config: fmt.ModelConfig, tied: bool):
    """(tensors, plan, config) of the checkpoint at `path`, matched to `config` (whose has_mlm is
    decided here, from the MLM head's presence); tied: config.json's tie_word_embeddings."""
    with open_checkpoint(path) as checkpoint:
        shapes = {name: entry.shape for name, entry in checkpoint.entries.items()}
        has_mlm = any(canonical_name(name).startswith(MLM_PREFIX) for name in shapes)
        if has_mlm and not tied:
            raise HfImportError(f"{path}: the MLM head is untied (config.json's tie_word_embeddings is false): the "
                                f"format ties the MLM output to the word embeddings")
        config = dataclasses.replace(config, has_mlm=has_mlm)
        plan = match_names(path, shapes, config)
        not_float = [f"{name} ({checkpoint.entries[name].dtype})" for name, _ in plan.mapping.values()
                     if checkpoint.entries[name].dtype not in FLOAT_DTYPES]
        if not_float:
            raise HfImportError(f"{path}: weights that are not floating point: {', '.join(not_float)}")
        return convert(path, plan, checkpoint.read, config), plan, config


# ---------------------------------------------------------------------------- the folder

def read_hf_folder(folder: str) -> HfModel:
    """Reads and checks a Hugging Face BERT folder: (config, tensors, sources, vocab, provenance).
    Raises HfImportError (or SafetensorsError / TorchCheckpointError for a damaged weights file),
    each naming the file and what is wrong."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise HfImportError(f"{folder}: no such folder")
    sentence = sentence_transformers(folder)
    model_dir = sentence.model_dir if sentence else folder
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise HfImportError(f"{model_dir}: no config.json: not a Hugging Face model folder")
    hf = read_json(config_path)
    warnings = check_model(config_path, hf)
    size = sizes(config_path, hf)
    lower, lower_source = tokenizer_lower_case(model_dir)
    if sentence and sentence.lower_case and not lower:
        raise HfImportError(f"{model_dir}: sentence_bert_config.json lowercases the text for a cased tokenizer "
                            f"(accents kept), which the preprocessor does not do")
    if sentence and sentence.dimension not in (None, size["hidden_size"]):
        raise HfImportError(f"{folder}: the Pooling module's word_embedding_dimension {sentence.dimension} differs "
                            f"from the model's hidden_size {size['hidden_size']}")
    length = (sentence.max_seq_length or 0) if sentence else 0
    if length > size["max_position_embeddings"]:
        warnings.append(f"sentence_bert_config.json's max_seq_length {length} is more than the model's "
                        f"{size['max_position_embeddings']} positions: capped")
        length = size["max_position_embeddings"]
    # attention_mask_constant stays -1e9. transformers adds torch.finfo(float32).min to masked keys
    # instead; after the softmax both give masked keys exactly 0 in float32 (exp underflows), so every
    # row with a real token gets the same probabilities; they differ only on a row of padding alone,
    # whose outputs nobody reads.
    config = fmt.ModelConfig(**size, hidden_activation=hidden_activation(config_path, hf), do_lower_case=lower,
                             attention="multi_head", feed_forward="dense",
                             pooling=sentence.pooling if sentence else "pooled",
                             normalize=sentence.normalize if sentence else False, max_seq_length=length)
    vocab, vocab_path = wordpiece_vocab(model_dir, config.vocab_size)   # before the weights: a refusal costs nothing
    path = weights_file(model_dir)
    tensors, plan, config = read_tensors(path, config, tied=hf.get("tie_word_embeddings", True) is not False)
    if plan.pooler_missing:
        if config.pooling == "pooled":
            config = dataclasses.replace(config, pooling="cls")
        warnings.append(f"{os.path.basename(path)} has no pooler (pooler.dense): written as zeros, so pooled_output "
                        f"is 0; encode's default is {config.pooling} pooling")
    sources = {ours: name for ours, (name, _) in plan.mapping.items()}
    sources.update({p: "zeros: the checkpoint has no pooler" for p in fmt.POOLER_TENSORS if plan.pooler_missing})
    provenance = {
        "source_path": folder,
        "importer": "weights.hf_import",
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_sha256": sha256_file(config_path),
        "weights_file": os.path.relpath(path, folder),
        "weights_sha256": sha256_file(path),
        "architectures": ", ".join(hf.get("architectures") or []),
        "hidden_act": str(hf.get("hidden_act", "gelu")),
        "do_lower_case_source": "sentence_bert_config.json" if sentence and sentence.lower_case else lower_source,
        "vocab_source": vocab_path,
        "ignored_tensors": ", ".join(plan.ignored),
        "sentence_transformers": sentence.modules if sentence else "",
        "import_warnings": "\n".join(warnings),
    }
    return HfModel(config, tensors, sources, vocab, provenance)


def write_model(model: HfModel, out: str, *, force: bool = False, on_progress=None) -> str:
    """Writes what read_hf_folder read, atomically; returns the absolute path."""
    return write_weights(out, model.config, model.tensors, sources=model.sources, vocab=model.vocab,
                         vocab_source=model.provenance["vocab_source"], provenance=model.provenance, force=force,
                         on_progress=on_progress)


def import_hf(folder: str, out: str, force: bool = False, on_progress=None) -> str:
    """Reads a Hugging Face BERT folder and writes it to `out` (refused if it exists, unless force);
    on_progress(nbytes, path) after each dataset written. Returns the absolute path."""
    check_output_path(out, force)   # before the read: a refused output costs nothing
    return write_model(read_hf_folder(folder), out, force=force, on_progress=on_progress)
