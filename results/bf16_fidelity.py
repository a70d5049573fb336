"""
Does bf16 autocast keep the self-evaluation signal of Self-E? (selfe.selfe_loss, jump rows.)

On the jump rows (s < t) a step computes x0_hat = G(net, x_t, t, s, c) (Eq. 6), re-noises
x0_hat to s, asks the two judges G_c = G(ema, x_s, s, s, c) and G_u = G(net, x_s, s, s, null)
and forms delta = G_u - G_c and x_self = x0_hat - delta (Eq. 14). delta is a small difference of
two nearly equal outputs, so bf16 rounding of each could lose its direction. This script computes
the same quantities in float32 and under torch.autocast("cpu", torch.bfloat16), on the same batch,
times and noise, for a grid of (t, s = f t), and compares them row by row:
  judges  the two judge passes alone in bf16, on the float32 x0_hat (same x_s in both)
  e2e     everything in bf16: each precision computes its own x0_hat, then x_s, then the judges
  remedy  x0_hat in bf16, the two judge passes in float32 (autocast off, inputs as float)
Per cell: cosine(bf16 delta, fp32 delta) median / 5th percentile / share of rows below 0.99,
median |a - b| / |b| (norms over C x H x W) of delta, of x_self and of the per-row loss
(Eqs. 19-21, the checkpoint's renorm), and the median |delta| / |x0_hat| in float32.
Every row is conditional (no dropped prompts); x0 is a shapes-world batch.

    OMP_NUM_THREADS=1 python results/bf16_fidelity.py out/ckpt.pt [--n 512] [--seed 0]
    # from the repository's root

One thread; about 3 minutes on one core at --n 512.
"""
import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import selfe  # noqa: E402
from harness import shapes  # noqa: E402
from harness.checkpoints import load_both, read_checkpoint  # noqa: E402
from harness.text_encoder import TextEncoder  # noqa: E402

TS = (0.2, 0.4, 0.6, 0.8, 0.95)
FS = (0.1, 0.5, 0.9)  # s = f * t


def jump(net, x0, t, s, cond, eps):
    return selfe.G(net, selfe.add_noise(x0, t, eps), t, s, cond)  # Eq. 6


def judges(net, ema, x0_sg, s, cond, null, eps, fp32=False):
    """-> delta = G_u - G_c; fp32: the two passes with autocast off, inputs as float."""
    x_s = selfe.add_noise(x0_sg, s, eps)
    if fp32:
        with torch.autocast("cpu", enabled=False):
            f = lambda c: tuple(p.float() if p.is_floating_point() else p for p in c)  # noqa
            return selfe.G(net, x_s.float(), s, s, f(null)) - selfe.G(ema, x_s.float(), s, s,
                                                                      f(cond))
    return selfe.G(net, x_s, s, s, null) - selfe.G(ema, x_s, s, s, cond)


def finish(x0, x0_hat, delta, t, s, renorm):
    """-> (x_self, per-row loss), as selfe_loss does on its jump rows."""
    x_self = x0_hat.float() - delta.float()  # Eq. 14
    lam = selfe.lambda_st(t, s)
    if renorm:
        y = selfe.energy_renorm(x0, x_self, lam)
        return x_self, selfe.sq_err(x0_hat, y) / t**2
    y = (x0 + selfe.bcast(lam, x0) * x_self) / selfe.bcast(1 + lam, x0)
    return x_self, selfe.sq_err(x0_hat, y) / t**2 * (1 + lam)


def rows(x):
    return x.double().flatten(1)


