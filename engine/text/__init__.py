"""Text: the WordPiece preprocessor of bert_en_uncased_preprocess/3 (preprocess.py, with its Unicode
tables), and the real-text corpus the tests and benchmarks use (corpus.py). Imports weights.vocab only."""
