"""The fault matrix (`tests/faults.py`, `make faults`): every scenario ends in one clear line (or
runs through, for the hostile list and a foreign local Ray), and after the cause is removed a
rerun gives the uninterrupted run's shards: 0 samples lost, duplicated, different or half-written.
"""

from __future__ import annotations

import re

import pytest
from faults import SCENARIOS, Reference, run_scenario

pytestmark = pytest.mark.slow

MESSAGES = {
    "disk_full": (1, r"^dalle: no space left on device.*: free some space; rerun the same command to resume$"),
    "object_store_killed": (
        1,
        r"^dalle: the object store does not answer \(.*127\.0\.0\.1.*\); rerun the same command",
    ),
    "url_list_changed": (2, r"^dalle: error: stage 'ingest': .* different recipe or input .*list\.csv.*--force ingest"),
    "hostile_url_list": (0, r"^ingest: 48 in, 30 out \(.*too_many_pixels 2, too_slow 2, unsupported_format 2\)"),
    "ray_head_running_then_stale": (0, r"^ingest: \d+ in, \d+ out"),
    "secrets_in_files": (0, r"^filter: \d+ in, \d+ out"),
    # the warning when the kill landed inside the save (the newest checkpoint half-written), else
    # the summary: a kill a moment after the save resumes from it
    "checkpoint_sigkill": (0, r"WARNING .*skipping incomplete checkpoint .*checkpoint_00000020|^train: 640 in"),
    "damaged_encoded_shards": (
        1,
        r"^dalle: stage 'train': training failed: rank \d: DamagedShard: .*encode/0000[02]\.tar: .*"
        r"`dalle validate .*encode --drop-damaged`, then rerun",
    ),
}
TRAINING = {"checkpoint_sigkill", "damaged_encoded_shards"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return Reference(tmp_path_factory.mktemp("faults-reference"))


def test_every_scenario_has_its_expected_message():
    assert set(MESSAGES) == set(SCENARIOS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(name, tmp_path, reference, request):
    if name in TRAINING:  # the runs the train-stage tests share, made once per session
        reference.use(encoded=request.getfixturevalue("run"), trained=request.getfixturevalue("trained"))
    row = run_scenario(name, tmp_path, reference)
    if row.skipped:
        pytest.skip(row.skipped)
    exit_code, message = MESSAGES[name]
    assert row.exit_code == exit_code, row
    assert re.search(message, row.message), row.message
    assert not row.traceback, row
    assert row.rerun_exit_code == 0, row
    assert (row.lost, row.duplicated, row.different, row.half_written) == (0, 0, 0, 0), row
    assert row.samples > 0, row
    if name == "hostile_url_list":
        assert row.extra["counts"] == row.extra["expected"]
        assert row.samples == row.extra["good"] and not row.extra["server_saw_secret"]
    if name == "object_store_killed":
        assert row.extra["killed_after_first_commit"]
    if name == "ray_head_running_then_stale":
        assert row.extra["running_head_exit_code"] == 0 and not row.extra["attached"]
        with_address = row.extra["with_address"]
        assert with_address["exit_code"] == 0 and not with_address["traceback"], with_address
        assert re.fullmatch(
            r"dalle: attached to the Ray cluster at 127\.0\.0\.1:\d+ \(1 nodes\)", with_address["message"]
        )
    if name == "checkpoint_sigkill":
        assert row.extra["step_at_kill"] < 30, row  # killed during the save of checkpoint 20
        assert ("skipping incomplete" in row.message) == row.extra["newest_half_written"], row
    if name == "damaged_encoded_shards":
        assert row.extra["validate"].startswith("dropped 2 damaged shards") and row.extra["validate_exit_code"] == 0
        assert row.extra["attempts"] == 1  # not max_failures restarts into the same damaged shard
    if name == "secrets_in_files":
        assert row.extra["files_with_a_secret"] == [] and row.extra["ray_logs_with_a_secret"] == []
        assert row.extra["ray_sessions"] == 1  # the run's own Ray logs were searched
        assert row.extra["wandb_runs"] > 0  # W&B wrote its offline files, and none holds a secret
