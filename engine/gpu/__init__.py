"""The GPU path: CUDA kernels with NumPy twins (kernels.py, kernels.cu) and the fused forward
(forward.py). Imports engine.core only; CuPy is imported when a GPU object is built."""
