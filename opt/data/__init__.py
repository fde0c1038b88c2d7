"""Data preparation: read sources, clean, deduplicate, tokenize, pack, and write a dataset manifest."""
