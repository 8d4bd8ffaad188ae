"""Stage-neutral data: resumable corpus readers, records, tokenizers, packing, loaders."""
