"""The core a reader studies: backend (NumPy or CuPy as `xp`) <- inputs, kernels <- model, trace.

Imports only `weights` (h5py-free parts: the config and shapes) and itself. Nothing here knows of
the fast CPU path, the GPU path, the tools or TensorFlow.
"""
