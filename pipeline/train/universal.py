"""Resuming a run on another world size through DeepSpeed's universal checkpoints.

ZeRO 1-3 partitions belong to the world that wrote them. `convert` turns a checkpoint's DeepSpeed
files into DeepSpeed's universal layout (`ds_to_universal`: a folder per parameter holding its
fp32 weights and Adam moments whole), written once beside them as `deepspeed_universal/`, by a
Ray task the driver starts before the workers. Every worker of the new world then loads that
folder (engine built with `checkpoint.load_universal`) and cuts its own partitions; the EMA
shards are re-cut the same way (`pipeline.train.ema.reshard`) and the data position needs no
change (`pipeline.data.loader.BatchLayout`). ZeRO-0 files are whole already and load as they are.

The cost is paid once per change of world size: the conversion reads each rank's files in turn
(one at a time in memory, twice the optimizer states on its disk), and every new rank reads the
whole universal folder and all EMA shards (16 bytes per parameter: ~200 GB at 12B).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from pipeline import storage
from pipeline.train.weights import DEEPSPEED_TAG

log = logging.getLogger(__name__)

UNIVERSAL_TAG = "deepspeed_universal"
DONE = "deepspeed_universal.json"
"""Written beside the folder once it is whole (object stores have no atomic folder rename)."""


def needs_conversion(zero_stage: int) -> bool:
    """Whether a checkpoint of this ZeRO stage must be converted to load on another world size."""
    return zero_stage >= 1


def converted(url: str) -> bool:
    return storage.exists(storage.join(url, DONE))


def convert(url: str) -> None:
    """Writes `<url>/deepspeed_universal/` from `<url>/deepspeed/` unless already there."""
    if converted(url):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the conversion is file shuffling; no GPU needed
    from deepspeed.checkpoint.ds_to_universal import main

    with storage.local_copy(storage.join(url, DEEPSPEED_TAG)) as ds_dir, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, UNIVERSAL_TAG)
        main(
            argparse.Namespace(
                input_folder=ds_dir,
                output_folder=out,
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # our engines carry no `universal_checkpoint_info`; for ZeRO 1/2 DeepSpeed then asks for this
                inject_missing_state=True,
            )
        )
        storage.upload_folder(out, storage.join(url, UNIVERSAL_TAG))
    storage.write_json(storage.join(url, DONE), {"from": DEEPSPEED_TAG})
    log.info("converted %s to a universal checkpoint", url)
