"""The models, independent of the recipe: transformer, attention masks, dVAE, CLIP, BPE, sampling."""
