"""
Run control: what the training loop calls around its step. Skipping a non-finite step, running
figures (Tally), training time (Clock), FLOPs, MFU and the memory estimate, the log file, several
processes agreeing to stop, and Ctrl-C / SIGTERM (Interrupt).
"""
import os
import resource
import signal
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

import selfe
from .checkpoints import build_model, recipe_of


# Fused optimisers that skip a step on found_inf leaving their state as it was, their first step
# included. Fused SGD with momentum does not: a skipped first step leaves its momentum buffer
# allocated and never written, and the next step reads it.
FOUND_INF_SAFE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)


def step_unless(opt, bad):
    """opt.step(), or no change at all (weights, moments, step count) where the 0-d tensor bad is
    1, with any torch optimiser. The fused ones of FOUND_INF_SAFE read bad on the device as their
    found_inf: no host sync. Any other is asked on the host: one sync a step. Not GradScaler's
    path: GradScaler scales the loss (bf16 needs no scaling) and sets found_inf itself from the
    gradients it unscales; the two do not compose."""
    if isinstance(opt, FOUND_INF_SAFE) and opt.defaults.get("fused"):
        opt.found_inf = bad
        opt.step()
        del opt.found_inf  # read by the next step only if set again
    elif not bad.item():
        opt.step()


MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop the run


class Tally:
    """Running figures of the steps since the last log line, kept on the device (reading one costs
    a host sync). skipped: the non-finite steps of the whole run; worst: the longest run of them."""

    def __init__(self, device, skipped):
        zero = torch.zeros((), device=device)
        self.skipped = zero + skipped
        self.streak, self.worst, self.bad = zero.clone(), zero.clone(), zero.clone()
        self.loss, self.frac_self = zero.clone(), zero.clone()
        self.steps = 0

    def add(self, loss, bad, frac_self):
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        self.bad += bad
        self.loss += torch.nan_to_num(loss) * (1 - bad)
        self.frac_self += frac_self
        self.steps += 1

    def read(self):
        """-> the mean loss of the window's good steps, its share of s < t rows and the skipped
        steps so far; then a new window starts."""
        good = self.steps - self.bad.item()
        rec = {"loss": self.loss.item() / good if good else None,
               "frac_self": self.frac_self.item() / self.steps, "skipped": int(self.skipped.item())}
        for acc in (self.bad, self.loss, self.frac_self):
            acc.zero_()
        self.steps = 0
        return rec

    def stop_if_failing(self, step, ckpt_path, bar):
        """MAX_BAD_STEPS non-finite steps in a row stop the run, saying what to do."""
        if self.worst.item() >= MAX_BAD_STEPS:
            bar.close()  # the error on a line of its own
            saved = (f"{ckpt_path} holds the last good weights: --resume" if
                     os.path.exists(ckpt_path) else "no checkpoint yet: start again")
            raise SystemExit(f"error: {int(self.worst.item())} steps in a row had a non-finite "
                             f"loss or gradient (by step {step}); stopped. {saved} with a lower "
                             f"--lr or --clip")


class Clock:
    """Training time: a stopwatch the loop stops (off) for compilation, checkpoints, grids and
    evaluations. It waits for the device where it stops or starts: queued GPU work counts right."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        # it starts as the first step (off: it compiles) ends, so that the wait for the first
        # batch (the data workers' start) is not training time
        self.seconds, self.steps, self.t0 = 0.0, 0, None

    @contextmanager
    def off(self, when=True):
        if not when:
            yield
            return
        self.sync()
        if self.t0 is not None:
            self.seconds += time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.sync()
            self.t0 = time.perf_counter()

    def lap(self):
        """-> (training seconds, steps timed) since the last lap."""
        self.sync()
        now = time.perf_counter()
        out = (self.seconds + now - self.t0, self.steps)
        self.seconds, self.steps, self.t0 = 0.0, 0, now
        return out


def step_flops(model, text_len, rows, m, fake, k, bf16):
    """-> {precision: FLOPs} of one process's step on `rows` rows, m of them jumping: the pass with
    gradient (forward and backward count 3 forwards) and the fake-score pass with gradient, in
    bf16 under autocast (else float32, TF32 on a GPU), and the judges' passes on the m rows (one,
    at k = 0 with the fake-score term on), in float32 always. None for a network without .flops
    (optional: the log then shows no MFU)."""
    if not hasattr(model, "flops"):
        return None
    judges = 0 if m == 0 else 1 if fake and k == 0 else 2
    trained = model.flops(text_len) * (3 * rows + 3 * m * fake)
    judged = model.flops(text_len) * judges * m
    return {"bf16": trained, "tf32": judged} if bf16 else {"tf32": trained + judged}


def saved_bytes(run, rows, weights):
    """Bytes autograd keeps for the backward pass of run(rows), a forward pass on `rows` rows on
    the CPU: every tensor it saves, each storage once, those in `weights` (counted apart) not."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(rows)
    return sum(saved.values())


