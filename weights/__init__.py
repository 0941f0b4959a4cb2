"""Weights I/O with h5py and NumPy only: the HDF5 format and its one table of dataset names and
shapes (format.py), its loader (load.py), its atomic writer (write.py), the SavedModel's variable
names matched to the format (tf_names.py), the WordPiece vocab reader (vocab.py), the ONNX export
(export_onnx.py), and the Hugging Face import (hf_import.py: a BERT folder to one file; hf_names.py:
its tensor names; safetensors_file.py and torch_checkpoint.py: the two weight files, read without
torch). The bottom of the import graph: imports nothing of engine.

Reading a SavedModel (engine/tf/extract.py) and the reference models import TensorFlow and live in engine/tf/.
"""

from weights.load import LoadedWeights, WeightsFileError, load

__all__ = ["load", "LoadedWeights", "WeightsFileError"]
