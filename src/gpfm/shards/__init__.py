"""Sharded tile store for pretraining at scale: pack tiles into WebDataset tar shards, stream them back.

Why WebDataset: its shards are plain POSIX tar files (inspectable with `tar tvf`, copyable with any tool, no
database or index server), read strictly sequentially (the access pattern object stores and network filesystems
are fast at), and its `gopen` opens local paths, http(s), `pipe:` commands (`pipe:aws s3 cp s3://b/x.tar -`) and
other object-store schemes the same way. litdata is capable too, but ties its format to its own optimiser and
chunk index; a tar shard outlives any one library.

- `pack.py`     coords + slides (or image folders) -> `shard-NNNNNN.tar` + per-shard JSON + `manifest.json`
- `manifest.py` the plan (global tile order), the manifest, and their validation
- `stream.py`   `ShardStream`: an IterableDataset over shards, disjoint per rank and worker, resumable
"""
