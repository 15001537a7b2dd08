"""Where a trained stage keeps its training run, under `<stage>/_train/`."""

from __future__ import annotations

from pipeline import storage


def train_storage(stage_url: str) -> str:
    return storage.join(stage_url, "_train")


def run_storage(stage_url: str) -> str:
    """Ray Train's run folder (its checkpoints) for a stage."""
    return storage.join(train_storage(stage_url), "run")


def progress_url(stage_url: str) -> str:
    """Where rank 0 writes its latest step (read by the driver's progress bar and `dalle status`)."""
    return storage.join(train_storage(stage_url), "progress.json")


def sample_keys_root(stage_url: str) -> str:
    """Where the ranks record the keys they trained on (`train.log_sample_keys`)."""
    return storage.join(train_storage(stage_url), "sample_keys")


def sample_keys_url(stage_url: str, rank: int) -> str:
    """Where rank `rank` records the keys it trained on."""
    return storage.join(sample_keys_root(stage_url), f"rank_{rank:05d}")
