"""Weights I/O with h5py and NumPy only: the HDF5 format (format.py), its loader (load.py), its
atomic writer (write.py) and the WordPiece vocab reader (vocab.py). The bottom of the import graph: imports nothing of engine.

Extraction from a SavedModel and the reference models import TensorFlow and live in engine/tf/.
"""

from weights.load import LoadedWeights, WeightsFileError, load

__all__ = ["load", "LoadedWeights", "WeightsFileError"]
