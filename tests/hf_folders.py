"""Tiny Hugging Face BERT folders written by hand, for the import-hf tests, without torch or the
safetensors package: a safetensors writer from the format's spec, a torch.save-style zip archive
(pickled with stand-in `torch` modules that make the pickler emit the GLOBAL names torch emits), and
the config, vocab and sentence-transformers files around them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

L, H, N, I, P, T = 2, 8, 2, 16, 16, 2
D = H // N
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "hello", "world",
         "a", "dog", "##s", "run"]
V = len(VOCAB)

SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
                      np.dtype("int64"): "I64", np.dtype("int32"): "I32"}


class BF16:
    """A tensor to store as bfloat16: its float32 values cut to their top 16 bits."""

    def __init__(self, values):
        self.bits = (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)

    @property
    def values(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def bert_config(**changes) -> dict:
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": H, "num_hidden_layers": L,
              "num_attention_heads": N, "intermediate_size": I, "vocab_size": V, "max_position_embeddings": P,
              "type_vocab_size": T, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1, "pad_token_id": 0}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def bert_tensors(seed: int = 0, prefix: str = "bert.", mlm: bool = True, pooler: bool = True,
                 nsp: bool = False, buffers: bool = False, decoder: bool = True) -> dict[str, np.ndarray]:
    """A BertForMaskedLM-style state dict with random float32 values, HF shapes ([out,in] weights)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    t = {"embeddings.word_embeddings.weight": r(V, H), "embeddings.position_embeddings.weight": r(P, H),
         "embeddings.token_type_embeddings.weight": r(T, H), "embeddings.LayerNorm.weight": r(H),
         "embeddings.LayerNorm.bias": r(H)}
    for i in range(L):
        b = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            t[b + f"attention.self.{name}.weight"], t[b + f"attention.self.{name}.bias"] = r(H, H), r(H)
        t[b + "attention.output.dense.weight"], t[b + "attention.output.dense.bias"] = r(H, H), r(H)
        t[b + "attention.output.LayerNorm.weight"], t[b + "attention.output.LayerNorm.bias"] = r(H), r(H)
        t[b + "intermediate.dense.weight"], t[b + "intermediate.dense.bias"] = r(I, H), r(I)
        t[b + "output.dense.weight"], t[b + "output.dense.bias"] = r(H, I), r(H)
        t[b + "output.LayerNorm.weight"], t[b + "output.LayerNorm.bias"] = r(H), r(H)
    if pooler:
        t["pooler.dense.weight"], t["pooler.dense.bias"] = r(H, H), r(H)
    if buffers:
        t["embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]
    t = {prefix + k: v for k, v in t.items()}
    if mlm:
        t["cls.predictions.transform.dense.weight"], t["cls.predictions.transform.dense.bias"] = r(H, H), r(H)
        t["cls.predictions.transform.LayerNorm.weight"] = r(H)
        t["cls.predictions.transform.LayerNorm.bias"] = r(H)
        t["cls.predictions.bias"] = r(V)
        if decoder:
            t["cls.predictions.decoder.weight"] = t[prefix + "embeddings.word_embeddings.weight"].copy()
    if nsp:
        t["cls.seq_relationship.weight"], t["cls.seq_relationship.bias"] = r(2, H), r(2)
    return t


# ---------------------------------------------------------------------------------------- safetensors

def safetensors_bytes(tensors: dict, metadata: dict | None = None, edit=None) -> bytes:
    """The bytes of a .safetensors file; edit(header) may change the header dict before it is written."""
    header, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        if isinstance(value, BF16):
            dtype, data = "BF16", value.bits
        else:
            value = np.asarray(value)
            dtype, data = SAFETENSORS_DTYPES[value.dtype], value
        raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if edit is not None:
        edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)   # the reference writer pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_safetensors(path, tensors: dict, metadata: dict | None = None, edit=None) -> str:
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata, edit))
    return str(path)


# ---------------------------------------------------------------------------------------- torch.save

STORAGE_CLASSES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
                   np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage"}


