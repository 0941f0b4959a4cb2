"""Weights: the HDF5 format, its loader (h5py + NumPy), extraction from a SavedModel, reference models.

`load`, `LoadedWeights` and `WeightsFileError` never import TensorFlow; `weights.extract` and
`weights.reference` do (import them explicitly).
"""

from weights.load import LoadedWeights, WeightsFileError, load

__all__ = ["load", "LoadedWeights", "WeightsFileError"]
