"""
The built-in data world: coloured shapes on a plain background, captioned with GenEval's six templates.

Infinite and seeded; nothing to download. A scene is made in two steps, as GenEval's prompts are:
  random_prompt(rng, tag) -> metadata in GenEval's form: {"tag", "include", "exclude", "prompt"}
  scene_for(meta, rng)    -> objects that make the prompt TRUE, placed without overlap
and render(objects, res) draws them. `score(objects, meta)` applies GenEval's rules to a list of objects, so every
caption can be checked against its own scene (a test does) and detected objects can be scored the same way.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# Six well-separated colours from GenEval's list of ten.
COLORS = {"red": (220, 40, 40), "yellow": (240, 210, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
          "purple": (150, 60, 200), "white": (250, 250, 250)}
BACKGROUND = (100, 100, 100)
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Obj:
    shape: str
    color: str
    x: float  # centre, in [0, 1], x to the right
    y: float  # centre, in [0, 1], y DOWN (image convention, as GenEval)
    r: float  # half of the box side


# ----------------------------------------------------------------------------------------------------------------
# Prompts in GenEval's metadata form


def random_prompt(rng, tag=None):
    tag = tag or TAGS[rng.integers(len(TAGS))]
    a, b = rng.choice(SHAPES, 2, replace=False).tolist()  # two different shapes
    ca, cb = rng.choice(list(COLORS), 2, replace=False).tolist()  # two different colours
    if tag == "single_object":
        inc, exc, prompt = [dict(cls=a, count=1)], [], f"a photo of a {a}"
    elif tag == "two_object":
        inc, exc, prompt = [dict(cls=a, count=1), dict(cls=b, count=1)], [], f"a photo of a {a} and a {b}"
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        inc, exc, prompt = [dict(cls=a, count=n)], [dict(cls=a, count=n + 1)], f"a photo of {NUMBERS[n]} {a}s"
    elif tag == "colors":
        inc, exc, prompt = [dict(cls=a, count=1, color=ca)], [], f"a photo of a {ca} {a}"
    elif tag == "position":
        rel = RELATIONS[rng.integers(4)]
        inc = [dict(cls=b, count=1), dict(cls=a, count=1, position=[rel, 0])]  # GenEval: B first, A relative to it
        exc, prompt = [], f"a photo of a {a} {rel} a {b}"
    elif tag == "color_attr":
        inc = [dict(cls=a, count=1, color=ca), dict(cls=b, count=1, color=cb)]
        exc, prompt = [], f"a photo of a {ca} {a} and a {cb} {b}"
    else:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    return {"tag": tag, "include": inc, "exclude": exc, "prompt": prompt}


# ----------------------------------------------------------------------------------------------------------------
# Scenes: objects that make a prompt true


def relations(A, B):
    """GenEval's position rule: which relations A holds to B (lenient: a diagonal layout can hold two)."""
    o = np.array([A.x - B.x, A.y - B.y])
    d = np.array([2 * A.r + 2 * B.r] * 2)  # box widths and heights, summed
    r = np.sign(o) * np.maximum(np.abs(o) - 0.1 * d, 0)
    if np.all(np.abs(r) < 1e-3):
        return set()
    dx, dy = r / np.linalg.norm(o)
    return {name for name, ok in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                  ("below", dy > 0.5)) if ok}


def _place(rng, sizes, tries=2000):
    """Centres for boxes of half-sides `sizes`, inside the frame and apart from each other."""
    for _ in range(tries):
        pts = [(rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)) for r in sizes]
        if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) > ri + rj + 0.03
               for i, (p, ri) in enumerate(zip(pts, sizes)) for q, rj in zip(pts[:i], sizes[:i])):
            return pts
    raise RuntimeError("could not place the objects without overlap")


def scene_for(meta, rng):
    """Objects for a prompt. Colours the prompt does not name are drawn at random."""
    objs = []
    for clause in meta["include"]:
        n = clause["count"]
        size = (0.09, 0.13) if n > 1 else (0.12, 0.22) if len(meta["include"]) > 1 else (0.15, 0.3)
        for _ in range(n):
            color = clause.get("color") or list(COLORS)[rng.integers(len(COLORS))]
            objs.append(Obj(clause["cls"], color, 0, 0, rng.uniform(*size)))
    while True:
        for o, (x, y) in zip(objs, _place(rng, [o.r for o in objs])):
            o.x, o.y = x, y
        if score(objs, meta):  # position prompts: redraw until the relation is the asked one and unambiguous
            if meta["tag"] != "position" or len(relations(objs[1], objs[0])) == 1:
                return objs


def render(objs, res, supersample=4):
    """Objects -> (res, res, 3) uint8. Drawn at 4x, then box-filtered down: anti-aliased edges."""
    R = res * supersample
    img = Image.new("RGB", (R, R), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objs:
        x, y, r = o.x * R, o.y * R, o.r * R
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLORS[o.color])
        elif o.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=COLORS[o.color])
        else:  # upright triangle filling its box
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[o.color])
    return np.asarray(img.resize((res, res), Image.BOX))


# ----------------------------------------------------------------------------------------------------------------
# GenEval's rules over a list of objects (ground truth here; detections for a judge)


def score(objs, meta):
    """True when every include clause holds and no exclude clause does. `objs` are ordered most confident first."""
    by_cls = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    found = []  # the most confident object of each include clause, for position references
    for clause in meta["include"]:
        cands = by_cls[clause["cls"]]
        if len(cands) < clause["count"]:  # presence is "at least"
            return False
        if "color" in clause and any(o.color != clause["color"] for o in cands[:clause["count"]]):
            return False
        if "position" in clause:
            rel, ref = clause["position"]
            if rel not in relations(cands[0], found[ref]):
                return False
        found.append(cands[0])
    return all(len(by_cls[c["cls"]]) < c["count"] for c in meta["exclude"])


# ----------------------------------------------------------------------------------------------------------------
# The data stream


class ShapesData:
    """Infinite, seeded stream of (images in [-1, 1], captions). The RNG state is plain data (for checkpoints)."""

    def __init__(self, res=32, seed=0):
        self.res, self.rng = res, np.random.default_rng(seed)

    def sample(self):
        meta = random_prompt(self.rng)
        return render(scene_for(meta, self.rng), self.res), meta["prompt"]

    def batch(self, n):
        imgs, caps = zip(*(self.sample() for _ in range(n)))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, res, res)
        return x, list(caps)
