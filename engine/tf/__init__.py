"""Everything that imports TensorFlow: extraction of a SavedModel to HDF5, the Model Garden
reference models, TensorFlow's step-by-step trace, and the generator of the Unicode tables.

Only the command line imports this folder (lazily, inside the commands that need it), and the tests,
benchmarks and docs scripts outside the package. No other module of engine/ or weights/ does.

Importing any module of the folder runs this first: TensorFlow is configured here, once, before it
is imported. Model Garden runs on tf_keras (Keras 2), which TF_USE_LEGACY_KERAS selects; the C++
log level keeps TensorFlow's start-up lines off the console. Both are defaults: a value the caller
set wins.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
