"""Pretraining: decoder model, tokenizer, streamed corpora and the pretraining task."""