@contextlib.contextmanager
def stand_in_torch():
    """`torch` and `torch._utils` modules holding what torch's pickler names, so that pickle writes
    GLOBAL "torch._utils _rebuild_tensor_v2" and "torch FloatStorage" as torch.save does."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: the stand-in only names the function")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in [*STORAGE_CLASSES.values(), "BFloat16Storage"]:
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Storage:
    def __init__(self, key: str, values):
        self.key = key
        if isinstance(values, BF16):
            self.data, self.cls = values.bits.ravel(), "BFloat16Storage"
        else:
            self.data = np.ascontiguousarray(values).ravel()
            self.cls = STORAGE_CLASSES[self.data.dtype]


class Tensor:
    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(sys.modules["torch"], obj.cls), obj.key, "cpu", obj.data.size)
        return None


def torch_state_dict(tensors: dict, transposed=(), tied=None) -> tuple[dict, list[Storage]]:
    """{name: Tensor} as torch.save sees a state dict: the 1-D float32 tensors share one storage at
    offsets; names in `transposed` are strided views of their transpose's storage; tied = (name,
    other): `name` is a view of `other`'s storage, as tied weights are."""
    storages, state = [], collections.OrderedDict()
    vectors = [n for n, v in tensors.items() if not isinstance(v, BF16) and np.asarray(v).ndim == 1
               and np.asarray(v).dtype == np.float32]
    if vectors:
        shared = Storage("shared", np.concatenate([tensors[n] for n in vectors]))
        storages.append(shared)
        offset = 0
        for n in vectors:
            state[n] = Tensor(shared, offset, tensors[n].shape, (1,))
            offset += tensors[n].size
    for n, v in tensors.items():
        if n in state or (tied and n == tied[0]):
            continue
        values = v.values if isinstance(v, BF16) else np.asarray(v)
        if n in transposed:
            s = Storage(str(len(storages)), np.ascontiguousarray(values.T))
            state[n] = Tensor(s, 0, values.shape, (1, values.shape[0]))
        else:
            s = Storage(str(len(storages)), v)
            state[n] = Tensor(s, 0, values.shape, tuple(int(np.prod(values.shape[k + 1:])) for k in range(values.ndim)))
        storages.append(s)
    if tied:
        state[tied[0]] = state[tied[1]]
    return dict((n, state[n]) for n in tensors), storages


def write_torch_bin(path, tensors: dict, transposed=(), tied=None, byteorder: str = "little", pickled=None) -> str:
    """A torch.save zip archive of the state dict (or of the raw `pickled` bytes, for bad pickles)."""
    state, storages = torch_state_dict(tensors, transposed, tied)
    if pickled is None:
        import io
        buffer = io.BytesIO()
        with stand_in_torch():
            TorchPickler(buffer, protocol=2).dump(collections.OrderedDict(state))
        pickled = buffer.getvalue()
    order = "<" if byteorder == "little" else ">"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("pytorch_model/data.pkl", pickled)
        z.writestr("pytorch_model/byteorder", byteorder)
        for s in storages:
            z.writestr(f"pytorch_model/data/{s.key}", s.data.astype(s.data.dtype.newbyteorder(order)).tobytes())
        z.writestr("pytorch_model/version", "3\n")
    return str(path)


# ---------------------------------------------------------------------------------------- folders

def write_json(path, value) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def make_folder(folder, tensors=None, config=None, weights: str = "safetensors", vocab=VOCAB,
                tokenizer_config=None, **torch_options) -> str:
    """A save_pretrained-style folder: config.json, the weights, vocab.txt, tokenizer_config.json."""
    os.makedirs(folder, exist_ok=True)
    tensors = bert_tensors() if tensors is None else tensors
    write_json(os.path.join(folder, "config.json"), bert_config() if config is None else config)
    if weights == "safetensors":
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    else:
        write_torch_bin(os.path.join(folder, "pytorch_model.bin"), tensors, **torch_options)
    if vocab is not None:
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in vocab))
    if tokenizer_config is not None:
        write_json(os.path.join(folder, "tokenizer_config.json"), tokenizer_config)
    return str(folder)


def make_sentence_folder(folder, pooling_modes=("pooling_mode_mean_tokens",), normalize: bool = True,
                         max_seq_length: int | None = 8, **options) -> str:
    """A sentence-transformers folder: the model at the root, 1_Pooling, optionally 2_Normalize."""
    make_folder(folder, tensors=bert_tensors(prefix="", mlm=False), config=bert_config(architectures=["BertModel"]),
                **options)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    write_json(os.path.join(folder, "modules.json"), modules)
    modes = {k: k in pooling_modes for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                               "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")}
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {"word_embedding_dimension": H, **modes})
    write_json(os.path.join(folder, "sentence_bert_config.json"),
               {"max_seq_length": max_seq_length, "do_lower_case": False})
    return str(folder)