def compare(a, b):
    """-> per-row (cosine, |a - b| / |b|) of bf16 a against fp32 b."""
    a, b = rows(a), rows(b)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return cos, (a - b).norm(dim=1) / b.norm(dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("ckpt")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    cfg, net, ema = load_both(args.ckpt)
    net.requires_grad_(False), ema.requires_grad_(False)
    text = TextEncoder(cfg["text_encoder"], cfg["text_len"])
    rng = np.random.default_rng(args.seed)
    images, captions = shapes.TrainingData(cfg["res"]).batch(args.n, rng)
    x0 = shapes.to_model(images)
    cond, null = text(captions), text([""] * args.n)
    renorm = cfg.get("renorm", True)
    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    med = lambda v: v.median().item()  # noqa: E731
    p5 = lambda v: torch.quantile(v, 0.05).item()  # noqa: E731
    out = []
    with torch.no_grad():
        for t_ in TS:
            for f in FS:
                t = torch.full((args.n,), t_)
                s = t * f
                eps1, eps2 = (torch.randn(x0.shape, generator=gen) for _ in range(2))
                # float32 reference
                xh32 = jump(net, x0, t, s, cond, eps1)
                d32 = judges(net, ema, xh32, s, cond, null, eps2)
                xs32, l32 = finish(x0, xh32, d32, t, s, renorm)
                # judges alone in bf16, on the float32 x0_hat
                with bf16():
                    dj = judges(net, ema, xh32, s, cond, null, eps2)
                    xsj, lj = finish(x0, xh32, dj, t, s, renorm)
                # end to end in bf16; then the remedy: the same bf16 x0_hat, judges in float32
                with bf16():
                    xhb = jump(net, x0, t, s, cond, eps1)
                    de = judges(net, ema, xhb, s, cond, null, eps2)
                    xse, le = finish(x0, xhb, de, t, s, renorm)
                    dr = judges(net, ema, xhb, s, cond, null, eps2, fp32=True)
                    xsr, lr = finish(x0, xhb, dr, t, s, renorm)
                r = {"t": t_, "f": f,
                     "size": med(rows(d32).norm(dim=1) / rows(xh32).norm(dim=1)),
                     "x0hat_rel": med(compare(xhb, xh32)[1])}
                for k, d, xs, loss in (("judges", dj, xsj, lj), ("e2e", de, xse, le),
                                       ("remedy", dr, xsr, lr)):
                    cos, rel = compare(d, d32)
                    r[k] = {"cos_med": med(cos), "cos_p5": p5(cos),
                            "below": (cos < 0.99).double().mean().item(), "rel": med(rel),
                            "xself_rel": med(compare(xs, xs32)[1]),
                            "loss_rel": med((loss.double() - l32.double()).abs() / l32.double())}
                out.append(r)
                print(f"  t {t_:.2f} s/t {f:.1f} done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    report(out, args, read_checkpoint(args.ckpt)["step"], cfg, time.perf_counter() - start)


def cpu_model():
    with open("/proc/cpuinfo") as fh:
        return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")


def report(out, args, step, cfg, seconds):
    print(f"# bf16 fidelity of the self-evaluation signal (jump rows)\n\n"
          f"{datetime.datetime.now().isoformat(timespec='seconds')} | CPU: {cpu_model()} | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()}\n"
          f"ckpt {args.ckpt} (step {step}, model {cfg['model']}, res {cfg['res']}, "
          f"patch {cfg['patch']}, method {cfg['method']}) | n {args.n} rows per cell | "
          f"seed {args.seed}\n")
    print("delta = G_u - G_c, bf16 against float32: cosine median / p5 / share < 0.99 / median "
          "rel err.\njudges: judge passes alone in bf16 (fp32 x0_hat); e2e: all bf16; remedy: "
          "x0_hat bf16, judges fp32.\n|d|/|x0h|: median |delta| / |x0_hat| (fp32). x0h rel: median "
          "rel err of the bf16 x0_hat.\n")
    kinds = ("judges", "e2e", "remedy")
    head = ["t", "s/t", "\\|d\\|/\\|x0h\\|", "x0h rel"] + [f"{k} delta" for k in kinds] + \
        ["x_self rel j / e / r", "loss rel j / e / r"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in out:
        cells = [f"{r['t']:.2f}", f"{r['f']:.1f}", f"{r['size']:.4f}", f"{r['x0hat_rel']:.4f}"]
        for k in kinds:
            q = r[k]
            cells.append(f"{q['cos_med']:.4f} / {q['cos_p5']:.4f} / {q['below']:.2f} / "
                         f"{q['rel']:.3f}")
        cells.append(" / ".join(f"{r[k]['xself_rel']:.4f}" for k in kinds))
        cells.append(" / ".join(f"{r[k]['loss_rel']:.4f}" for k in kinds))
        print("| " + " | ".join(cells) + " |")
    worst = {k: min(r[k]["cos_p5"] for r in out) for k in kinds}
    below = {k: max(r[k]["below"] for r in out) for k in kinds}
    mins = {k: min(r[k]["cos_med"] for r in out) for k in kinds}
    ok = lambda k: "kept" if mins[k] >= 0.99 else "NOT kept"  # noqa: E731
    print(f"\nSummary. |delta| is {min(r['size'] for r in out):.4f} to "
          f"{max(r['size'] for r in out):.4f} of |x0_hat| (median per cell). With the judge "
          f"passes alone in bf16 the direction of delta is {ok('judges')} (lowest cell median "
          f"cosine {mins['judges']:.4f}, lowest p5 {worst['judges']:.4f}, at most "
          f"{below['judges']:.0%} of a cell's rows below 0.99); end to end in bf16 it is "
          f"{ok('e2e')} (lowest median {mins['e2e']:.4f}, lowest p5 {worst['e2e']:.4f}, at most "
          f"{below['e2e']:.0%} below 0.99). With the judges in float32 and x0_hat in bf16: "
          f"{ok('remedy')} (lowest median {mins['remedy']:.4f}, lowest p5 {worst['remedy']:.4f}, "
          f"at most {below['remedy']:.0%} below 0.99). Largest median rel err of x_self: "
          + " / ".join(f"{max(r[k]['xself_rel'] for r in out):.4f}" for k in kinds)
          + ", of the loss: " + " / ".join(f"{max(r[k]['loss_rel'] for r in out):.4f}"
                                           for k in kinds)
          + f" (judges / e2e / remedy). Wall time {seconds:.0f} s.")


if __name__ == "__main__":
    main()
