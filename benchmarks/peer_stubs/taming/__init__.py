"""Stand-in for taming-transformers (see benchmarks/peer_stubs/README.md)."""
