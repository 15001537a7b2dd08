"""What the training loop asks of whoever started its ranks: who it is, and where a finished
checkpoint folder goes.

- `RaySession`: a Ray Train worker. Checkpoints are reported to Ray Train, which registers one
  once every rank has reported it and keeps the newest `keep_checkpoints`.
- `TorchSession`: ranks started by anything else with `torch.distributed` initialised (torchrun,
  `torch.multiprocessing.spawn`, the GPU suite's NCCL group of one). Each rank copies its files
  into the run folder itself; once every rank has, rank 0 deletes the checkpoints past the newest
  `keep`. The loop's code path is the same either way: a checkpoint counts only when every rank's
  file list is complete (`pipeline.train.checkpoint.problem`), whoever copied it.
"""

from __future__ import annotations

import logging
from typing import Protocol

from pipeline import storage

log = logging.getLogger(__name__)


class Session(Protocol):
    rank: int
    world: int

    def report(self, metrics: dict[str, float], folder: str, name: str) -> None:
        """Hands over this rank's part of checkpoint `name` (the files under the local `folder`,
        deleted by the caller afterwards). Collective."""


class RaySession:
    """A Ray Train worker's session."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict[str, float], folder: str, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


class TorchSession:
    """A rank of a plain `torch.distributed` group (or a single process without one) writing
    checkpoints under `run_url` and keeping the newest `keep`."""

    def __init__(self, run_url: str, keep: int) -> None:
        from pipeline.train.collectives import rank, world

        self.run_url, self.keep = run_url, keep
        self.rank, self.world = rank(), world()

    def report(self, metrics: dict[str, float], folder: str, name: str) -> None:
        from pipeline.train.checkpoint import checkpoints
        from pipeline.train.collectives import barrier

        storage.upload_folder(folder, storage.join(self.run_url, name))
        barrier()  # every rank's files are in place before any older checkpoint goes
        if self.rank == 0:
            for old in checkpoints(self.run_url)[self.keep :]:
                log.info("removing checkpoint %s (keeping the newest %d)", old, self.keep)
                storage.remove_tree(storage.join(self.run_url, old))
