"""The embedded demo: a synthetic instruction task, its judge, and a tiny SFT model built from it."""