def memory_estimate(cfg, text_dim, batch):
    """-> {fake: bytes} for fake False and True: the estimated peak memory of one process's step
    on `batch` rows, without and with the fake-score pass. Weights, their gradients, Adam's two
    moments and the EMA (5 float32 copies of the weights), plus the activations autograd saves,
    measured on the CPU at 2 and 4 rows and scaled linearly to the batch. With act_ckpt the
    blocks keep their input alone, and one block's activations live again while the backward pass
    recomputes it."""
    net = build_model(cfg, text_dim)  # a CPU copy: sizes, not values, matter
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    L, res, recipe = cfg["text_len"], cfg["res"], recipe_of(cfg)
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=cfg["bf16"])

    def cond(n):
        return (torch.randn(n, L, text_dim), torch.ones(n, L, dtype=torch.bool),
                torch.randn(n, text_dim))

    def step(rows, fake):
        with autocast:
            selfe.selfe_loss(net, torch.randn(rows, 3, res, res), cond(rows), cond(rows),
                             cond(rows) if fake else None, cond(rows), tau=1.0, recipe=recipe)

    def scaled(run, rows):  # the saved bytes of run at `rows`, from those at 2 and 4
        two, four = (saved_bytes(run, n, weights) for n in (2, 4))
        return two + (four - two) / 2 * (rows - 2)

    static = 5 * 4 * sum(p.numel() for p in net.parameters())  # 5 float32 copies
    out = {fake: static + scaled(lambda n: step(n, fake), batch) for fake in (False, True)}
    if getattr(net, "act_ckpt", False):  # a DiT's blocks
        N = L + (res // cfg["patch"]) ** 2  # tokens in the stream

        def block(rows):
            with autocast:
                net.blocks[0](torch.randn(rows, N, net.dim, dtype=dtype),
                              torch.randn(rows, net.dim), torch.ones(rows, 1, 1, N, dtype=bool))
        m = recipe.jump_rows(batch)  # the fake pass's rows
        for fake in (False, True):
            rows = batch + m * fake  # the rows of the passes with gradient: their inputs kept
            kept = len(net.blocks) * rows * N * net.dim * dtype.itemsize
            out[fake] += kept + scaled(block, batch)  # the widest pass's block recomputed
    return out


# Dense peaks in FLOP/s (datasheets) of bf16 and of TF32, for MFU. The first key the device name
# contains wins.
PEAKS = (("H100 PCIe", 756e12, 378e12), ("H100 NVL", 835e12, 418e12), ("H100", 989e12, 495e12),
         ("H200 NVL", 835e12, 418e12), ("H200", 989e12, 495e12), ("A100", 312e12, 156e12))


def peak_flops(name):
    """-> {precision: peak FLOP/s} of a GPU by its name, None for one we do not know."""
    return next(({"bf16": bf16, "tf32": tf32} for key, bf16, tf32 in PEAKS if key in name), None)


def mfu(flops, seconds, peaks):
    """The share of the time the FLOPs {precision: FLOPs} would take at their precisions' peaks."""
    return sum(f / peaks[precision] for precision, f in flops.items()) / seconds


def speed(seconds, steps, flops, batch, device):
    """-> {ms_per_step, img_per_s, mfu (known GPUs), peak_mem_gb}. flops: {precision: FLOPs} of
    one process's step (MFU is per GPU); batch: images per step, all processes."""
    out = {"ms_per_step": 1000 * seconds / steps, "img_per_s": batch * steps / seconds}
    cuda = device.type == "cuda"
    peaks = peak_flops(torch.cuda.get_device_name(device) if cuda else "cpu")
    if peaks and flops:
        out["mfu"] = mfu({p: f * steps for p, f in flops.items()}, seconds, peaks)
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # the process's peak resident memory (Linux reports kB)
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def progress_figures(rec):
    loss = float("nan") if rec["loss"] is None else rec["loss"]
    out = {"loss": f"{loss:.4f}", "img_s": f"{rec.get('img_per_s', float('nan')):.0f}",
           "tau": f"{rec['tau']:.2f}"}
    if "mfu" in rec:
        out["mfu"] = f"{100 * rec['mfu']:.1f}%"
    return out


def open_log(path):
    """log.jsonl for appending. A kill -9 may have cut its last line short: go on on a new line."""
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read() != b"\n"
    log = open(path, "a")
    if cut:
        log.write("\n")
    return log


def agree(flag, device):
    """True on every process if it is True on any: processes must stop at the same step."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextmanager
def shield(when=True):
    """SIGTERM held back while the block runs (a step that compiles), from this process and from
    every process started meanwhile: torch.compile's kernel-building processes, started by the
    first compile, keep it held back for good, so that a stop signal sent to the whole process
    group (timeout, torchrun, kill -TERM -PGID) cannot kill them in the middle of a build. This
    process takes it as the block ends: the step is done, the run saves and stops."""
    if not when or not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class Interrupt:
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second one stops
    at once, and so does the first once at_once is set (the final evaluation). Stopping at once
    raises KeyboardInterrupt. restore() puts the previous handlers back (notebooks, tests).
    last_save: where a run that stops without saving goes on from."""

    def __init__(self):
        self.requested, self.at_once = False, False
        self.last_save = "no checkpoint yet: start again"
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def saved(self, path, step, out):
        self.last_save = (f"the last checkpoint, {path}, is at step {step}: continue with "
                          f"--resume --out {out}")

    def handle(self, signum, frame):
        if self.at_once or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def minutes(seconds):
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"
