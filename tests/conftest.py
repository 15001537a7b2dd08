"""Shared fixtures: one run of the small recipe through encode, reused by every module that
tests a stage downstream of it (the model stages, the train stage, the fault matrix), and one
uninterrupted training on it. Each is made once per `pytest` call, however many xdist workers
run the suite (`make test` runs two): the first worker to ask makes it, the others wait for it.

Under xdist, each test is handed to whichever worker is free, except that the tests of a module in
`ONE_WORKER` (its module fixtures make a run or start a cluster) go to one worker together, so the
fixture is made once too; the heaviest modules are handed out first, so that no worker is left
alone with one at the end (tests/README.md has the figures)."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from helpers import TINY, UPSTREAM, free_port, merge_dicts, recipe_at, run_until, small_recipe


def once(tmp_path_factory, name: str, make):
    """`make(folder)` (a JSON-able result) once per pytest call: in a folder every xdist worker
    sees, under a lock; a worker that finds it made returns the result it recorded."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders are siblings
    folder, record = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if record.exists():
            return json.loads(record.read_text())
        shutil.rmtree(folder, ignore_errors=True)  # a worker that failed to make it
        folder.mkdir()
        result = make(folder)
        record.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One uninterrupted run through encode: (output dir, recipe path)."""

    def make(tmp: Path):
        recipe = small_recipe(tmp / "recipe.yaml", tmp / "out", port=free_port())
        data = merge_dicts(yaml.safe_load(recipe.read_text()), TINY)
        recipe.write_text(yaml.safe_dump(data))
        run_until(recipe, "encode")
        return [str(tmp / "out"), str(recipe)]

    out, recipe = once(tmp_path_factory, "models", make)
    return Path(out), Path(recipe)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, run):
    """An uninterrupted ZeRO-2 training of 40 updates on `run` (2 workers x 8 samples, checkpoints
    every 10): what the resume tests and the fault matrix compare with."""

    def make(tmp: Path):
        recipe, out = recipe_at(tmp, run, UPSTREAM)
        run_until(recipe, "train")
        return str(out)

    return Path(once(tmp_path_factory, "train-ref", make))


# Modules whose module fixtures make a run or start a cluster: each runs on one xdist worker.
ONE_WORKER = {
    "test_jobs.py": "a Ray head, the reduced demo submitted to it",
    "test_s3.py": "a moto server, the shared run made again on it with a SIGKILL",
    "test_gpu_suite.py": "the GPU suite's tiny run",
    "test_report.py": "sample and evaluate after the shared runs",
    "test_pipeline.py": "a run through filter",
    "test_stage_runs.py": "a run with W&B on",
    "test_train_loop.py": "two spawned ranks' runs",
    "test_gpu_autoscaling.py": "an autoscaling Ray cluster",
    "test_train_stage.py": "a training interrupted twice (a worker killed, then the whole run)",
}
# Handed out first, heaviest first: the modules above, and the slowest tests' modules. The jobs
# module makes `run` first; the GPU suite, which does not need it, keeps the other worker busy meanwhile.
FIRST = ("test_jobs.py", "test_gpu_suite.py", "test_s3.py", "test_faults.py", "test_report.py", "test_train_stage.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(FIRST)))


@pytest.hookimpl(optionalhook=True)  # known only while xdist is loaded (not with `-p no:xdist`)
def pytest_xdist_make_scheduler(config, log):
    """xdist's `load` scheduling, with each `ONE_WORKER` module as one unit of work. (pytest 9.2
    ignores the node ids that xdist's own `loadgroup` rewrites, so it cannot group them.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if Path(module).name in ONE_WORKER else nodeid

    return ModulesTogether(config, log)


def pytest_terminal_summary(terminalreporter):
    """After `--durations`: each test file's time, set-up and tear-down included (a session fixture
    counts to the file that first asks for it), the 15 slowest, and their sum (tests/README.md)."""
    files: collections.Counter = collections.Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                files[report.nodeid.split("::")[0]] += report.duration
    if not files:
        return
    terminalreporter.write_sep("=", "slowest 15 files (set-up and tear-down included)")
    for name, seconds in files.most_common(15):
        terminalreporter.write_line(f"{seconds:8.1f}s {name}")
    terminalreporter.write_line(f"{sum(files.values()):8.1f}s in all, {len(files)} files")
