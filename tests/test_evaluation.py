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
