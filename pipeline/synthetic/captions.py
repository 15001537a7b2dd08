"""The caption side of the synthetic dataset: attribute vocabulary and caption templates.

The attribute constants (colours, shapes, sizes, positions, relations) are what both the
renderer in `pipeline.synthetic.dataset` and the captions here speak about; they live here and
`pipeline.synthetic.dataset` re-exports them. English captions come from paraphrased templates;
the foreign and boilerplate captions are the defects a correct pipeline filters out.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType

# Saturated or bright, so that none is near the dark background and nearest-palette pixel
# classification is unambiguous.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 180, 40),
        "blue": (50, 90, 255),
        "yellow": (240, 220, 30),
        "purple": (160, 60, 210),
        "orange": (250, 140, 20),
        "cyan": (30, 210, 220),
        "white": (245, 245, 245),
    }
)
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("to the left of", "to the right of", "above", "below")

# Where each object of a pair lies for each relation of the first to the second (halves of the canvas).
LAYOUT: Mapping[str, tuple[str, str]] = MappingProxyType(
    dict(zip(RELATIONS, (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")), strict=True))
)

_INVERSE = dict(zip(RELATIONS, ("to the right of", "to the left of", "below", "above"), strict=True))

# Each takes " of the picture" for the longer templates.
_POS = {
    "left": "on the left|at the left|on the left side",
    "right": "on the right|at the right|on the right side",
    "top": "at the top|near the top|in the upper part",
    "bottom": "at the bottom|near the bottom|in the lower part",
    "centre": "in the centre|in the middle|in the center",
}
_ONE = (
    "{np} {pos}",
    "{cs}, {size}, {posl}",
    "there is {np} {pos}",
    "an image of {np} {pos}",
    "{pos}, {np}",
    "a picture showing {np} {posl}",
    "{size} {colour} {shape} {pos}",
    "a {size} {shape} in {colour} {posl}",
)
_TWO = (
    "{a} {rel} {b}",
    "{b} {inv} {a}",
    "there is {a} {rel} {b}",
    "an image of {a} {rel} {b}",
    "{a} and {b}, the {ca} is {rel} the {cb}",
    "two shapes: {b} {inv} {a}",
)
# Hand-written translations: template, then colours, shapes, sizes and positions in the order of
# the constants above. Phrasings like "de couleur rouge" avoid gender agreement, so one template
# fits every noun. All of them are identified as their language by py3langid with p > 0.8.
_FOREIGN = {
    "de": (
        "{shape} in der Farbe {colour}, {size}, {pos}",
        "Rot|Grün|Blau|Gelb|Lila|Orange|Türkis|Weiß",
        "ein Kreis|ein Quadrat|ein Dreieck|eine Raute|ein Stern",
        "ziemlich klein|ziemlich groß",
        "auf der linken Seite|auf der rechten Seite|oben im Bild|unten im Bild|in der Mitte des Bildes",
    ),
    "fr": (
        "{shape} de couleur {colour} et {size}, {pos}",
        "rouge|vert|bleu|jaune|violet|orange|cyan|blanc",
        "un cercle|un carré|un triangle|un losange|une étoile",
        "de petite taille|de grande taille",
        "à gauche de l'image|à droite de l'image|en haut de l'image|en bas de l'image|au centre de l'image",
    ),
    "es": (
        "{shape} de color {colour} y {size}, {pos}",
        "rojo|verde|azul|amarillo|morado|naranja|cian|blanco",
        "un círculo|un cuadrado|un triángulo|un rombo|una estrella",
        "de tamaño pequeño|de tamaño grande",
        "a la izquierda de la imagen|a la derecha de la imagen|arriba en la imagen|abajo en la imagen|"
        "en el centro de la imagen",
    ),
    "ru": (
        "на этой картинке есть {shape} {colour} цвета, {size}, {pos}",
        "красного|зелёного|синего|жёлтого|фиолетового|оранжевого|бирюзового|белого",
        "круг|квадрат|треугольник|ромб|звезда",
        "маленького размера|большого размера",
        "слева|справа|сверху|снизу|в центре",
    ),
}
# At least three words each, so that the boilerplate rule (not caption_too_short) is what fires.
_BOILERPLATE = (
    "photographed on {y}-{m:02d}-{d:02d}",
    "uploaded on {d:02d}/{m:02d}/{y} by admin",
    "stock photo, royalty free",
    "my camera roll IMG_{n}.JPG",
    "file name DSC_{n}.jpg",
    "taken on {y}.{m:02d}.{d:02d} with phone",
)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(objects: Sequence[Mapping[str, str]], relation: str | None, rng: random.Random) -> str:
    """One English caption for a scene, from a randomly chosen template and phrasing."""
    if relation is None:
        o = objects[0]
        short, long = (rng.choice(_POS[o["position"]].split("|")) for _ in range(2))
        long += rng.choice((" of the picture", " of the image"))
        plain, sized = _a(f"{o['colour']} {o['shape']}"), _a(f"{o['size']} {o['colour']} {o['shape']}")
        return rng.choice(_ONE).format(**o, np=sized, cs=plain, pos=short, posl=long)
    sized = rng.random() < 0.5
    a, b = (_a(f"{o['size']} {o['colour']} {o['shape']}" if sized else f"{o['colour']} {o['shape']}") for o in objects)
    ca, cb = (f"{o['colour']} {o['shape']}" for o in objects)
    return rng.choice(_TWO).format(a=a, b=b, ca=ca, cb=cb, rel=relation, inv=_INVERSE[relation])


def canonical(objects: Sequence[Mapping[str, str]], relation: str | None) -> str:
    """The plainest caption of a scene, naming every attribute: "a large red circle on the left",
    "a small red circle to the left of a large blue square" (the evaluation prompts' phrasing)."""
    names = [_a(f"{o['size']} {o['colour']} {o['shape']}") for o in objects]
    if relation is None:
        return f"{names[0]} {_POS[objects[0]['position']].split('|')[0]}"
    return f"{names[0]} {relation} {names[1]}"


def _foreign_caption(obj: Mapping[str, str], rng: random.Random) -> str:
    template, *words = _FOREIGN[rng.choice(sorted(_FOREIGN))]
    colours, shapes, sizes, positions = (w.split("|") for w in words)
    return template.format(
        colour=colours[list(COLOURS).index(obj["colour"])],
        shape=shapes[SHAPES.index(obj["shape"])],
        size=sizes[SIZES.index(obj["size"])],
        pos=positions[POSITIONS.index(obj["position"])],
    )


def _boilerplate_caption(rng: random.Random) -> str:
    # The template is drawn before the date and number, as the draws' order fixes the output.
    return rng.choice(_BOILERPLATE).format(
        y=rng.randint(2005, 2023), m=rng.randint(1, 12), d=rng.randint(1, 28), n=rng.randint(1000, 9999)
    )
