"""Data: sources, prepare (splits, stats, version), shards (write, verify), loader."""
