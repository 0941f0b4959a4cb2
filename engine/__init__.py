"""Reference engine for BERT with Talking-Heads Attention and Gated GELU (talkheads_ggelu_bert_en_base/2).

    import engine
    enc = engine.load("model.h5")                       # backend="numpy" | "cupy", dtype="float32" | "float64"
    out = enc({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types})
    logits = enc.mlm({**inputs, "masked_lm_positions": positions})["mlm_logits"]
    vectors = engine.read_embeddings("out/")           # what `encode --cluster` wrote, memory-mapped

NumPy and h5py only; CuPy when asked for; never TensorFlow.
"""

from engine.core.backend import BackendError, to_numpy
from engine.core.inputs import InputError
from engine.api import Encoder, load
from engine.embeddings import Embeddings, EmbeddingsError, read_embeddings
from engine.text.preprocess import Preprocessor

__all__ = ["load", "Encoder", "Preprocessor", "to_numpy", "InputError", "BackendError", "read_embeddings",
           "Embeddings", "EmbeddingsError"]
