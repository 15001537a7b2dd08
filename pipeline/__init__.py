"""DALL·E training pipeline: ingest → filter → tokenize → dVAE/CLIP → encode → train → sample, on Ray."""

__version__ = "0.1.0"
