"""The evaluation prompt set (groups, held-out pairs, phrasing) and the accuracy summary."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.evaluate import accuracy, check, flat
from pipeline.synthetic import analyzer
from pipeline.synthetic.captions import canonical
from pipeline.synthetic.dataset import render
from pipeline.synthetic.prompts import GROUPS, Prompt, evaluation_prompts

HELD = (("cyan", "star"), ("green", "triangle"), ("white", "diamond"))
COUNTS = dict(seen_one=30, heldout_one=12, seen_two=10, heldout_two=6, paraphrased=8)


@pytest.fixture(scope="module")
def prompts():
    return evaluation_prompts(HELD, **COUNTS, seed=1)


def pairs(p: Prompt) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in p.objects}


def test_groups_sizes_and_held_out_pairs(prompts):
    by = {g: [p for p in prompts if p.group == g] for g in GROUPS}
    assert [len(by[g]) for g in GROUPS] == [30, 12, 10, 6, 8]
    held = set(HELD)
    for p in by["seen-one"] + by["seen-two"] + by["paraphrased"]:
        assert not pairs(p) & held, p
    for p in by["heldout-one"]:
        assert pairs(p) <= held
    for p in by["heldout-two"]:
        assert len(pairs(p) & held) == 1 and p.relation is not None
    assert len({p.text for p in prompts if p.group != "paraphrased"}) == 58, "no prompt repeats"


def test_phrasing(prompts):
    for p in prompts:
        if p.group == "paraphrased":
            assert p.text != canonical(p.objects, None)
        else:
            assert p.text == canonical(p.objects, p.relation)
            for o in p.objects:
                assert f"{o['size']} {o['colour']} {o['shape']}" in p.text
    assert evaluation_prompts(HELD, **COUNTS, seed=1) == prompts
    assert evaluation_prompts(HELD, **COUNTS, seed=2) != prompts
    assert Prompt.from_dict(prompts[-1].to_dict()) == prompts[-1]


def test_check_reads_a_rendered_prompt_back(prompts):
    import random

    rng = random.Random(0)
    results = []
    for p in prompts:
        image, _ = render(p.objects, 96, rng)
        results.append(check(np.asarray(image), p))
    assert np.mean([r["all"] for r in results]) >= 0.95
    # and a blank canvas is wrong on every count
    blank = check(np.full((64, 64, 3), 30, np.uint8), prompts[0])
    assert not blank["all"] and not blank["count"]


def _record(group, verdicts, kept, scores=None):
    scores = scores or [0.1 * i for i in range(len(verdicts))]
    cands = [{"score": s, "checks": {"colour": v, "all": v}} for s, v in zip(scores, verdicts)]
    return {"prompt": {"group": group}, "kept": kept, "candidates": cands}


def test_accuracy_before_and_after_reranking():
    records = [
        _record("seen-one", [True, False, False, True], kept=[3, 0]),
        _record("seen-one", [False, False, True, False], kept=[2, 1]),
        _record("heldout-one", [False, False], kept=[1]),
    ]
    m = accuracy(records)
    assert list(m) == ["seen-one", "heldout-one", "overall"]
    assert m["seen-one"]["prompts"] == 2
    assert m["seen-one"]["before"]["all"] == 0.375  # 3 of 8 candidates
    assert m["seen-one"]["after"]["all"] == 0.75  # 3 of the 4 kept
    assert m["seen-one"]["before"]["relation"] is None  # no pair prompts: no relation figure
    assert m["heldout-one"]["after"]["colour"] == 0.0
    assert m["overall"]["before"]["all"] == 0.3  # 3 of 10
    assert m["overall"]["after"]["all"] == 0.6  # 3 of 5
    assert m["seen-one"]["clip_score_kept"] == pytest.approx((0.3 + 0.0 + 0.2 + 0.1) / 4)
    keys = flat(m)
    assert keys["seen-one/after/all"] == 0.75 and "seen-one/before/relation" not in keys


def test_analyzer_verdicts_use_the_truth():
    p = Prompt(
        "seen-one",
        "a large red circle on the left",
        ({"colour": "red", "shape": "circle", "size": "large", "position": "left"},),
    )
    import random

    image, _ = render([{**p.objects[0], "colour": "blue"}], 96, random.Random(3))
    verdict = check(np.asarray(image), p)
    assert not verdict["colour"] and verdict["shape"] and verdict["position"] and not verdict["all"]
    assert analyzer.analyze(np.asarray(image))[0].colour == "blue"


def _scene(colour, shape, position="left"):
    return {"colour": colour, "shape": shape, "size": "large", "position": position}


def test_binding_confusion_and_guidance_figures_come_from_the_analyzers_reading():
    """Rendered images read back: a red circle drawn blue, a two-object scene with its colours
    swapped (each shape right, each colour right somewhere, binding wrong), and a blank image."""
    import random

    from pipeline.stages.evaluate import by_objects, confusion, guidance_curve, read_and_check

    rng = random.Random(5)
    one = Prompt("seen-one", "a large red circle on the left", (_scene("red", "circle"),))
    two = Prompt(
        "seen-two",
        "a large red square to the left of a large blue star",
        (_scene("red", "square", "left"), _scene("blue", "star", "right")),
        "to the left of",
    )
    images = {
        "right": render(list(one.objects), 64, rng)[0],
        "blue": render([_scene("blue", "circle")], 64, rng)[0],
        "swapped": render([_scene("blue", "square", "left"), _scene("red", "star", "right")], 64, rng)[0],
        "bound": render(list(two.objects), 64, rng)[0],
    }
    blank = np.full((64, 64, 3), 30, dtype=np.uint8)

    def candidate(image, prompt):
        found, checks = read_and_check(np.asarray(image), prompt)
        return {"score": 0.0, "found": found, "checks": checks}

    records = [
        {"prompt": one.to_dict(), "guidance": 1.0, "kept": [0, 1, 2],
         "candidates": [candidate(images["right"], one), candidate(images["blue"], one), candidate(blank, one)]},
        {"prompt": two.to_dict(), "guidance": 1.0, "kept": [1],
         "candidates": [candidate(images["swapped"], two), candidate(images["bound"], two)]},
    ]  # fmt: skip
    swapped = records[1]["candidates"][0]["checks"]
    assert swapped["shape"] and swapped["count"] and not swapped["binding"] and not swapped["all"]
    assert records[1]["candidates"][1]["checks"]["binding"]

    objects = by_objects(records)
    assert objects["1"] == {"prompts": 1, "before_binding": 0.3333, "after_binding": 0.3333,
                            "before_all": 0.3333, "after_all": 0.3333}  # fmt: skip
    assert objects["2"]["before_binding"] == 0.5 and objects["2"]["after_binding"] == 1.0
    table = confusion(records)
    assert table["colour"] == {"red": {"red": 1, "blue": 1, "none": 1}}
    assert table["shape"] == {"circle": {"circle": 2, "none": 1}}

    sweep = [{**records[0], "guidance": 3.0, "kept": [0]}, {**records[0], "kept": [1]}]
    assert guidance_curve(sweep) == [
        {"guidance": 1.0, "prompts": 1, "before_all": 0.3333, "after_all": 0.0},
        {"guidance": 3.0, "prompts": 1, "before_all": 0.3333, "after_all": 1.0},
    ]


def test_the_guidance_sweep_draws_the_first_one_object_prompts_again_at_each_scale(tmp_path):
    from pipeline.config.recipe import load_recipe
    from pipeline.stages.evaluate import EvaluateStage, recipe_prompts

    overrides = ["evaluate.guidance_sweep=[1.0, 4.0]", "evaluate.sweep_prompts=2", f"output_dir={tmp_path}"]
    recipe = load_recipe("jobs/demo.yaml", overrides)
    stage = EvaluateStage(recipe, str(tmp_path))
    tasks = stage.tasks()
    prompts = recipe_prompts(recipe)
    main, sweep = tasks[: len(prompts)], tasks[len(prompts) :]
    assert [t.prompt for t in main] == prompts and all(t.guidance is None for t in main)
    assert [t.shard for t in tasks] == [f"{i:05d}" for i in range(len(prompts) + 8)]
    first = [p for g in ("seen-one", "heldout-one") for p in [q for q in prompts if q.group == g][:2]]
    assert [(t.prompt, t.guidance) for t in sweep] == [(p, s) for s in (1.0, 4.0) for p in first]
