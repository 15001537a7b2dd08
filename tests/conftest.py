"""Shared fixtures: one run of the small recipe through encode, reused by every module that
tests a stage downstream of it (the model stages, the train stage, the fault matrix), and one
uninterrupted training on it."""

from __future__ import annotations

import pytest
import yaml
from helpers import TINY, UPSTREAM, free_port, merge_dicts, recipe_at, run_until, small_recipe


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One uninterrupted run through encode: (output dir, recipe path, recipe data)."""
    tmp = tmp_path_factory.mktemp("models")
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "out", port=free_port())
    data = merge_dicts(yaml.safe_load(recipe.read_text()), TINY)
    recipe.write_text(yaml.safe_dump(data))
    run_until(recipe, "encode")
    return tmp / "out", recipe


@pytest.fixture(scope="session")
def trained(tmp_path_factory, run):
    """An uninterrupted ZeRO-2 training of 40 updates on `run` (2 workers x 8 samples, checkpoints
    every 10): what the resume tests and the fault matrix compare with."""
    recipe, out = recipe_at(tmp_path_factory.mktemp("train-ref"), run, UPSTREAM)
    run_until(recipe, "train")
    return out
