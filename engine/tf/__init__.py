"""Everything that imports TensorFlow: extraction of a SavedModel to HDF5, the Model Garden
reference models, TensorFlow's step-by-step trace, and the generator of the Unicode tables.

Only the command line imports this folder (lazily, inside the commands that need it), and the tests,
benchmarks and docs scripts outside the package. No other module of engine/ or weights/ does.
"""
