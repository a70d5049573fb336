"""
The built-in data world: coloured shapes on a plain background, captioned with GenEval's six
templates.

Infinite and seeded; nothing to download. A scene is made in two steps, as GenEval's prompts are:
  random_prompt(rng, tag) -> metadata in GenEval's form: {"tag", "include", "exclude", "prompt"};
                             all_prompts() lists every caption it can give (240)
  scene_for(meta, rng)    -> objects that make the prompt TRUE, placed without overlap
and render(objects, res) draws them. `score(objects, meta)` applies GenEval's rules to a list of
objects, so every caption can be checked against its own scene (a test does) and detected objects
can be scored the same way. ShapesEval's second number, the scene distance (`frechet` of
`scene_features`), compares what the judge reads from generated images with what it reads from true
scenes of the same prompts. `evaluate(draw, ...)` scores any model through a draw function, and
`report` writes its table and grid. `TrainingData` serves the world as training batches;
`swap_accuracy` asks a model's own classifier (selfe.G) about one-word prompt swaps.
"""
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

import selfe

# Six well-separated colours from GenEval's list of ten.
COLORS = {"red": (220, 40, 40), "yellow": (240, 210, 40), "green": (40, 170, 60),
          "blue": (40, 90, 230), "purple": (150, 60, 200), "white": (250, 250, 250)}
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


# -------------------------------------------------------------------------------------------------
# Prompts in GenEval's metadata form


def random_prompt(rng, tag=None):
    tag = tag or TAGS[rng.integers(len(TAGS))]
    a, b = rng.choice(SHAPES, 2, replace=False).tolist()  # two different shapes
    ca, cb = rng.choice(list(COLORS), 2, replace=False).tolist()  # two different colours
    n = int(rng.integers(2, 5)) if tag == "counting" else None
    rel = RELATIONS[rng.integers(4)] if tag == "position" else None
    return prompt_meta(tag, a, b, ca, cb, n, rel)


def all_prompts():
    """Every prompt random_prompt can draw (240 of them): the shapes world's captions are a finite
    set."""
    return sorted({prompt_meta(tag, a, b, ca, cb, n, rel)["prompt"] for tag in TAGS
                   for a, b in itertools.permutations(SHAPES, 2)
                   for ca, cb in itertools.permutations(COLORS, 2)
                   for n in NUMBERS for rel in RELATIONS})


def prompt_meta(tag, a, b, ca, cb, n, rel):
    """The metadata of a prompt of this tag about shapes a, b, colours ca, cb, count n and relation
    rel (each tag reads the ones it needs)."""
    if tag == "single_object":
        inc, exc, prompt = [dict(cls=a, count=1)], [], f"a photo of a {a}"
    elif tag == "two_object":
        inc, exc, prompt = ([dict(cls=a, count=1), dict(cls=b, count=1)], [],
                            f"a photo of a {a} and a {b}")
    elif tag == "counting":
        inc, exc, prompt = ([dict(cls=a, count=n)], [dict(cls=a, count=n + 1)],
                            f"a photo of {NUMBERS[n]} {a}s")
    elif tag == "colors":
        inc, exc, prompt = [dict(cls=a, count=1, color=ca)], [], f"a photo of a {ca} {a}"
    elif tag == "position":
        # GenEval: B first, A relative to it
        inc = [dict(cls=b, count=1), dict(cls=a, count=1, position=[rel, 0])]
        exc, prompt = [], f"a photo of a {a} {rel} a {b}"
    elif tag == "color_attr":
        inc = [dict(cls=a, count=1, color=ca), dict(cls=b, count=1, color=cb)]
        exc, prompt = [], f"a photo of a {ca} {a} and a {cb} {b}"
    else:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    return {"tag": tag, "include": inc, "exclude": exc, "prompt": prompt}


# -------------------------------------------------------------------------------------------------
# Scenes: objects that make a prompt true


