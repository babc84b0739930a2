"""Preprocessing and training ingest: raw corpora -> cleaned, deduplicated, tokenized, packed Parquet.

One job per module: `sources` (find and read inputs, classify bad input), `clean` (Unicode
normalization), `filters` (quality filters), `minhash` (signatures, LSH), `dedup` (keys and the
one-process reference decision), `dedup_cluster` (the same decision as Ray Data shuffles), `split`
(train/val by document hash, source weights), `tally` (per-file counts after dedup), `tokenizer`
(byte-level BPE), `pack` (tokenize + pack into fixed-length sequences), `tokenize_phase` (the
tokenizer actor pool), `permute` (the seeded train shuffle), `shards` (the output Parquet shards,
written by Ray tasks), `manifest` (versions, fingerprints, the manifest), `pipeline` (the Ray Data
plan), `ingest` (what training reads).
"""
