"""
See Self-E work in a minute: flow matching and Self-E trained on a 2-D mixture with selfe.py's own
loss and sampler (the method does not care what the network is), then sampled at 1 to 50 steps.

    python toy.py                    # the opposite layout, one seed: a table and toy.png
    python toy.py --layout adjacent  # where self-evaluation has nothing to push with
    python toy.py --layout radii     # where it seeks one mode of two
    python toy.py --layout unequal   # opposite modes at two radii: where it loses one
    python toy.py --seeds 0,1,2      # the mean of three seeds (the tables in results/README.md)

The data: 8 Gaussians (std 0.15); 4 classes of two modes each, and a null class for the empty
prompt. In the default layout a class owns two OPPOSITE modes of a circle of radius 3, so its mean
is the origin: a flow-matching model asked for a class in one or two steps lands near that mean,
between the modes, while Self-E's jumps were trained to land where its own classifier says the
class is. Accuracy: the share of samples within 3 std of a mode of the asked class. Energy distance:
between the samples and true draws of the same classes (0 = the same distribution).
"""
import argparse
import copy
import dataclasses
import math
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

import selfe

CLASSES, NULL, STD = 4, 4, 0.15  # class ids 0-3, the empty prompt 4, their fake prompts 5-9
STEPS = (1, 2, 4, 8, 50)


def modes(layout):
    """-> (8, 2) mode centres; class c owns modes c and c + 4."""
    angle = torch.arange(8) * math.pi / 4
    if layout == "adjacent":  # class c owns two neighbours on the circle
        angle = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]) * math.pi / 4
    radius = torch.full((8,), 3.0)
    if layout == "radii":  # class c owns the direction c * 90 degrees, at radius 2 and 4
        angle = torch.arange(8) % 4 * math.pi / 2
        radius = torch.tensor([2.0] * 4 + [4.0] * 4)
    if layout == "unequal":  # class c owns two opposite modes, at radius 1.5 and at 3.5
        radius = torch.tensor([1.5] * 4 + [3.5] * 4)
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)


def draw_data(centres, n, gen):
    """-> n points (n, 2) and their classes (n,)."""
    c = torch.randint(0, CLASSES, (n,), generator=gen)
    mode = c + CLASSES * torch.randint(0, 2, (n,), generator=gen)
    return centres[mode] + STD * torch.randn(n, 2, generator=gen), c


class ToyNet(nn.Module):
    """V(x, t, s, (class,)) for 2-D points: an MLP of width 128 with 3 residual layers. Like the
    DiT, it sees t and the gap t - s, and the gap's embedding starts at zero (a flow-matching
    model)."""

    def __init__(self, width=128):
        super().__init__()
        self.x_in = nn.Linear(2, width)
        self.t_in = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.gap_in = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.gap_in[2].weight)
        nn.init.zeros_(self.gap_in[2].bias)
        self.c_in = nn.Embedding(2 * CLASSES + 2, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width))
                                    for _ in range(3))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, s, cond):
        (c,) = cond
        h = self.x_in(x) + self.t_in(selfe.sinusoid(t, 16))  # the DiT's time features
        h = h + self.gap_in(selfe.sinusoid(t - s, 16)) + self.c_in(c)  # (B, width)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


def train(method, centres, seed, iters=4000, batch=256, renorm=True, aux_start=1.0, k=0.9):
    """The project's recipe at toy size: Adam (0.9, 0.95), lr 1e-3 with warm-up and linear decay,
    clip 1, tau ramped over 40 % of the run, EMA weights as the conditional judge. -> the EMA."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = ToyNet()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.95))
    null, null_fake = (torch.full((batch,), NULL),), (torch.full((batch,), 2 * NULL + 1),)
    recipe = selfe.Recipe(fm=method == "fm", renorm=renorm, k=k)
    for step in range(iters):
        x0, c = draw_data(centres, batch, gen)
        fake = (c + NULL + 1,) if step >= aux_start * iters else None  # "<class> fake image"
        # lr: warm-up over 100 steps, then linear decay from 1e-3 to 1e-5
        opt.param_groups[0]["lr"] = 1e-3 * min((step + 1) / 100, 1 - 0.99 * step / iters)
        loss, _ = selfe.selfe_loss(net, x0, (c,), null, fake, null_fake,
                                   tau=min(1.0, step / (0.4 * iters)), recipe=recipe, eval_net=ema)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        selfe.ema_update(ema, net, selfe.ema_decay(step, 0.9999))
    return ema


def draw_samples(model, method, steps, cfg, n=2000, eta=0.0):
    """n samples, classes 0-3 in turn, with the method's default sampler (selfe.SAMPLERS)."""
    c = torch.arange(n) % CLASSES
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(123))
    sampler = dataclasses.replace(selfe.SAMPLERS[method], cfg=cfg, eta=eta)
    return selfe.sample(model, noise, (c,), (torch.full((n,), NULL),), steps, 1.0, sampler,
                        torch.Generator().manual_seed(456)), c


def accuracy(x, c, centres):
    """The share of samples within 3 std of a mode of their own class."""
    own = torch.stack([centres[c], centres[c + CLASSES]], 1)  # (n, 2, 2)
    return ((x[:, None] - own).norm(dim=-1).min(1).values < 3 * STD).float().mean().item()


def energy_distance(x, c, centres):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| per class against true draws, averaged over classes."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for cls in range(CLASSES):
        a = x[c == cls]
        mode = cls + CLASSES * torch.randint(0, 2, (len(a),), generator=gen)
        b = centres[mode] + STD * torch.randn(len(a), 2, generator=gen)
        d = lambda p, q: torch.cdist(p, q).mean()  # noqa: E731
        out.append(2 * d(a, b) - d(a, a) - d(b, b))
    return torch.stack(out).mean().item()


