"""The public entry points: `engine.load` and `engine.Encoder`, the readable model of engine.core
(engine.core.model.Model) with, when asked for, a faster twin of its forward pass: the fast CPU path
(engine.fast, fast=True) or the fused GPU path (engine.gpu, backend "cupy" in float32).

This module is the one place that picks a path: engine.core never imports the faster paths, and
holds no hook for them. A twin is built at load from the model's weights and owns what it derives
from them (packed or re-laid matrices, fused biases, the scaled W_pre); the model's own arrays are
never rebound or re-laid. The settings (engine.core.settings.Settings) are resolved once, here.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from engine.core import backend as backend_mod
from engine.core import model as model_mod
from engine.core.model import Model, named_outputs, output_names
from engine.core.settings import Settings
from weights.format import FAMILY_CHOICES, ModelConfig

POOLINGS = FAMILY_CHOICES["pooling"]
# sentence-transformers' floors: a row of padding alone has no token to average; a zero vector stays zero.
MIN_TOKENS, MIN_NORM = 1e-9, 1e-12

# The BlockWeights fields a fast twin re-lays into its own product matrices: (part, field).
PRODUCT_MATRICES = (("attention", "query_kernel"), ("attention", "key_kernel"), ("attention", "value_kernel"),
                    ("attention", "output_kernel"), ("feedforward", "intermediate_kernel"),
                    ("feedforward", "gate_kernel"), ("feedforward", "output_kernel"))


class Encoder(Model):
    """engine.core.model.Model, plus the choice of its forward path:

    fast=True: the NumPy fast path of engine/fast/forward.py (fused products, in place, and
    enc(inputs, skip_padding=True)); enc.tape / enc.vjp then run the fused element-wise and threaded
    attention kernels of engine/fast/tape_kernels.py on the model's arrays (the readable ones
    without Numba). backend "cupy", float32: the fused GPU path of engine/gpu/forward.py unless
    gpu_path="plain". Traced calls (enc.trace, record=...) always run the readable path.
    settings: an engine.core.settings.Settings, or its fields as keywords (backend=, threads=,
    adapt_threads=, fused=, packed=, blas=, gpu_path=, precision=, cuda_graphs=, malloc_tuning=; None or left
    out: the environment's default), resolved once and kept as enc.settings.

    Gradients and training work on the model's arrays (parameters()); the twin's derived arrays
    follow them through weights_changed() (engine.train's Trainer calls it after every step).

    Memory: a fast encoder holds each block's product matrices once. The fast twin keeps them
    (packed panels, or re-laid for np.matmul), so once it is built the readable copies are let go;
    anything that reads the readable blocks (enc.blocks, parameters(), tape, trace, a readable
    call) restores them from the twin, exactly (packing only moves values), and from then on both
    are held: training a fast encoder holds both, inference one.
    """

    def __init__(self, config: ModelConfig, tensors: dict, *, backend: str | None = None,
                 dtype: str = "float32", vocab=None, fast: bool = False, settings: Settings | None = None,
                 take_tensors: bool = False, **options):
        if settings is not None and (backend is not None or options):
            raise TypeError("Encoder: give either settings or the settings' fields (backend=, ...), not both")
        settings = settings if settings is not None else Settings.resolve(backend=backend, **options)
        _check_fast(fast, settings.backend)
        super().__init__(config, tensors, backend=settings.backend, dtype=dtype, vocab=vocab)
        if take_tensors:    # the caller's dict let go: the model's arrays are then its only references
            tensors.clear()
        self.settings = settings
        self.fast = fast
        self._hold_both = False     # True once the readable matrices were asked for after a release
        self._twin, self._twin_stale = self._build_twin(), False

    # -------------------------------------------------------------------------------- the blocks

    @property
    def blocks(self):
        """The readable model's BlockWeights (engine.core.model), restored from the fast twin first
        when they were let go (see the class docstring)."""
        if getattr(self, "_released", False):
            self._restore_readable_matrices()
        return self._blocks

    @blocks.setter
    def blocks(self, value):
        self._blocks, self._released = value, False

    def _release_block(self, i: int) -> None:
        """Drops the readable copies of block i's product matrices, which its fast twin now holds."""
        for part, field in PRODUCT_MATRICES:
            setattr(getattr(self._blocks[i], part), field, None)

    def block_arrays(self, i: int) -> list:
        """Block i's arrays (engine.core.model.block_arrays) without keeping the readable copies:
        when they were let go, a transient copy from the fast twin stands in (for a fingerprint)."""
        if not self._released:
            return super().block_arrays(i)
        block = self._blocks[i]
        parts = {"attention": copy.copy(block.attention), "feedforward": copy.copy(block.feedforward)}
        for (part, field), array in self._twin.blocks[i].readable_matrices(self.config).items():
            setattr(parts[part], field, array)
        return model_mod.block_arrays(dataclasses.replace(block, **parts))

    def _restore_readable_matrices(self) -> None:
        for block, twin_block in zip(self._blocks, self._twin.blocks):
            for (part, field), array in twin_block.readable_matrices(self.config).items():
                setattr(getattr(block, part), field, array)
        self._released, self._hold_both = False, True

    # -------------------------------------------------------------------------------- the path

    @property
    def fast_forward(self):
        """The faster twin that runs enc(inputs): an engine.fast.forward.FastEncoder, an
        engine.gpu.forward.GpuForward, or None (the readable path). Built from the model's current
        weights when they changed since it was built."""
        if self._twin_stale:
            self._twin, self._twin_stale = self._build_twin(), False
        return self._twin

    def _build_twin(self):
        if self.fast:
            from engine.fast.forward import FastEncoder
            if self._hold_both:
                return FastEncoder(self, self.settings)
            twin = FastEncoder(self, self.settings, on_block=self._release_block)
            self._twin, self._released = twin, True
            backend_mod.return_freed_memory()
            return twin
        if self.backend == "cupy" and self.dtype == "float32" and self.settings.gpu_path == "fused":
            from engine.gpu import forward as gpu
            return gpu.GpuForward(self, precision=self.settings.precision, cuda_graphs=self.settings.cuda_graphs)
        return None

    def weights_changed(self) -> None:
        """The arrays of parameters() were changed in place (an optimizer step): the twin, whose
        arrays derive from them, is dropped now and rebuilt from them before its next use."""
        self._twin, self._twin_stale = None, True

    def _encode_by_path(self, ids, mask, types, skip_padding=False, keep="all"):
        """(encoder_outputs, pooled) by the twin when there is one, else by the readable forward.
        keep: "all" block outputs, the "last" one only, or none ("pooled"): the fast twin then skips
        materializing the others."""
        twin = self.fast_forward
        if skip_padding and not getattr(twin, "skips_padding", False):
            raise ValueError("skip_padding=True needs the fast path: engine.load(..., fast=True)")
        if twin is None:
            return self.encode(ids, mask, types)
        return twin.encode(ids, mask, types, skip_padding=skip_padding, keep=keep)

    def __call__(self, inputs, skip_padding=False, outputs=None):
        """Encoder outputs for a dict of input_word_ids, input_mask, input_type_ids ([B,S] ints).
        skip_padding=True (fast path only): padded positions are not computed (zeros); see
        engine/fast/forward.py. outputs: the names to return (default: all four, as the Hub model);
        asking for fewer lets the fast path skip materializing the others, e.g.
        outputs=("pooled_output",) keeps no [B,S,H] array at all."""
        names = output_names(outputs)
        keep = "all" if "encoder_outputs" in names else "last" if "sequence_output" in names else "pooled"
        ids, mask, types, _ = self.device_inputs(inputs, with_positions=False)
        return named_outputs(*self._encode_by_path(ids, mask, types, skip_padding, keep), names)

    def embed(self, inputs, pooling: str | None = None, normalize: bool | None = None, skip_padding=False):
        """Sentence embeddings [B,H] (arrays of the backend): pooling "pooled" (pooled_output),
        "cls" (sequence_output[:, 0]) or "mean" (the mean of sequence_output over the input_mask
        positions: sentence-transformers' mean pooling); normalize divides each row by its L2 norm
        (its Normalize module). None: the file's config (`pooling`, `normalize`). The encoder runs
        as enc(inputs) does; pooling only reads its outputs."""
        pooling = self.config.pooling if pooling is None else pooling
        normalize = self.config.normalize if normalize is None else normalize
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {list(POOLINGS)}")
        if pooling == "pooled":
            rows = self(inputs, skip_padding, outputs=("pooled_output",))["pooled_output"]        # [B,H]
        else:
            seq = self(inputs, skip_padding, outputs=("sequence_output",))["sequence_output"]     # [B,S,H]
            if pooling == "cls":
                rows = seq[:, 0]
            else:
                mask = self.xp.asarray(np.asarray(inputs["input_mask"]), dtype=seq.dtype)[:, :, None]  # [B,S,1]
                rows = (seq * mask).sum(axis=1) / self.xp.maximum(mask.sum(axis=1), MIN_TOKENS)
        if normalize:
            rows = rows / self.xp.maximum(self.xp.linalg.norm(rows, axis=-1, keepdims=True), MIN_NORM)
        return self.xp.ascontiguousarray(rows)

    def mlm(self, inputs, record=None, skip_padding=False):
        """The `.mlm` call: the encoder outputs plus mlm_logits [B,P,V] at masked_lm_positions [B,P].
        With record (the trace), the readable path, every position computed."""
        if record is not None:
            if skip_padding:
                raise ValueError("record=... runs the readable path, which computes every position: "
                                 "skip_padding=True does not apply")
            return super().mlm(inputs, record=record)
        self._check_mlm()
        ids, mask, types, positions = self.device_inputs(inputs, with_positions=True)
        return self.with_mlm_logits(*self._encode_by_path(ids, mask, types, skip_padding), positions)

    def tape(self, inputs, dropout=None, seed: int = 0, dropout_masks: dict | None = None, kernels=None):
        """Model.tape on the model's arrays; on a fast encoder with kernels=None, the fused set of
        engine/fast/tape_kernels.py (the readable one without Numba)."""
        if kernels is None and self.fast:
            from engine.fast import tape_kernels
            kernels = tape_kernels.for_encoder(self)
        if self.settings.malloc_tuning and self.xp is np:
            backend_mod.reuse_freed_memory()   # asked for: big activations reuse freed blocks
        return super().tape(inputs, dropout=dropout, seed=seed, dropout_masks=dropout_masks, kernels=kernels)


def _check_fast(fast, backend):
    if fast and backend != "numpy":
        raise ValueError("fast=True is the NumPy CPU path: use backend='numpy' (the cupy backend "
                         "has its own fused path)")


def load(path: str, backend: str | None = None, dtype: str = "float32", fast: bool = False,
         verify_checksums: bool = False, *, threads: int | None = None, adapt_threads: bool | None = None,
         fused: bool | None = None, packed: bool | None = None, blas: str | None = None, gpu_path: str | None = None,
         precision: str | None = None, cuda_graphs: bool | None = None,
         malloc_tuning: bool | None = None) -> Encoder:
    """Loads an extracted HDF5 weights file (see weights/format.py) into an Encoder.

    backend: "numpy" or "cupy" (default: $TALKHEADS_BACKEND, else numpy). dtype: "float32" or
    "float64". fast: the NumPy fast path (engine/fast/forward.py), which also allows
    enc(inputs, skip_padding=True). The other keywords are engine.core.settings.Settings fields
    (None: the environment's default, else the built-in one): threads, adapt_threads (fewer threads
    for small work), fused (Numba kernels),
    packed (packed-weight products), blas ("pool" | "native") for the fast path; gpu_path
    "fused"|"plain", precision "float32"|"tf32"|"float16"|"bfloat16", cuda_graphs for the cupy
    backend; malloc_tuning (opt-in) for the tape. Resolved once, kept as enc.settings.
    """
    import weights
    settings = Settings.resolve(backend=backend, threads=threads, adapt_threads=adapt_threads, fused=fused,
                                packed=packed, blas=blas,
                                gpu_path=gpu_path, precision=precision, cuda_graphs=cuda_graphs,
                                malloc_tuning=malloc_tuning)
    _check_fast(fast, settings.backend)
    loaded = weights.load(path, verify_checksums=verify_checksums)
    return Encoder(loaded.config, loaded.tensors, dtype=dtype, vocab=loaded.vocab, fast=fast, settings=settings,
                   take_tensors=True)
