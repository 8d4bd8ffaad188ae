"""``python -m pretrain.data.builtin [docs] [dir]``: generate (or reuse) a built-in corpus."""

import sys

from . import BuiltinCorpusConfig, write_builtin_corpus

args = sys.argv[1:]
config = BuiltinCorpusConfig(
    docs=int(args[0]) if args else 20000, **({"dir": args[1]} if len(args) > 1 else {})
)
result = write_builtin_corpus(config)
print(
    f"{result.dir}/: {len(result.files)} shards, {result.docs} documents, "
    f"{result.text_bytes:,} text bytes, {'reused' if result.reused else 'generated'} "
    f"in {result.seconds:.1f}s"
)
