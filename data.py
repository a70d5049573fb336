"""
Where training batches come from: the built-in shapes world, or a folder of your captioned images. Each source
draws a batch from a numpy Generator; the generator of step k is seeded by (run seed, process, k), so the batch of
a step never depends on the steps before it, and a resumed run, or DataLoader workers rendering ahead in any
order, see exactly the batches of an uninterrupted run.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import shapes
from selfe import InputError


def to_model(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], what the model trains on."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class ShapesData:
    """The shapes world as training data: infinite, seeded, nothing to download."""

    def __init__(self, res=32):
        self.res = res
        self.captions = shapes.all_prompts()  # every caption a batch can hold

    def batch(self, n, rng):
        metas = [shapes.random_prompt(rng) for _ in range(n)]
        images = np.stack([shapes.render(shapes.scene_for(m, rng), self.res) for m in metas])
        return to_model(images), [m["prompt"] for m in metas]


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path, res):
    """Any image PIL reads -> RGB uint8 (res, res, 3), centre-cropped to a square and resized. Grayscale, palette,
    16-bit and tiny images are converted; transparent pixels become white."""
    img = Image.open(path)
    img.load()  # decode now, so a truncated file fails here
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: PIL's own conversion would clip it
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((res, res), Image.BICUBIC))


def read_captions(root):
    """{file name: caption} from root/metadata.jsonl (Hugging Face imagefolder) or sidecar .txt files."""
    meta = os.path.join(root, "metadata.jsonl")
    if os.path.exists(meta):
        caps = {}
        with open(meta) as f:
            for i, line in enumerate(f, 1):
                try:
                    row = json.loads(line) if line.strip() else None
                    if row is not None:
                        caps[row["file_name"]] = row["text"]
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{meta}, line {i}: need a JSON object with 'file_name' and 'text'") from None
        return caps
    caps = {}
    for name in sorted(os.listdir(root)):
        txt = os.path.join(root, os.path.splitext(name)[0] + ".txt")
        if name.lower().endswith(IMAGE_EXTS) and os.path.exists(txt):
            with open(txt, errors="replace") as f:
                caps[name] = f.read().strip()
    return caps


class FolderData:
    """A folder of captioned images, loaded once into memory at the training resolution. Images without a caption
    and files that do not decode are skipped and counted; no usable image at all is an error."""

    def __init__(self, root, res, quiet=False):
        if not os.path.isdir(root):
            raise InputError(f"--data {root}: no such folder (use 'shapes' for the built-in data)")
        files = sorted(n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTS))
        if not files:
            raise InputError(f"--data {root}: no images in it ({', '.join(IMAGE_EXTS)})")
        caps = read_captions(root)
        images, self.captions, broken = [], [], []
        uncaptioned = [n for n in files if not caps.get(n)]
        for name in tqdm([n for n in files if caps.get(n)], desc="images", disable=quiet):
            try:
                images.append(load_image(os.path.join(root, name), res))
                self.captions.append(caps[name])
            except Exception:  # PIL raises OSError, ValueError, SyntaxError, ... for damaged files
                broken.append(name)
        skipped = f"{len(uncaptioned)} without a caption, {len(broken)} unreadable" + (
            f" (e.g. {(uncaptioned + broken)[0]})" if uncaptioned or broken else "")
        if not images:
            raise InputError(f"--data {root}: no usable images: {skipped}; captions go in metadata.jsonl "
                             f"or NAME.txt beside NAME.png")
        if not quiet:
            print(f"data: {len(images)} images from {root}; skipped {skipped}")
        self.images = np.stack(images)  # (N, res, res, 3) uint8

    def batch(self, n, rng):
        idx = rng.integers(len(self.images), size=n)
        return to_model(self.images[idx]), [self.captions[i] for i in idx]


def from_config(cfg, quiet=False):
    """The --data of a run: the shapes world, or the folder it names."""
    return ShapesData(cfg["res"]) if cfg["data"] == "shapes" else FolderData(cfg["data"], cfg["res"], quiet)


def step_seed(seed, rank, step):
    """One seed per (run seed, process, step): data, times and noise of a step never depend on the steps before."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Batches(torch.utils.data.Dataset):
    """Item k is the batch of step k, so DataLoader workers can render ahead of the GPU in any order."""

    def __init__(self, data, batch_size, seed, rank):
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank

    def __getitem__(self, step):
        return self.data.batch(self.batch_size, np.random.default_rng(step_seed(self.seed, self.rank, step)))


def batches(dataset, steps, workers, pin):
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=4 if workers else None)