def relations(A, B):
    """GenEval's position rule: which relations A holds to B (lenient: a diagonal layout can hold
    two)."""
    o = np.array([A.x - B.x, A.y - B.y])
    d = np.array([2 * A.r + 2 * B.r] * 2)  # box widths and heights, summed
    r = np.sign(o) * np.maximum(np.abs(o) - 0.1 * d, 0)
    if np.all(np.abs(r) < 1e-3):
        return set()
    dx, dy = r / np.linalg.norm(o)
    return {name for name, ok in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                  ("above", dy < -0.5), ("below", dy > 0.5)) if ok}


def _place(rng, sizes, tries=500):
    """Centres for boxes of half-sides `sizes`, inside the frame and apart from each other; None if
    none found."""
    for _ in range(tries):
        pts = [(rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03))
               for r in sizes]
        # a gap of 2 pixels at 32 x 32
        if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) > ri + rj + 0.06
               for i, (p, ri) in enumerate(zip(pts, sizes)) for q, rj in zip(pts[:i], sizes[:i])):
            return pts
    return None


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
        pts = _place(rng, [o.r for o in objs])
        if pts is None:  # crowded: shrink everything a little and try again
            for o in objs:
                o.r *= 0.9
            continue
        for o, (x, y) in zip(objs, pts):
            o.x, o.y = x, y
        # position prompts: redraw until the relation is the asked one and unambiguous
        if score(objs, meta):
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


def to_model(images):
    """(N, H, W, 3) uint8 (array or tensor, on any device) -> (N, 3, H, W) float in [-1, 1], what
    the model trains on."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_pixels(x):
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8, what the judge reads."""
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class TrainingData:
    """The shapes world as training data: infinite, seeded by the rng it is given, nothing to
    download."""

    def __init__(self, res=32):
        self.res = res
        self.captions = all_prompts()  # every caption a batch can hold

    def batch(self, n, rng):
        """-> ((n, res, res, 3) uint8 images, their n captions)."""
        metas = [random_prompt(rng) for _ in range(n)]
        images = np.stack([render(scene_for(m, rng), self.res) for m in metas])
        return images, [m["prompt"] for m in metas]


# -------------------------------------------------------------------------------------------------
# GenEval's rules over a list of objects (ground truth here; detections for a judge)


def score(objs, meta):
    """True when every include clause holds and no exclude clause does. `objs` are ordered most
    confident first."""
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


# -------------------------------------------------------------------------------------------------
# The judge: geometry in place of GenEval's detector and CLIP colour classifier

PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 is the background
# smallest object, as a fraction of the image (12 pixels at 32 x 32; our smallest is 16)
MIN_AREA = 0.012
# confidence (soft IoU) to keep a detection; GenEval: 0.3, and 0.9 when counting
THRESHOLD = {"counting": 0.6}
DEFAULT_THRESHOLD = 0.5


def components(mask):
    """4-connected regions of a boolean (H, W) mask -> list of (ys, xs) index arrays."""
    H, W = mask.shape
    seen, out = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append((np.array(ys), np.array(xs)))
    return out


def coverage(shape, cx, cy, area, ys, xs, sub=4):
    """Fraction of each pixel (ys, xs) covered by an ideal shape with centroid (cx, cy) and the
    given area, in pixels; sub x sub samples per pixel. -> (coverage, half side of the shape's box,
    y of the box centre)."""
    off = (np.arange(sub) + 0.5) / sub
    u = xs[:, None, None] + off[None, None, :] - cx  # (n, 1, sub)
    v = ys[:, None, None] + off[None, :, None] - cy  # (n, sub, 1)
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        inside, box_cy = u**2 + v**2 <= r**2, cy
    elif shape == "square":
        r = np.sqrt(area) / 2
        inside, box_cy = (np.abs(u) <= r) & (np.abs(v) <= r), cy
    else:  # upright triangle of box side a: area a^2 / 2, centroid 2a/3 below the apex
        a = np.sqrt(2 * area)
        r, depth = a / 2, v + 2 * a / 3
        inside, box_cy = (depth >= 0) & (depth <= a) & (np.abs(u) <= depth / 2), cy - a / 6
    return inside.mean((1, 2)), r, box_cy


@dataclass
class Detection(Obj):
    conf: float = 1.0


