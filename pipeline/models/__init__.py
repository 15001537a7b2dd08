"""Model definitions: dVAE, CLIP, transformer."""
