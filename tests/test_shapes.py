"""Tests of harness/shapes.py: the shapes world, its captions, ShapesEval's judge, its rules and
the scene distance."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import selfe
from harness import shapes
from conftest import one


# The data world


def parse(prompt):
    """Read a caption back, apart from shapes.py: {shape: count}, {shape: colour}, relation."""
    words = prompt.removeprefix("a photo of ").split()
    numbers = {"two": 2, "three": 3, "four": 4}
    if words[0] in numbers:
        return {words[1][:-1]: numbers[words[0]]}, {}, None
    counts, colors, i = {}, {}, 0
    while i < len(words):
        if words[i] == "a":
            i += 1
            color = words[i] if words[i] in shapes.COLORS else None
            i += color is not None
            counts[words[i]] = 1
            if color:
                colors[words[i]] = color
        i += 1
    rel = next((r for r in shapes.RELATIONS if f" {r} " in prompt), None)
    return counts, colors, rel


def test_prompt_swaps_change_one_word_and_are_false_of_the_true_scene():
    swaps, rng = shapes.prompt_swaps(16), np.random.default_rng(0)
    assert [kind for kind, _, _ in swaps] == [kind for kind in shapes.SWAPS for _ in range(16)]
    for kind, meta, swapped in swaps:
        a, b = meta["prompt"].split(), swapped["prompt"].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (a, b)
        assert meta["tag"] == swapped["tag"] == shapes.SWAPS[kind]
        assert swapped["prompt"] in shapes.all_prompts()
        objs = shapes.scene_for(meta, rng)
        assert shapes.score(objs, meta), meta["prompt"]
        assert not shapes.score(objs, swapped), (meta["prompt"], swapped["prompt"])


def test_swap_accuracy_reads_the_models_pick_per_kind():
    """A model that ignores its prompt scores chance, 0.5, on every kind; an oracle that recovers
    the clean image under the true prompt alone (from the noise, which it knows here) scores 1, and
    0 when it favours the swap."""
    prompts = shapes.all_prompts()
    text = lambda batch: one(torch.tensor([float(prompts.index(p)) for p in batch]))  # noqa: E731
    (true_ids,) = text([meta["prompt"] for _, meta, _ in shapes.prompt_swaps(8)])  # prompt ids

    class Oracle(nn.Module):
        def __init__(self, favour_true):
            super().__init__()
            self.res, self.favour_true, self.w = 16, favour_true, nn.Parameter(torch.zeros(()))

        def forward(self, x_s, t, s, cond):
            (ids,) = cond
            eps = torch.randn(x_s.shape, generator=torch.Generator().manual_seed(0))
            x0 = (x_s - selfe.bcast(t, x_s) * eps) / selfe.bcast(1 - t, x_s)
            knows = (ids == true_ids) == self.favour_true  # G = x0 exactly there, G = x_s elsewhere
            return torch.where(selfe.bcast(knows, x_s), (x_s - x0) / selfe.bcast(t, x_s), 0 * x_s)

    blind = Oracle(True)
    blind.forward = lambda x_s, t, s, cond: 0.1 * x_s
    for net, expected in ((blind, 0.5), (Oracle(True), 1.0), (Oracle(False), 0.0)):
        assert shapes.swap_accuracy(net, text, per_kind=8) == {k: expected for k in shapes.SWAPS}


def test_every_caption_is_true_of_its_image():
    rng = np.random.default_rng(0)
    for tag in shapes.TAGS:
        for _ in range(150):
            meta = shapes.random_prompt(rng, tag)
            objs = shapes.scene_for(meta, rng)
            counts, colors, rel = parse(meta["prompt"])
            assert {k: sum(o.shape == k for o in objs) for k in counts} == counts
            assert len(objs) == sum(counts.values())
            assert all(o.color == colors[o.shape] for o in objs if o.shape in colors)
            for o in objs:  # inside the frame
                assert o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r
            for i, a in enumerate(objs):  # no overlap
                for b in objs[:i]:
                    assert max(abs(a.x - b.x), abs(a.y - b.y)) > a.r + b.r
            if rel:  # unambiguous: separated along the named axis, closer along the other one
                names = meta["prompt"].removeprefix("a photo of a ").split(f" {rel} a ")
                A, B = (next(o for o in objs if o.shape == n) for n in names)
                dx, dy = A.x - B.x, A.y - B.y
                main, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx),
                               "below": (dy, dx)}[rel]
                assert main > A.r + B.r and abs(other) < main
            img = shapes.render(objs, 64)
            for o in objs:  # the centre pixel has the object's colour
                px = img[int(o.y * 64), int(o.x * 64)].astype(int)
                assert np.abs(px - shapes.COLORS[o.color]).max() < 30


def test_geneval_rules():
    O = shapes.Obj
    meta = {"tag": "counting", "include": [{"cls": "circle", "count": 2}],
            "exclude": [{"cls": "circle", "count": 3}]}
    two = [O("circle", "red", 0.2, 0.2, 0.1), O("circle", "blue", 0.7, 0.7, 0.1)]
    assert shapes.score(two, meta) and not shapes.score(two[:1], meta)
    assert not shapes.score(two + [O("circle", "red", 0.2, 0.7, 0.1)], meta)  # N + 1 fails
    assert shapes.score(two + [O("square", "red", 0.2, 0.7, 0.1)], meta)  # other classes never cost
    color = {"tag": "colors", "include": [{"cls": "circle", "count": 1, "color": "red"}],
             "exclude": []}
    assert shapes.score(two, color) and not shapes.score(two[::-1], color)  # the most confident
    pos = {"tag": "position", "exclude": [],
           "include": [{"cls": "square", "count": 1},
                       {"cls": "circle", "count": 1, "position": ["left of", 0]}]}
    sq = O("square", "red", 0.7, 0.3, 0.1)
    assert shapes.score([O("circle", "red", 0.2, 0.3, 0.1), sq], pos)
    assert shapes.score([O("circle", "red", 0.2, 0.8, 0.1), sq], pos)  # diagonal: lenient, GenEval
    assert not shapes.score([O("circle", "red", 0.7, 0.8, 0.1), sq], pos)  # straight below
    assert not shapes.score([O("circle", "red", 0.2, 0.3, 0.1)], pos)  # the reference must be found


@pytest.mark.slow  # about 3 s at 32 px
@pytest.mark.parametrize("res", [32, 64])
def test_judge_validation_oracle_robustness_chance_floor(res):
    rows = shapes.validate(res, per_tag=10)
    assert shapes.validation_passes(rows), shapes.markdown_table(rows)
    assert rows["shuffled prompts"]["overall"] < 0.6  # an image does not pass for another prompt


@pytest.mark.slow
def test_shapeseval_below_the_judged_resolution_says_so(tmp_path, capsys):
    def draw(prompts, seed):
        return {2: torch.zeros(len(prompts), 3, 16, 16)}
    shapes.report(draw, 16, "small", str(tmp_path), {}, progress=False)
    assert "note: ShapesEval's judge is validated at 32 px and above; at 16 px" in (
        capsys.readouterr().out)


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, len(shapes.FEATURES))) * shapes.UNITS
    assert shapes.frechet(a, a) < 1e-6
    shift = np.zeros(len(shapes.FEATURES))
    shift[0], shift[-1] = 2.0, 0.05  # two objects more; a residual one unit higher
    assert abs(shapes.frechet(a, a + shift) - 5.0) < 1e-6  # |mu_a - mu_b|^2 in units: 2^2 + 1^2
    b = a.copy()
    b[:, 1] *= 3  # a feature three times as spread: (1 - 3)^2 = 4 in its variance term
    assert abs(shapes.frechet(a, b) - 4.0) < 0.2


@pytest.mark.slow  # about 3 s
def test_scene_distance_sees_collapse_that_the_overall_score_cannot():
    rows = shapes.validate(32, per_tag=10)
    assert rows["collapsed"]["overall"] == 1.0
    assert rows["collapsed"]["fd"] > 10 * rows["oracle"]["fd"]
    assert rows["blurred"]["fd"] > 10 * rows["oracle"]["fd"]


def test_judge_reads_what_was_drawn():
    O = shapes.Obj
    objs = [O("circle", "red", 0.25, 0.3, 0.15), O("triangle", "blue", 0.7, 0.3, 0.15),
            O("square", "white", 0.5, 0.75, 0.12)]
    dets = shapes.detect(shapes.render(objs, 32))
    assert sorted((d.shape, d.color) for d in dets) == sorted((o.shape, o.color) for o in objs)
    for o in objs:
        d = next(d for d in dets if d.shape == o.shape)
        assert abs(d.x - o.x) < 0.03 and abs(d.y - o.y) < 0.03 and abs(d.r - o.r) < 0.03


def test_shapes_stream_is_seeded_and_any_resolution():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    a, ca = shapes.TrainingData(32).batch(8, rng())
    b, cb = shapes.TrainingData(32).batch(8, rng())
    assert np.array_equal(a, b) and ca == cb and a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    x = shapes.to_model(torch.from_numpy(a))  # on the training device
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, shapes.to_model(a))  # the same bits from an array or a tensor
    assert shapes.TrainingData(64).batch(2, rng())[0].shape == (2, 64, 64, 3)


# -------------------------------------------------------------------------------------------------
