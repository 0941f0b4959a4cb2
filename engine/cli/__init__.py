"""The command line, `python -m engine` (main.py): the top of the import graph; it may import any
folder, engine.tf only lazily inside the commands that need TensorFlow."""
