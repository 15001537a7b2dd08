"""Run tracking: W&B (offline unless the user configured a project) plus a local `metrics.jsonl`.
`WANDB_MODE=disabled` (W&B's own switch) keeps only the jsonl, and then W&B need not be installed
(the GPU machine's suite runs the train loop so).

The W&B run id is chosen once and kept in the training checkpoint, so a resumed run (after a
crash, a worker restart or a rerun of `dalle run`) continues the same W&B run and curve. The
jsonl copy is what `dalle status`, reports and dashboards read without W&B.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import string
import tempfile
import time
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import one_line

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Tracker:
    """Logs metrics and images of one run (call it on rank 0 only)."""

    def __init__(
        self,
        folder: str,
        *,
        run_id: str,
        name: str,
        project: str | None,
        config: dict[str, Any],
        group: str | None = None,
    ):
        self.folder = folder
        self.metrics_url = storage.join(folder, "metrics.jsonl")
        self._lines: list[str] = []
        self._staging = None
        self.run = None
        if os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # W&B keeps its files on a local disk: under the stage folder when that is local, else in
        # a temporary folder copied to `<folder>/wandb/` at each flush (for `wandb sync` later)
        self._staging = None if storage.is_local(folder) else tempfile.mkdtemp(prefix="wandb-")
        wandb_dir = self._staging or folder
        storage.makedirs(wandb_dir)
        try:
            self.run = wandb.init(
                project=project or "dalle-pipeline",
                # no project: offline for this run only (a later run of the same process may have one)
                mode="offline" if project is None else None,
                id=run_id,
                name=name,
                group=group,
                resume="allow",
                dir=wandb_dir,
                config=config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        except wandb.errors.UsageError as err:  # e.g. no API key for an online project
            from pipeline.errors import InputError

            raise InputError(
                f"W&B run {name} (project {project}): {one_line(err, typed=False)} (or WANDB_MODE=offline)"
            ) from None
        # where the dashboard finds this run: its W&B page, or the folder `wandb sync` uploads
        storage.write_json(
            storage.join(folder, "tracking.json"),
            {
                "run_id": run_id,
                "name": name,
                "project": self.run.project,
                "mode": "offline" if self.run.offline else "online",
                "url": None if self.run.offline else self.run.url,
                "dir": self._synced_dir(),
            },
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        self._lines.append(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}))

    def log_images(self, images: dict[str, np.ndarray], step: int, caption: str = "") -> None:
        """`images`: name -> uint8 HxWx3 grid."""
        if self.run is None:
            return
        import wandb

        self.run.log({k: wandb.Image(v, caption=caption) for k, v in images.items()}, step=step)

    def log_examples(self, name: str, images: list[tuple[np.ndarray, str]], step: int) -> None:
        """`images`: (uint8 HxWx3, caption) pairs, logged as one captioned panel."""
        if self.run is None:
            return
        import wandb

        self.run.log({name: [wandb.Image(image, caption=caption) for image, caption in images]}, step=step)

    def flush(self) -> None:
        """Appends the buffered metrics to `metrics.jsonl` (called at each checkpoint)."""
        self._upload_wandb()
        if not self._lines:
            return
        old = storage.read_bytes(self.metrics_url).decode() if storage.exists(self.metrics_url) else ""
        storage.write_atomic(self.metrics_url, (old + "\n".join(self._lines) + "\n").encode())
        self._lines = []

    def _synced_dir(self) -> str:
        """The run's W&B folder that `wandb sync` takes (where it ends up under the stage folder)."""
        run_dir = os.path.dirname(self.run.dir)
        if self._staging is None:
            return run_dir
        return storage.join(self.folder, "wandb", os.path.basename(run_dir))

    def _upload_wandb(self) -> None:
        """Copies W&B's files to the stage folder when they are kept in a temporary folder."""
        if self._staging is not None:
            storage.upload_folder(os.path.join(self._staging, "wandb"), storage.join(self.folder, "wandb"))

    def truncate(self, step: int) -> None:
        """Drops metric lines past `step` (logged after the checkpoint a resumed run starts from)."""
        if not storage.exists(self.metrics_url):
            return
        kept = [
            ln for ln in storage.read_bytes(self.metrics_url).decode().splitlines() if json.loads(ln)["step"] <= step
        ]
        storage.write_atomic(self.metrics_url, ("\n".join(kept) + "\n" if kept else "").encode())

    def finish(self) -> None:
        self.flush()
        if self.run is None:
            return
        self.run.finish()
        if self._staging is not None:
            self._upload_wandb()  # the files W&B completed at finish
            shutil.rmtree(self._staging, ignore_errors=True)


def read_metrics(url: str) -> list[dict[str, Any]]:
    """The lines of a `metrics.jsonl` (empty when absent)."""
    if not storage.exists(url):
        return []
    return [json.loads(ln) for ln in storage.read_bytes(url).decode().splitlines() if ln.strip()]
