"""Corpora: document sources, the built-in generated corpus, mixing, sharding and packing."""
