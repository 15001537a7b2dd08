"""Fingerprint checks across releases: a run whose folders an older release wrote resumes when the
recipe fields added since hold the value that does what that release did, keeping its digests
(the ones its downstream stages recorded); another value is refused in one line naming the field.
No Ray: `workflow.prepare` only reads the folders.

`data/fingerprints-be3ebb9.json` holds the demo recipe and the `_fingerprint.json` of each of its
stages as the release at be3ebb9 wrote them. If `test_a_run_of_the_previous_release_resumes`
fails, a recipe field was added or a default changed: declare an added field in its section's
`added_fields` when its default does what older releases did; otherwise old runs are refused on
purpose, and the file is written again from this release (see `_write_release_file`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config.models import DVAESection, TrainConfig
from pipeline.config.recipe import Recipe, build_recipe
from pipeline.engine.ledger import Fingerprint
from pipeline.errors import FingerprintMismatch
from pipeline.workflow import STAGES, build_stages, fingerprints, prepare

RELEASE = json.loads((Path(__file__).parent / "data" / "fingerprints-be3ebb9.json").read_text())
# The fields 842c279, b0e93b5 and 7d330f3 added, by stage: the releases before them had none.
ADDED_SINCE = {
    "ingest": ["max_pixels", "max_bytes", "allow_private_addresses", "allow_networks"],
    "dvae": ["gumbel_noise_end"],
    "train": ["train.null_caption_prob"],
}
OLD_RECIPE = ("dvae.gumbel_noise_end", "transformer.train.null_caption_prob")


# What the be3ebb9 demo recipe's partial trainer blocks took from the generic trainer defaults and
# a partial block now takes from its section's own (`Config._over_section_defaults`): a user of such
# a recipe states them once, or the stage is refused in one line naming the field.
RESTATED = {"clip": {"betas": [0.9, 0.999]}, "transformer": {"betas": [0.9, 0.999], "grad_clip": None}}


def _recipe(out: Path, drop: tuple[str, ...] = (), restate: bool = True) -> Recipe:
    data = json.loads(json.dumps(RELEASE["recipe"]))
    for section, values in RESTATED.items() if restate else ():
        data[section]["train"].update(values)
    for path in drop:
        *parents, name = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[name]
    return build_recipe({**data, "output_dir": str(out)})


def _digest(stored: dict) -> str:
    return Fingerprint(stored["stage"], stored["config"], stored["inputs"]).digest


def _write(out: Path, stored: dict[str, dict]) -> None:
    for name, body in stored.items():
        storage.write_json(str(out / name / "_fingerprint.json"), body)


def _older_release(stored: dict[str, dict], dropped: dict[str, list[str]]) -> dict[str, dict]:
    """`stored` as a release without the `dropped` config fields wrote it: the fields left out
    and every upstream digest the one that release gave its upstream stage."""
    older: dict[str, dict] = {}
    for name in STAGES:
        body = json.loads(json.dumps(stored[name]))
        for path in dropped.get(name, []):
            *parents, field = path.split(".")
            node = body["config"]
            for part in parents:
                node = node[part]
            del node[field]
        body["inputs"]["upstream"] = {u: _digest(older[u]) for u in body["inputs"]["upstream"]}
        older[name] = body
    return older


def _write_release_file(path: Path, recipe_data: dict, release: str) -> None:
    """Writes `path` from this release (run it by hand, never from a test)."""
    fps = fingerprints(build_stages(build_recipe({**recipe_data, "output_dir": "/tmp/unused"})))
    body = {"written_by": release, "recipe": recipe_data, "fingerprints": {n: f.as_dict() for n, f in fps.items()}}
    path.write_text(json.dumps(body, sort_keys=True, indent=1) + "\n")


def test_a_run_of_the_previous_release_resumes(tmp_path):
    stored = RELEASE["fingerprints"]
    _write(tmp_path, stored)
    _, fps, _ = prepare(_recipe(tmp_path))
    assert sorted(fps) == sorted(stored)
    assert {n: fp.digest for n, fp in fps.items()} == {n: _digest(body) for n, body in stored.items()}


def test_a_partial_trainer_block_that_meant_the_generic_defaults_is_refused_in_one_line(tmp_path):
    _write(tmp_path, RELEASE["fingerprints"])
    with pytest.raises(FingerprintMismatch) as info:
        prepare(_recipe(tmp_path, restate=False))
    assert str(info.value).count("\n") == 0
    assert "stage 'clip'" in str(info.value) and "config.train.betas: [0.9, 0.999] -> [0.9, 0.98]" in str(info.value)


def test_a_run_written_before_fields_existed_resumes_with_its_digests(tmp_path):
    """A release without gumbel_noise_end, null_caption_prob and the ingest limits wrote these
    folders (their recipe could not set the two the demo sets); this one resumes them."""
    older = _older_release(RELEASE["fingerprints"], ADDED_SINCE)
    _write(tmp_path, older)
    before = {n: (tmp_path / n / "_fingerprint.json").read_bytes() for n in older}
    stages, fps, _ = prepare(_recipe(tmp_path, drop=OLD_RECIPE))
    assert {n: fp.digest for n, fp in fps.items()} == {n: _digest(body) for n, body in older.items()}
    assert fps["encode"].inputs["upstream"]["dvae"] == _digest(older["dvae"])
    for stage in stages:  # what `workflow.run` does next: the folders keep what they hold
        assert stage.ledger.claim(fps[stage.name], stage.name).digest == fps[stage.name].digest
    assert {n: (tmp_path / n / "_fingerprint.json").read_bytes() for n in older} == before

    with pytest.raises(FingerprintMismatch) as info:  # the demo's own value is not that release's
        prepare(_recipe(tmp_path, drop=OLD_RECIPE[1:]))
    assert str(info.value).count("\n") == 0
    assert "stage 'dvae'" in str(info.value) and "config.gumbel_noise_end: 1.0 -> 0.0" in str(info.value)


class _Train(TrainConfig):
    added_fields = {"warmup_shape": "linear"}
    warmup_shape: str = "linear"
    """A field added later, inside a nested section."""


class _DVAE(DVAESection):
    added_fields = {"knob": 0}
    knob: int = 0
    """A field added later, at a default that does what the releases without it did."""


class _DVAENewDefault(_DVAE):
    knob: int = 5
    """The same field in a later release whose default does something else."""


class _DVAEUndeclared(DVAESection):
    knob: int = 0
    """A field added later and not declared."""


def _upgraded(recipe: Recipe, dvae: type[DVAESection], **values) -> Recipe:
    """`recipe` as a release whose dvae section is `dvae` (with `values`) reads it."""
    fields = {**recipe.dvae.model_dump(), **values}
    fields["train"] = _Train(**fields["train"])
    return recipe.model_copy(update={"dvae": dvae(**fields)})


def test_a_field_added_at_its_old_value_keeps_every_digest(tmp_path):
    """An older release (no `knob`, no `train.warmup_shape`) claims every folder; a release with
    both at the declared values resumes it: every stage's and downstream digest is unchanged."""
    old_recipe = _recipe(tmp_path)
    _, old, _ = prepare(old_recipe)
    for stage in build_stages(old_recipe):
        stage.ledger.claim(old[stage.name], stage.name)

    new = _upgraded(old_recipe, _DVAE)
    assert new.dvae.fingerprinted()["knob"] == 0 and new.dvae.fingerprinted()["train"]["warmup_shape"] == "linear"
    assert new.dvae.added_paths() == {"gumbel_noise_end": 1.0, "knob": 0, "train.warmup_shape": "linear"}
    _, fps, _ = prepare(new)
    assert {n: fp.digest for n, fp in fps.items()} == {n: fp.digest for n, fp in old.items()}

    for bad, change in [
        (_upgraded(old_recipe, _DVAE, knob=3), "config.knob: 0 -> 3"),
        (_upgraded(old_recipe, _DVAENewDefault), "config.knob: 0 -> 5"),  # a default changed later
        (_upgraded(old_recipe, _DVAEUndeclared), "config.knob: None -> 0"),  # not declared: refused
    ]:
        with pytest.raises(FingerprintMismatch) as info:
            prepare(bad)
        assert str(info.value).count("\n") == 0 and "stage 'dvae'" in str(info.value), str(info.value)
        assert change in str(info.value) and "--force dvae" in str(info.value)
    _, forced, _ = prepare(_upgraded(old_recipe, _DVAE, knob=3), force=["dvae"])
    assert forced["dvae"].digest != old["dvae"].digest and forced["train"].digest != old["train"].digest


def test_the_driver_loads_no_torch_until_a_model_stage_runs(tmp_path):
    """Every stage's module is imported to plan a run or show its status; none loads torch (1.3 s
    of every `dalle status` and data-only `dalle run` here), which the model stages' workers and
    their scoring import when they run."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipeline.config.recipe import load_recipe\n"
        "from pipeline import workflow\n"
        f"recipe = load_recipe('jobs/demo.yaml', ['output_dir={tmp_path / 'out'}'])\n"
        "stages = workflow.build_stages(recipe)\n"
        "workflow.status(recipe)\n"
        "print(sorted(s.name for s in stages), 'torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, loaded = done.stdout.rsplit(" ", 1)
    assert "'train'" in names and "'encode'" in names and "'evaluate'" in names
    assert loaded.strip() == "False"
