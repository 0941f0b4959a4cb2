"""Training: losses, Model Garden's AdamW (optimizer.py), heads, and the loops behind the
finetune / pretrain commands. NumPy (or CuPy) only, no TensorFlow."""
