"""The public entry points: `engine.load` and `engine.Encoder`, the readable model of engine.core
with the fast CPU path (engine.fast) or the fused GPU path (engine.gpu) attached when asked for.

This module is the one place that picks a path, so that engine.core never imports the faster paths
built on top of it.
"""

from __future__ import annotations

from engine.core import backend as backend_mod
from engine.core import model
from weights.format import ModelConfig


class Encoder(model.Encoder):
    """engine.core.model.Encoder, plus the faster forward paths:

    fast=True: the NumPy fast path of engine/fast/forward.py (fused products, in place, and
    enc(inputs, skip_padding=True)); enc.tape / enc.vjp then run the fused element-wise and threaded
    attention kernels of engine/fast/tape_kernels.py (the readable ones without Numba). backend "cupy", float32: the fused GPU path of
    engine/gpu/forward.py unless gpu_path="plain" ($TALKHEADS_GPU_PATH); precision float32 | tf32 |
    float16 | bfloat16 ($TALKHEADS_GPU_PRECISION); cuda_graphs opt-in ($TALKHEADS_CUDA_GRAPHS=1).
    Traced calls (enc.trace, record=...) always run the readable path.
    """

    def __init__(self, config: ModelConfig, tensors: dict, *, backend: str | None = None,
                 dtype: str = "float32", vocab=None, fast: bool = False,
                 gpu_path: str | None = None, precision: str | None = None, cuda_graphs: bool | None = None):
        _check_fast(fast, backend)
        super().__init__(config, tensors, backend=backend, dtype=dtype, vocab=vocab)
        if fast:
            self._attach_fast_path()
        elif self.backend == "cupy" and self.dtype == "float32":
            from engine.gpu import forward as gpu
            if gpu.use_fused_path(gpu_path):
                self.fast_forward = gpu.GpuForward(self, precision=precision, cuda_graphs=cuda_graphs)

    def _attach_fast_path(self):
        from engine.fast import tape_kernels
        from engine.fast.forward import FastEncoder
        self.fast_forward = FastEncoder(self)
        self.tape_kernels = tape_kernels.for_encoder(self)   # enc.tape / enc.vjp: the fused set


def _check_fast(fast, backend):
    if fast and backend_mod.resolve_name(backend) != "numpy":
        raise ValueError("fast=True is the NumPy CPU path: use backend='numpy' (the cupy backend "
                         "has its own fused path)")


def load(path: str, backend: str | None = None, dtype: str = "float32", verify_checksums: bool = False,
         fast: bool = False, **gpu_options) -> Encoder:
    """Loads an extracted HDF5 weights file (see weights/format.py) into an Encoder.

    backend: "numpy" or "cupy" (default: $TALKHEADS_BACKEND, else numpy). dtype: "float32" or "float64".
    fast: the NumPy fast path (engine/fast/forward.py), which also allows enc(inputs, skip_padding=True).
    gpu_options (backend "cupy"): gpu_path="fused"|"plain", precision="float32"|"tf32"|"float16"|"bfloat16",
    cuda_graphs=True|False; see engine/gpu/forward.py.
    """
    import weights
    _check_fast(fast, backend)
    loaded = weights.load(path, verify_checksums=verify_checksums)
    enc = Encoder(loaded.config, loaded.tensors, backend=backend, dtype=dtype, vocab=loaded.vocab, **gpu_options)
    if fast:
        # the file's arrays are now the model's alone, so the fast layout frees each block's originals
        # as it replaces them: loading holds one copy of the weights (plus the packed copy of
        # engine/fast/gemm.py the fast path keeps), not one more
        del loaded
        enc._attach_fast_path()
    return enc
