"""Shared fixtures: one run of the small recipe through encode, reused by every module that
tests a stage downstream of it (the model stages, the train stage)."""

from __future__ import annotations

import pytest
import yaml
from helpers import TINY, free_port, merge_dicts, run_until, small_recipe


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One uninterrupted run through encode: (output dir, recipe path, recipe data)."""
    tmp = tmp_path_factory.mktemp("models")
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "out", port=free_port())
    data = merge_dicts(yaml.safe_load(recipe.read_text()), TINY)
    recipe.write_text(yaml.safe_dump(data))
    run_until(recipe, "encode")
    return tmp / "out", recipe