def detect(img):
    """(H, W, 3) uint8 -> detections, most confident first.
    Each pixel takes the nearest palette colour or the background; each 4-connected region of one
    colour is a candidate. Around it, each pixel's coverage is read from its colour (background = 0,
    the palette colour = 1), and the class is the ideal shape of the same area and centroid that
    overlaps this soft mask best (the soft IoU is the confidence). The colour is the palette colour
    nearest the region's mean."""
    H, W, _ = img.shape
    pix = img.astype(np.float32)
    label = ((pix[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W)
    dets = []
    for k in range(1, len(PALETTE)):
        for ys, xs in components(label == k):
            if len(ys) < MIN_AREA * H * W:
                continue
            y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, H)
            x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, W)
            win = np.zeros((H, W), dtype=bool)
            win[y0:y1, x0:x1] = True
            own = np.zeros((H, W), dtype=bool)
            own[ys, xs] = True
            # the region and the background around it
            wy, wx = np.nonzero(win & (own | (label == 0)))
            d = PALETTE[k] - PALETTE[0]
            alpha = np.clip(((pix[wy, wx] - PALETTE[0]) @ d) / (d @ d), 0, 1)  # soft mask
            area = alpha.sum()
            cx, cy = (alpha * (wx + 0.5)).sum() / area, (alpha * (wy + 0.5)).sum() / area
            best = None
            for shape in SHAPES:
                cov, r, box_cy = coverage(shape, cx, cy, area, wy, wx)
                iou = np.minimum(alpha, cov).sum() / np.maximum(alpha, cov).sum()
                if best is None or iou > best.conf:
                    color = list(COLORS)[
                        ((PALETTE[1:] - pix[ys, xs].mean(0)) ** 2).sum(-1).argmin()]
                    best = Detection(shape, color, cx / W, box_cy / H, r / H, float(iou))
            dets.append(best)
    return sorted(dets, key=lambda d: -d.conf)


def judge(img, meta, dets=None):
    """GenEval's verdict on one image: detections above the category's threshold, then GenEval's
    rules."""
    keep = THRESHOLD.get(meta["tag"], DEFAULT_THRESHOLD)
    return score([d for d in (detect(img) if dets is None else dets) if d.conf >= keep], meta)


# -------------------------------------------------------------------------------------------------
# Scene distance: the second number. Overall asks "is each image on its prompt?"; a model can say
# yes with the same layout every time, or with smeared shapes. The scene distance compares the
# statistics the judge reads from the generated images with those of true scenes of the same
# prompts: a Frechet distance (as FID, with judge statistics in place of Inception features). It
# sees lost diversity (positions and sizes that no longer vary), wrong counts and colours, and blur
# or speckle.

FEATURES = ("circles", "squares", "triangles", *COLORS, "size", "x", "y", "spread", "shape fit",
            "foreground", "off-palette", "residual")
# The unit of each feature in the distance: one object; a tenth of the image (sizes, positions,
# fractions of pixels, confidence); a twentieth of the colour range (residual). Fixed units, not the
# spread of the true scenes: clean renders hardly vary in their pixel statistics, and dividing by
# that would make mild noise look enormous.
UNITS = np.array([1.0] * (len(SHAPES) + len(COLORS)) + [0.1] * 7 + [0.05])


def scene_features(img, dets):
    """(H, W, 3) uint8 and its detections -> FEATURES, one float each: objects per shape and per
    colour, their mean size, position and spread, the mean confidence (how well the blobs fit ideal
    shapes), the fraction of pixels nearer a palette colour than the background, of pixels far from
    every palette colour (blur, speckle), and the mean distance to the nearest palette colour."""
    kept = [d for d in dets if d.conf >= DEFAULT_THRESHOLD]
    counts = ([sum(d.shape == k for d in kept) for k in SHAPES]
              + [sum(d.color == c for d in kept) for c in COLORS])
    xs, ys = np.array([d.x for d in kept]), np.array([d.y for d in kept])
    where = [np.mean([d.r for d in kept]), xs.mean(), ys.mean(),
             np.hypot(xs - xs.mean(), ys - ys.mean()).mean(),
             np.mean([d.conf for d in kept])] if kept else [0.0, 0.5, 0.5, 0.0, 0.0]
    # (H, W, colours)
    dist = np.sqrt(((img.astype(np.float32)[:, :, None, :] - PALETTE) ** 2).sum(-1))
    nearest = dist.min(-1)
    pixels = [(dist.argmin(-1) > 0).mean(), (nearest > 40).mean(), nearest.mean() / 255]
    return np.array(counts + where + pixels, dtype=np.float64)


