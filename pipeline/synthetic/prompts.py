"""The evaluation prompt set: scenes in the synthetic vocabulary with their ground truth, grouped by
whether their colour-shape pairs were seen in training, how many objects they show, and phrasing.

Groups: `seen-one` / `heldout-one` (one object, its pair in / held out of the data), `seen-two` /
`heldout-two` (two objects and a relation; the held-out scenes have one held-out pair), and
`paraphrased` (seen one-object scenes in the training captions' other templates). Every group but
`paraphrased` uses the plain phrasing of `captions.canonical`. Deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.synthetic.captions import COLOURS, LAYOUT, POSITIONS, RELATIONS, SHAPES, SIZES, canonical, caption

GROUPS = ("seen-one", "heldout-one", "seen-two", "heldout-two", "paraphrased")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt and the truth an image for it must show."""

    group: str
    text: str
    objects: tuple[Mapping[str, str], ...]
    relation: str | None = None

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "text": self.text,
            "objects": [dict(o) for o in self.objects],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Prompt:
        return cls(d["group"], d["text"], tuple(dict(o) for o in d["objects"]), d.get("relation"))


def _one(pairs: Sequence[tuple[str, str]], count: int, rng: random.Random) -> list[tuple[dict, ...]]:
    """`count` distinct one-object scenes over `pairs` (all of them, shuffled, when fewer exist)."""
    scenes = [
        ({"colour": c, "shape": s, "size": z, "position": p},) for c, s in pairs for z in SIZES for p in POSITIONS
    ]
    return rng.sample(scenes, min(count, len(scenes)))


def _two(
    first: Sequence[tuple[str, str]], second: Sequence[tuple[str, str]], count: int, rng: random.Random
) -> list[tuple[tuple[dict, ...], str]]:
    """`count` two-object scenes: a pair from `first` and a different one from `second`, a relation."""
    out, seen = [], set()
    for _ in range(count * 20):
        if len(out) == count:
            break
        a = rng.choice(first)
        b = rng.choice([p for p in second if p != a])
        relation = rng.choice(RELATIONS)
        sizes = (rng.choice(SIZES), rng.choice(SIZES))
        key = (a, b, relation, sizes)
        if key in seen:
            continue
        seen.add(key)
        positions = LAYOUT[relation]
        objects = tuple(
            {"colour": c, "shape": s, "size": z, "position": p}
            for (c, s), z, p in zip((a, b), sizes, positions, strict=True)
        )
        out.append((objects, relation))
    return out


def evaluation_prompts(
    heldout: Sequence[tuple[str, str]],
    *,
    seen_one: int,
    heldout_one: int,
    seen_two: int,
    heldout_two: int,
    paraphrased: int,
    seed: int = 0,
) -> list[Prompt]:
    """The prompt set for the data whose held-out (colour, shape) pairs are `heldout`."""
    rng = random.Random(f"{seed}/prompts")
    held = [tuple(p) for p in heldout]
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    prompts = [Prompt("seen-one", canonical(o, None), o) for o in _one(seen, seen_one, rng)]
    if held:
        prompts += [Prompt("heldout-one", canonical(o, None), o) for o in _one(held, heldout_one, rng)]
    prompts += [Prompt("seen-two", canonical(o, r), o, r) for o, r in _two(seen, seen, seen_two, rng)]
    if held:
        prompts += [Prompt("heldout-two", canonical(o, r), o, r) for o, r in _two(held, seen, heldout_two, rng)]
    for objects in _one(seen, paraphrased, rng):
        text = canonical(objects, None)
        while text == canonical(objects, None):
            text = caption(objects, None, rng)
        prompts.append(Prompt("paraphrased", text, objects))
    return prompts
