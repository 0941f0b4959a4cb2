"""The fast CPU path: forward.py (the model's forward rearranged for speed on NumPy, held to the
readable path by tests), tape_kernels.py (the tape's fused kernels), elementwise.py (the
element-wise stages, fused or NumPy, over the threads), fused.py and gemm.py (Numba element-wise
kernels and packed-weight products), adamw.py (the optimizer's fused step) and threads.py (the
thread pool and OpenBLAS's thread count). Imports engine.core only."""
