"""Trainer plumbing shared by every trained model (dVAE, CLIP, transformer): Ray Train workers,
DeepSpeed engines, schedules, EMA, checkpoints."""
