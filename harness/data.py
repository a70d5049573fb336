"""
The data a run trains on, other than the built-in shapes world (shapes.py): a folder of captioned
images loaded once into memory; and the batches of every step, seeded by step so that data workers
may render them ahead in any order and a resumed run sees the same ones.
"""
import json
import os
import signal
import threading

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .cli import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path, res):
    """Any image PIL reads -> RGB uint8 (res, res, 3), centre-cropped to a square and resized.
    Grayscale, palette, 16-bit and tiny images are converted; transparent pixels become white."""
    img = Image.open(path)
    img.load()  # decode now, so that a truncated file fails here
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: PIL's conversion clips it
        pixels = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((res, res), Image.BICUBIC))


def read_text(path):
    """A text file as UTF-8 whatever the locale; a BOM (as Notepad writes) is dropped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None


def read_metadata(path):
    """metadata.jsonl (Hugging Face imagefolder) -> {file_name: caption}."""
    caps = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not {"file_name", "text"} <= set(row):
            raise InputError(f"{path}, line {i}: need a JSON object with 'file_name' and 'text'")
        for k in ("file_name", "text"):
            if not isinstance(row[k], str):
                raise InputError(f"{path}, line {i}: '{k}' must be a string, not "
                                 f"{type(row[k]).__name__}")
        caps[os.path.normpath(row["file_name"])] = row["text"].strip()
    return caps


def scan_folder(root):
    """-> (every image under root, as a path relative to it; {image: caption}). Captions come from
    any metadata.jsonl (file_name relative to its own folder, subfolders allowed) or NAME.txt
    beside NAME.png. Hidden folders are skipped."""
    files, caps = [], {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        files += [os.path.normpath(os.path.join(rel, n)) for n in names
                  if n.lower().endswith(IMAGE_EXTS)]
        if "metadata.jsonl" in names:
            caps.update({os.path.normpath(os.path.join(rel, name)): text for name, text
                         in read_metadata(os.path.join(folder, "metadata.jsonl")).items()})
    for f in files:
        txt = os.path.join(root, os.path.splitext(f)[0] + ".txt")
        if f not in caps and os.path.exists(txt):
            caps[f] = read_text(txt).strip()
    return sorted(files), caps


class FolderData:
    """A folder of captioned images, loaded once into memory at the training resolution. Images
    without a caption, with an empty one, and files that do not decode are skipped and counted;
    none left: an error."""

    def __init__(self, root, res, quiet=False):
        if not os.path.isdir(root):
            raise InputError(f"--data {root}: no such folder (use 'shapes' for the built-in data)")
        files, caps = scan_folder(root)
        if not files:
            raise InputError(f"--data {root}: no images in it ({', '.join(IMAGE_EXTS)})")
        images, self.captions, broken = [], [], []
        uncaptioned = [n for n in files if n not in caps]
        empty = [n for n in files if caps.get(n) == ""]
        captioned = [n for n in files if caps.get(n)]
        for name in tqdm(captioned, desc="images", disable=quiet or not captioned):
            try:
                images.append(load_image(os.path.join(root, name), res))
                self.captions.append(caps[name])
            except Exception:  # PIL raises OSError, ValueError, SyntaxError, ... for damaged files
                broken.append(name)
        unmatched = sorted(set(caps) - set(files))
        skipped = ", ".join(f"{len(names)} {why}" + (f" (e.g. {names[0]})" if names else "")
                            for names, why in ((uncaptioned, "without a caption"),
                                               (empty, "with an empty one"),
                                               (broken, "unreadable"))) + (
            f"; {len(unmatched)} captions name no image here (e.g. {unmatched[0]})"
            if unmatched else "")
        if not images:
            raise InputError(f"--data {root}: no usable images: {skipped}; captions go in "
                             f"metadata.jsonl or NAME.txt beside NAME.png")
        if not quiet:
            print(f"data: {len(images)} images from {root}; skipped {skipped}")
        self.images = np.stack(images)  # (N, res, res, 3) uint8

    def batch(self, n, rng):
        """-> ((n, res, res, 3) uint8 images, their n captions)."""
        idx = rng.integers(len(self.images), size=n)
        return self.images[idx], [self.captions[i] for i in idx]


def step_seed(seed, rank, step):
    """One seed per (run seed, process, step): no step's randomness depends on earlier steps."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Batches(torch.utils.data.Dataset):
    """Item k is the batch of step k, so DataLoader workers may render ahead in any order: uint8
    images (B, res, res, 3) (a quarter of float32's bytes in shared memory) and their captions' row
    ids in a TextTable, `rows`."""

    def __init__(self, data, batch_size, seed, rank, rows):
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank
        self.rows = rows

    def __getitem__(self, step):
        rng = np.random.default_rng(step_seed(self.seed, self.rank, step))
        images, captions = self.data.batch(self.batch_size, rng)
        return torch.from_numpy(images), torch.tensor([self.rows[c] for c in captions])


def loader(batches, steps, workers, pin):
    """The batches of these steps, in order; workers > 0 render them ahead in other processes."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=4 if workers else None,
                                       worker_init_fn=shield_worker)


def shield_worker(worker_id):
    """Runs in each data worker as it starts. A stop signal sent to the whole process group
    (Ctrl-C, timeout, torchrun, a scheduler) is for the main process, which finishes its step,
    saves, then closes its workers: a worker ignores SIGINT, and SIGTERM from anyone but the main
    process (whose SIGTERM ends a worker that does not stop when asked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell who sent a signal
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # kept for the thread below

    def wait_for_the_main_process():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)
    threading.Thread(target=wait_for_the_main_process, daemon=True).start()
