"""Tools built on the engine: parity figures, trace files, trace comparison, streaming encode,
progress lines. Import the engine (core, fast, gpu, text) and weights; never TensorFlow."""
