"""Data: the embedded corpus, tokenizers, and the Lightning data module that packs and batches token blocks."""
