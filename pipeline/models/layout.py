"""The names of the files a trained transformer folder holds besides its weight shards (no
torch: the driver checks folders with them)."""

INDEX = "model.safetensors.index.json"
"""The safetensors index naming every shard of the weights."""
MODELS_FILE = "models.json"
"""Beside a trained transformer: the URLs of the dVAE, CLIP and tokenizer it was trained with."""
