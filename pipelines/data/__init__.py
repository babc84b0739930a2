"""Preprocessing and training ingest: raw corpora -> cleaned, deduplicated, tokenized, packed Parquet.

One job per module: `sources` (find and read inputs, classify bad input), `clean` (Unicode
normalization), `filters` (quality filters), `minhash` (signatures, LSH), `dedup` (exact and
near-duplicate decisions), `split` (train/val by document hash, source weights), `tokenizer`
(byte-level BPE), `pack` (tokenize + pack into fixed-length sequences), `tokenize_phase` (the
tokenizer actor pool), `shards` (the output Parquet shards), `manifest` (versions, fingerprints,
the manifest), `pipeline` (the Ray Data plan), `ingest` (what training reads).
"""