def frechet(a, b):
    """Frechet distance between Gaussians fitted to scene features a and b (N, F), in the units of
    UNITS: |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)."""
    a, b = a / UNITS, b / UNITS
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cb @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


def true_scenes(metas, res, seed=1):
    """One true render per evaluation row: the reference the scene distance measures against."""
    rng = np.random.default_rng(seed)
    return [render(scene_for(m, rng), res) for m in metas]


def features_of(images):
    return np.stack([scene_features(im, detect(im)) for im in images])


def eval_prompts(per_tag, seed=2026):
    """The fixed evaluation set: per_tag prompts in each of the six categories, in GenEval's
    metadata form."""
    rng = np.random.default_rng(seed)
    return [random_prompt(rng, tag) for tag in TAGS for _ in range(per_tag)]


SWAPS = {"shape": "single_object", "colour": "colors", "count": "counting", "relation": "position"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def prompt_swaps(per_kind, seed=2027):
    """-> [(kind, meta, swapped meta)]: per_kind true prompts for each kind of one-word swap (SWAPS:
    the template each kind changes), each with the prompt that differs in that word only and is
    false of every scene of the true one: another shape, another colour, another count, the opposite
    relation."""
    rng, out = np.random.default_rng(seed), []
    for kind, tag in SWAPS.items():
        for _ in range(per_kind):
            a, b = rng.choice(SHAPES, 2, replace=False).tolist()
            ca, cb = rng.choice(list(COLORS), 2, replace=False).tolist()
            n, m = (int(k) for k in rng.choice(list(NUMBERS), 2, replace=False))
            rel = RELATIONS[rng.integers(4)]
            swapped = {"shape": (b, a, ca, n, rel), "colour": (a, b, cb, n, rel),
                       "count": (a, b, ca, m, rel), "relation": (a, b, ca, n, OPPOSITE[rel])}[kind]
            meta = prompt_meta(tag, a, b, ca, cb, n, rel)
            out.append((kind, meta, prompt_meta(tag, *swapped[:3], cb, *swapped[3:])))
    return out


def summarize(metas, correct):
    """Per-category accuracy over images, and Overall = the unweighted mean of the six categories
    (GenEval)."""
    out = {tag: float(np.mean([c for m, c in zip(metas, correct) if m["tag"] == tag]))
           for tag in TAGS}
    return {"overall": float(np.mean(list(out.values()))), **out}


# ShapesEval sizes: prompts per category, IMAGES_PER_PROMPT images each (GenEval: 553 prompts, about
# 92 per category)
IMAGES_PER_PROMPT = 4
EVAL_SIZES = {"small": 4, "medium": 16, "full": 92}  # 96, 384 and 2208 images per step count


def eval_images(size):
    return IMAGES_PER_PROMPT * len(TAGS) * EVAL_SIZES[size]


def evaluate(draw, res, per_tag, seed=0, batch=96, progress=True):
    """ShapesEval -> ({steps: {"overall", "fd", tag: accuracy}}, {steps: (6, 3, H, W)}, 6 prompts):
    the scores (fd: the scene distance to true scenes of the same prompts, lower is better), and the
    first image of each category for a grid. draw(prompts, seed) -> {steps: (P, 3, H, W) in [-1, 1]}
    is the model under test; it must start image i of the set from the same noise at every step
    count, so that the columns compare alike."""
    rows = [m for m in eval_prompts(per_tag) for _ in range(IMAGES_PER_PROMPT)]
    firsts = [IMAGES_PER_PROMPT * per_tag * j for j in range(len(TAGS))]
    correct, feats, grid = {}, {}, {}
    for i in tqdm(range(0, len(rows), batch), desc="eval", disable=not progress):
        chunk = rows[i:i + batch]
        for k, x in draw([m["prompt"] for m in chunk], seed + i).items():
            for img, m in zip(x, chunk):
                pix = to_pixels(img)
                dets = detect(pix)  # once, for the verdict and for the scene statistics
                correct.setdefault(k, []).append(judge(pix, m, dets))
                feats.setdefault(k, []).append(scene_features(pix, dets))
            for g, j in enumerate(firsts):
                if i <= j < i + len(chunk):
                    grid.setdefault(k, [None] * len(firsts))[g] = x[j - i]
    ref = features_of(true_scenes(rows, res))  # true scenes of the same prompts
    results = {k: {**summarize(rows, c), "fd": frechet(np.stack(feats[k]), ref)}
               for k, c in correct.items()}
    return (results, {k: torch.stack(v) for k, v in grid.items()},
            [rows[j]["prompt"] for j in firsts])


JUDGED_RES = 32  # the judge is validated at 32 px and above (test_judge_validation_...)


def report(draw, res, size, out, info, seed=0, progress=True):
    """ShapesEval at every step count draw makes -> results; writes OUT/results.json (info, the
    scores) and OUT/grid.png (the first image of each category)."""
    if res < JUDGED_RES:
        print(f"note: ShapesEval's judge is validated at {JUDGED_RES} px and above; at {res} px "
              f"even an untrained model passes some of its rules")
    results, images, names = evaluate(draw, res, EVAL_SIZES[size], seed, progress=progress)
    save_grid(images, names, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**info, "eval_size": size, "images_per_step_count": eval_images(size),
                   "seed": seed, "results": results}, f, indent=1)
    return results


