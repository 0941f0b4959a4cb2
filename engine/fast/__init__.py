"""The fast CPU path (forward.py): the core's model rearranged for speed on NumPy, held to the
readable path by tests. Imports engine.core only."""