def variants(aux_start, k):
    """-> {name: (method, aux_start)}: flow matching, Self-E with the classifier score alone and,
    when the fake-score term is asked for, Self-E with it from aux_start on (the paper's second
    stage)."""
    out = {"flow matching": ("fm", 1.0), "Self-E": ("selfe", 1.0)}
    if aux_start < 1:
        out[f"+ fake score, k {k:g} from {aux_start:g}"] = ("selfe", aux_start)
    return out


def evaluate(models, centres, cfgs, eta):
    """models: {name: (method, EMA)} -> {(name, cfg, steps): (accuracy, energy distance)}, and the
    cfg-1 samples to draw."""
    scores, shown = {}, {}
    for name, (method, model) in models.items():
        for cfg in sorted({1.0, *cfgs}):
            for steps in STEPS:
                x, c = draw_samples(model, method, steps, cfg, eta=eta)
                scores[name, cfg, steps] = (accuracy(x, c, centres),
                                            energy_distance(x, c, centres))
                if cfg == 1.0:
                    shown[name, steps] = (x, c)
    return scores, shown


def table(scores, cfg, names):
    head = " | ".join(f"{steps} step{'s' * (steps > 1)}" for steps in STEPS)
    lines = [f"| cfg {cfg:g}: accuracy / energy distance | {head} |",
             "|---" * (len(STEPS) + 1) + "|"]
    for name in names:
        cells = " | ".join("{:.2f} / {:.2f}".format(*scores[name, cfg, steps]) for steps in STEPS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]


def picture(shown, centres, names, path, title, cell=180, span=5.5):
    """A row per model, a column per step count: samples coloured by class over the true modes."""
    font = ImageFont.load_default(size=14)
    left, top = 16 + max(110, max(font.getlength(n) for n in names)), 56
    img = Image.new("RGB", (round(left) + cell * len(STEPS), top + cell * len(names)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    px = lambda p, i, j: (left + j * cell + cell / 2 + p[0] * cell / (2 * span),  # noqa: E731
                          top + i * cell + cell / 2 - p[1] * cell / (2 * span))
    for j, steps in enumerate(STEPS):
        draw.text((left + j * cell + cell / 2, top - 8), f"{steps} step{'s' * (steps > 1)}",
                  fill="black", font=font, anchor="mb")
    for i, name in enumerate(names):
        draw.text((8, top + i * cell + cell / 2), name, fill="black", font=font, anchor="lm")
        for j, steps in enumerate(STEPS):
            draw.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 1,
                            top + (i + 1) * cell - 1], outline=(200, 200, 200))
            for mode, m in enumerate(centres):  # each true mode: a ring of 3 std, its class colour
                x, y = px(m, i, j)
                r = 3 * STD * cell / (2 * span)
                draw.ellipse([x - r, y - r, x + r, y + r], outline=COLORS[mode % CLASSES], width=2)
            points, c = shown[name, steps]
            for p, cls in zip(points[:1000].tolist(), c[:1000].tolist()):
                x, y = px(p, i, j)
                draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=COLORS[cls])
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["opposite", "adjacent", "radii", "unequal"],
                   default="opposite",
                   help="where each class's two modes lie (see the top of this file)")
    p.add_argument("--seeds", default="0", help="comma-separated; the table is their mean")
    p.add_argument("--iters", type=int, default=4000, help="training steps per method")
    p.add_argument("--no-renorm", action="store_true",
                   help="the paper's 'w/o target norm' ablation")
    p.add_argument("--aux-start", type=float, default=1.0,
                   help="below 1: a third model, Self-E with the fake-score term on after this "
                        "fraction of the run (the paper's second stage)")
    p.add_argument("--k", type=float, default=0.9,
                   help="the classifier score's share once the term is on (paper: 0.9)")
    p.add_argument("--cfg", default="1,5", help="comma-separated guidance scales, a table each")
    p.add_argument("--eta", type=float, default=0.0,
                   help="in [0, 1]: 0 = Euler (Eq. 22); 1 = DDPM-like, the paper's tables'")
    p.add_argument("--out", default="toy.png", help="the picture (the first seed, cfg 1)")
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        cfgs = [float(w) for w in args.cfg.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r} and --cfg {args.cfg!r}: give numbers separated by commas")
    if min(cfgs) < 0:
        p.error("--cfg must be at least 0")
    if args.iters < 1 or not all(0 <= v <= 1 for v in (args.aux_start, args.k, args.eta)):
        p.error("--iters must be at least 1, --aux-start, --k and --eta lie in [0, 1]")
    torch.set_num_threads(1)  # a 2-D toy gains nothing from more threads
    centres, t0, runs = modes(args.layout), time.perf_counter(), []
    names = variants(args.aux_start, args.k)
    for seed in seeds:
        models = {name: (m, train(m, centres, seed, args.iters, renorm=not args.no_renorm,
                                  aux_start=a, k=args.k)) for name, (m, a) in names.items()}
        runs.append(evaluate(models, centres, cfgs, args.eta))
        print(f"seed {seed}: trained and sampled ({time.perf_counter() - t0:.0f} s so far)")
    scores = {key: tuple(sum(r[0][key][i] for r in runs) / len(runs) for i in range(2))
              for key in runs[0][0]}
    eta = f", eta {args.eta:g}" * (args.eta > 0)
    print(f"\n{args.layout} layout, {args.iters} steps{eta}, mean of seeds {args.seeds}:\n")
    print("\n\n".join(table(scores, cfg, names) for cfg in cfgs))
    title = (f"{args.layout} layout, seed {seeds[0]}, no guidance: the same model at every step "
             f"count (rings: true modes)")
    picture(runs[0][1], centres, names, args.out, title)
    print(f"\nwrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