LABEL_CHARS = 60  # a longer prompt is cut on the grid, which would grow as wide as it


def save_grid(images, prompts, path, cell=96):
    """images: {steps: (P, 3, H, W)}. One row per prompt (its text on the left), a column per step
    count."""
    font = ImageFont.load_default(size=13)  # the default size, 10, runs words together
    prompts = [p if len(p) <= LABEL_CHARS else p[:LABEL_CHARS - 3] + "..." for p in prompts]
    cols, label_w, head_h = list(images), 8 + int(max(font.getlength(p) for p in prompts)), 18
    grid = Image.new("RGB", (label_w + cell * len(cols), head_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, steps in enumerate(cols):
        draw.text((label_w + j * cell + 4, 2), f"{steps} step{'s' * (steps > 1)}", fill="black",
                  font=font)
        for i, x in enumerate(images[steps]):
            img = Image.fromarray(to_pixels(x))
            grid.paste(img.resize((cell, cell), Image.NEAREST),
                       (label_w + j * cell, head_h + i * cell))
    for i, p in enumerate(prompts):
        draw.text((4, head_h + i * cell + cell // 2 - 7), p, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


@torch.no_grad()
def swap_accuracy(model, text, per_kind=64, s=0.5, seed=0):
    """The model's own classifier, the one self-evaluation steers by, on one-word prompt swaps ->
    {kind: accuracy}. A true scene of each prompt is noised to time s; the model's Tweedie estimates
    G(x_s, s, s, c) under the true and the swapped prompt are compared, and the one nearer the clean
    image is its pick (log q(c | x_s) compares each prompt with the empty one: with the same noise
    that term cancels). A tie counts half, so a model that ignores its prompt scores 0.5."""
    device = next(model.parameters()).device
    swaps = prompt_swaps(per_kind)
    rng = np.random.default_rng(seed)
    x0 = to_model(np.stack([render(scene_for(meta, rng), model.res)
                            for _, meta, _ in swaps])).to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    t = torch.full((len(x0),), s, device=device)
    x_s = selfe.add_noise(x0, t, eps)
    err_true, err_swap = (  # (N,) each
        selfe.sq_err(selfe.G(model, x_s, t, t, text([m["prompt"] for m in metas])), x0)
        for metas in zip(*[(meta, swapped) for _, meta, swapped in swaps]))
    right = ((err_true < err_swap).float() + 0.5 * (err_true == err_swap).float()).cpu()
    kinds = np.array([kind for kind, _, _ in swaps])
    return {kind: float(right[kinds == kind].mean()) for kind in SWAPS}


# -------------------------------------------------------------------------------------------------
# Trusting the judge (as DALL-Eval validated its detector): oracle, robustness, chance level, floor


def mildly_corrupt(img, rng):
    """Gaussian blur of 0.6 pixel and pixel noise of std 8 / 255."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.6)))
    return np.clip(blurred + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def validate(res=32, per_tag=16, seed=0):
    """-> {row: summary with the scene distance "fd"}. Ground-truth renders of the evaluation
    prompts (IMAGES_PER_PROMPT each); the same mildly blurred and noised; scored against prompts
    shuffled within each category; blank images; pure noise. For the scene distance also: the same
    images blurred by 1/32 of their side (1 pixel at 32 px), and a collapsed set (one layout per
    prompt, the one a fixed seed draws, whatever the image): both are mostly on-prompt, and far from
    true scenes."""
    rng = np.random.default_rng(seed)
    metas = [m for m in eval_prompts(per_tag) for _ in range(IMAGES_PER_PROMPT)]
    clean = [render(scene_for(m, rng), res) for m in metas]
    shuffled = list(metas)
    for tag in TAGS:
        idx = [i for i, m in enumerate(metas) if m["tag"] == tag]
        for i, j in zip(idx, rng.permutation(idx)):
            shuffled[i] = metas[j]
    blank = np.full((res, res, 3), BACKGROUND, dtype=np.uint8)
    rows = {"oracle": (clean, metas),
            "blur + noise": ([mildly_corrupt(im, rng) for im in clean], metas),
            "shuffled prompts": (clean, shuffled), "blank": ([blank] * len(metas), metas),
            "pure noise": ([rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in metas],
                           metas),
            "blurred": ([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(res / 32)))
                         for im in clean], metas),
            "collapsed": ([render(scene_for(m, np.random.default_rng(0)), res) for m in metas],
                          metas)}
    ref = features_of(true_scenes(metas, res))
    out = {}
    for name, (ims, ms) in rows.items():
        dets = [detect(im) for im in ims]
        feats = np.stack([scene_features(im, d) for im, d in zip(ims, dets)])
        out[name] = {**summarize(ms, [judge(im, m, d) for im, m, d in zip(ims, ms, dets)]),
                     "fd": frechet(feats, ref)}
    return out


def markdown_table(rows, first="", fmt="{:.3f}"):
    """{row name: summary} -> a markdown table: Overall, the scene distance, the six categories."""
    cols = ["overall", "fd", *TAGS]
    lines = [f"| {first} | Overall | scene distance | " + " | ".join(TAGS) + " |",
             "|---" * len(cols) + "|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[k]) if k in r else "" for k in cols)
                     + " |")
    return "\n".join(lines)


# Pass marks for the judge's validation: oracle >= 0.99 and blur + noise >= 0.97 in every category,
# blank and pure noise about 0; scene distance of true scenes (a second draw) at most 0.5, of the
# blurred and the collapsed sets at least 2 (measured at 32 px: 0.09, 5.3 and 4.7).
def validation_passes(rows):
    return (min(rows["oracle"][t] for t in TAGS) >= 0.99
            and min(rows["blur + noise"][t] for t in TAGS) >= 0.97
            and rows["blank"]["overall"] <= 0.01 and rows["pure noise"]["overall"] <= 0.01
            and rows["oracle"]["fd"] <= 0.5
            and min(rows["blurred"]["fd"], rows["collapsed"]["fd"]) >= 2)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(
        description="Validate the shapes judge (oracle, blur + noise, chance, floor) and the "
                    "scene distance (true scenes near 0, blurred and collapsed sets far).")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--per-tag", type=int, default=16,
                   help=f"prompts per category ({IMAGES_PER_PROMPT} images each)")
    args = p.parse_args()
    rows = validate(args.res, args.per_tag)
    print(f"judge validation, {args.res} px, {args.per_tag} prompts x {IMAGES_PER_PROMPT} images "
          f"per category\n")
    print(markdown_table(rows, "images"))
    ok = validation_passes(rows)
    print("\nPASS" if ok else
          "\nFAIL: oracle < 0.99, blur + noise < 0.97, blank / noise above 0.01, or the scene "
          "distance of true scenes above 0.5 or of the blurred / collapsed sets below 2")
    raise SystemExit(0 if ok else 1)
