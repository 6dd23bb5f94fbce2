"""clip.py: OpenAI-compatible CLIP (tokenizer, ViT towers, checkpoint loading).

Parity numbers come from OpenAI's reference code via tests/fixtures/make_clip_fixtures.py
(clip_reference.json); the weights are rebuilt here from the script's seeded generator."""
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import clip

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(embed_dim=32, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=1000, transformer_width=64, transformer_heads=1, transformer_layers=1)


@pytest.fixture(scope="module")
def ref():
    """The reference outputs and the model rebuilt with the script's weights."""
    spec = importlib.util.spec_from_file_location("make_clip_fixtures", FIXTURES / "make_clip_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports only torch at module level; the reference library only in main()
    data = json.loads((FIXTURES / "clip_reference.json").read_text())
    weights = script.random_weights([(k, tuple(s)) for k, s in data["shapes"]], data["seed"])
    for key, expected in data["checksums"].items():
        got = script.checksum(weights[key])
        assert got == pytest.approx(expected, rel=1e-5), f"{key}: this torch build draws other random weights"
    return data, weights, script


def random_tokens(n, vocab_size, length=77, seed=0):
    """Token rows whose largest id (the 'end token') sits at a random position, as tokenize() makes them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size - 1, (n, length), generator=g)
    ends = torch.randint(2, length, (n,), generator=g)
    tokens[torch.arange(n), ends] = vocab_size - 1
    return tokens


def tiny_checkpoint(**overrides):
    torch.manual_seed(0)
    return clip.CLIP(**{**TINY, **overrides}).eval().state_dict()


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("cfg", [
    TINY,
    dict(TINY, embed_dim=48, image_resolution=24, vision_layers=2, vision_width=128, vision_patch_size=4,
         context_length=20, transformer_width=128, transformer_heads=4, transformer_layers=2),
])
def test_model_output_shapes(cfg):
    """Each tower maps a batch to [B, embed_dim]; logits are [B_img, B_txt] and their transpose."""
    model = clip.CLIP(**cfg).eval()
    R = cfg["image_resolution"]
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, R, R))
        txt = model.encode_text(random_tokens(2, cfg["vocab_size"], cfg["context_length"]))
        per_image, per_text = model(torch.randn(3, 3, R, R), random_tokens(2, cfg["vocab_size"], cfg["context_length"]))
    assert img.shape == (3, cfg["embed_dim"]) and txt.shape == (2, cfg["embed_dim"])
    assert per_image.shape == (3, 2) and torch.equal(per_text, per_image.t())


def test_parameter_names_and_shapes_equal_openai_state_dict(ref):
    """OpenAI checkpoints load strictly only if every key and shape is OpenAI's, in the same order."""
    data = ref[0]
    ours = [(k, list(v.shape)) for k, v in clip.CLIP(**data["config"]).state_dict().items()]
    assert ours == [(k, s) for k, s in data["shapes"]]


def test_text_is_causal():
    """A token's feature must not depend on later tokens (the text tower is a causal transformer)."""
    model = clip.CLIP(**TINY).eval()
    a = random_tokens(1, TINY["vocab_size"], seed=1)
    a[0, 10:] = 0
    a[0, 5] = TINY["vocab_size"] - 1  # end token at position 5
    b = a.clone()
    b[0, 6:] = 7  # change only tokens after the end token
    with torch.no_grad():
        assert torch.allclose(model.encode_text(a), model.encode_text(b), atol=1e-6)


# ----------------------------------------------------------------------------- parity with OpenAI


def test_encode_text_matches_openai_reference(ref):
    """Same weights, same tokens: the text features equal OpenAI's to 1e-4 relative."""
    data, weights, _ = ref
    model = clip.build_model(weights)
    tokens = clip.tokenize(data["texts"], truncate=True)
    with torch.no_grad():
        got = model.encode_text(tokens)
    want = torch.tensor(data["text_features"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_encode_image_and_logits_match_openai_reference(ref):
    """Same weights, same pixels: image features and logits equal OpenAI's to 1e-4 relative."""
    data, weights, script = ref
    model = clip.build_model(weights)
    R = data["config"]["image_resolution"]
    images = torch.randn(3, 3, R, R, generator=torch.Generator().manual_seed(script.SEED + 2))
    with torch.no_grad():
        got = model.encode_image(images)
        logits, _ = model(images, clip.tokenize(data["texts"], truncate=True))
    want = torch.tensor(data["image_features"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    want = torch.tensor(data["logits_per_image"])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_tokenize_matches_openai_token_for_token(ref):
    """Checkpoints were trained on OpenAI's token ids: every id must match, and too-long texts raise alike."""
    data = ref[0]
    for text, want, too_long in zip(data["token_texts"], data["tokens"], data["too_long_raises"]):
        row = clip.tokenize(text, truncate=True)[0]
        assert row[row > 0].tolist() == want, text
        if too_long:
            with pytest.raises(RuntimeError, match="too long for context length 77"):
                clip.tokenize(text)


def test_preprocess_matches_openai_reference(ref):
    """preprocess (resize short side, centre crop, RGB, normalise) equals OpenAI's on odd-sized images."""
    data, _, script = ref
    preprocess = clip.make_preprocess(data["config"]["image_resolution"])
    for image, want in zip(script.odd_images(), data["preprocess"]):
        got = preprocess(image)
        assert got.shape == (3, 32, 32)
        torch.testing.assert_close(got.flatten(), torch.tensor(want), rtol=0, atol=1e-3)


def test_normalize_images_is_clip_normalisation_at_model_size():
    """At the model's resolution the tensor path is exactly (x - mean) / std per channel."""
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(clip.MEAN).view(1, 3, 1, 1), torch.tensor(clip.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.normalize_images(x, 32), (x - mean) / std)


def test_normalize_images_close_to_pil_preprocess():
    """Resizing a tensor batch gives nearly what preprocess gives for the same picture as a PIL image."""
    g = torch.Generator().manual_seed(0)
    smooth = nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(60, 80), mode="bilinear")
    pil = Image.fromarray((smooth[0].permute(1, 2, 0) * 255).round().byte().numpy())
    want = clip.make_preprocess(32)(pil)
    got = clip.normalize_images(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None] / 255, 32)
    assert got.shape == (1, 3, 32, 32)
    assert (got[0] - want).abs().mean() < 0.02


def test_normalize_images_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip.normalize_images(torch.rand(3, 32, 32))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenize_contract():
    """OpenAI's layout: [N, 77] long, start 49406, end 49407 last, zeros after; a str gives one row."""
    tokens = clip.tokenize(["a photo of a cat", "a"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert torch.equal(tokens[:, 0], torch.tensor([49406, 49406]))
    assert tokens[1, 2] == 49407 and (tokens[1, 3:] == 0).all()  # "a" is one token
    assert torch.equal(clip.tokenize("a photo of a cat"), tokens[:1])
    assert clip.tokenize("a", context_length=5).shape == (1, 5)


def test_too_long_text_raises_unless_truncated():
    """A silently cut caption would change its meaning; truncate=True keeps the end token last."""
    text = "crack " * 100
    with pytest.raises(RuntimeError, match="is too long for context length 77"):
        clip.tokenize(text)
    tokens = clip.tokenize(text, truncate=True)
    assert tokens[0, -1] == 49407 and (tokens[0] > 0).all()


@pytest.mark.parametrize("text", [
    "A Photo of a CAT", "  many   spaces\tand\nnewlines ", "fish &amp; chips", "naïve café Straße",
    "emoji 🙂 here", "日本語のテキスト", "hello, world! (3.14)",
])
def test_decode_inverts_encode_up_to_word_spacing(text):
    """BPE is lossless on the cleaned text: decoding gives it back, up to spaces after word ends."""
    tokenizer = clip._tokenizer or clip.SimpleTokenizer()
    decoded = tokenizer.decode(tokenizer.encode(text))
    cleaned = clip.clean_text(text)
    assert decoded.replace(" ", "") == cleaned.replace(" ", "")
    if all(c.isalpha() or c == " " for c in cleaned):  # words only: exact, with one trailing space
        assert decoded == cleaned + " "


def test_clean_text_normalises_whitespace_entities_and_case():
    assert clip.clean_text("  Fish &amp;amp;\t\tChips \n") == "fish & chips"


def test_vocabulary_has_49408_tokens():
    tokenizer = clip.SimpleTokenizer()
    assert len(tokenizer.encoder) == 49408
    assert tokenizer.encoder["<|startoftext|>"] == 49406 and tokenizer.encoder["<|endoftext|>"] == 49407


# ----------------------------------------------------------------------------- loading


def test_build_model_infers_every_size():
    """No size table: widths, layers, heads, patch, resolution and context come from tensor shapes."""
    cfg = dict(TINY, embed_dim=24, image_resolution=20, vision_layers=3, vision_width=128, vision_patch_size=5,
               context_length=12, vocab_size=300, transformer_width=128, transformer_heads=2, transformer_layers=2)
    torch.manual_seed(0)
    source = clip.CLIP(**cfg).eval()
    model = clip.build_model(source.state_dict())
    v = model.visual
    assert (v.input_resolution, v.conv1.kernel_size, len(v.transformer.resblocks), v.output_dim) == (20, (5, 5), 3, 24)
    assert v.transformer.resblocks[0].attn.n_head == 2 and model.transformer.resblocks[0].attn.n_head == 2
    assert (model.context_length, model.vocab_size, len(model.transformer.resblocks)) == (12, 300, 2)
    assert not model.training
    tokens = random_tokens(2, 300, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), source.encode_text(tokens))


def test_load_plain_state_dict(tmp_path):
    """A torch.save'd state dict loads, and preprocess targets the checkpoint's resolution."""
    sd = tiny_checkpoint()
    torch.save(sd, tmp_path / "clip.pt")
    model, preprocess = clip.load(str(tmp_path / "clip.pt"))
    assert preprocess(Image.new("RGB", (40, 30))).shape == (3, 16, 16)
    tokens = random_tokens(2, TINY["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), clip.build_model(sd).encode_text(tokens))


class Archive(nn.Module):
    """Mimics OpenAI's TorchScript release: the CLIP modules at top level plus the scalar tensors
    input_resolution, context_length and vocab_size, which appear as entries of its state dict."""

    def __init__(self, model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.register_buffer("input_resolution", torch.tensor(model.visual.input_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, x):
        return x * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notice
def test_load_torchscript_archive(tmp_path):
    """OpenAI distributes TorchScript archives; their extra state-dict entries are dropped on load."""
    torch.manual_seed(0)
    source = clip.CLIP(**TINY).eval()
    torch.jit.save(torch.jit.trace(Archive(source), torch.ones(())), str(tmp_path / "ViT-tiny.pt"))
    keys = torch.jit.load(str(tmp_path / "ViT-tiny.pt")).state_dict().keys()
    assert {"input_resolution", "context_length", "vocab_size"} <= set(keys)
    model, _ = clip.load(str(tmp_path / "ViT-tiny.pt"))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), source.encode_image(images))


def test_fp16_checkpoint_runs_in_fp32_on_cpu(tmp_path):
    """OpenAI's weights are stored in fp16; on the CPU they become fp32 (fp16 matmuls are slow or missing)."""
    sd = {k: v.half() for k, v in tiny_checkpoint().items()}
    torch.save(sd, tmp_path / "half.pt")
    model, _ = clip.load(str(tmp_path / "half.pt"), device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = clip.build_model({k: v.float() for k, v in sd.items()}).encode_image(images)
        torch.testing.assert_close(model.encode_image(images), want)


def test_half_model_and_bf16_autocast_stay_close_to_fp32():
    """LayerNorm runs in fp32, so a half model (as loaded on a GPU) and bf16 autocast give fp32's features."""
    torch.manual_seed(0)
    model = clip.CLIP(**TINY).eval()
    tokens = random_tokens(2, TINY["vocab_size"])
    with torch.no_grad():
        want = model.encode_text(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.encode_text(tokens).float()
        half = model.half().encode_text(tokens)
    assert half.dtype == torch.float16
    assert (half.float() - want).abs().max() < 0.05 * want.abs().max()
    assert (bf16 - want).abs().max() < 0.1 * want.abs().max()


def test_resnet_checkpoint_is_refused(tmp_path):
    """RN50-style checkpoints have no ViT tower here: say so instead of failing on a missing key."""
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "text_projection": torch.zeros(512, 1024)}
    with pytest.raises(ValueError, match="only ViT checkpoints are supported"):
        clip.build_model(sd)
    torch.save(sd, tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="RN50.pt: .*only ViT"):
        clip.load(str(tmp_path / "RN50.pt"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: CLIP checkpoint not found"):
        clip.load(str(tmp_path / "nope.pt"))


def test_non_pytorch_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt: not a PyTorch checkpoint"):
        clip.load(str(tmp_path / "notes.txt"))


def test_non_clip_checkpoint_is_refused(tmp_path):
    """A valid PyTorch file holding something else (e.g. a VAE) must not load as CLIP."""
    torch.save({"encoder.conv_in.weight": torch.zeros(3)}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="vae.pt: not a CLIP checkpoint"):
        clip.load(str(tmp_path / "vae.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="tensor.pt: not a CLIP checkpoint"):
        clip.load(str(tmp_path / "tensor.pt"))


def test_truncated_checkpoint_is_refused(tmp_path):
    """An interrupted download is the usual cause: name it rather than showing a zip-reader error."""
    torch.save(tiny_checkpoint(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: truncated or corrupted checkpoint"):
        clip.load(str(tmp_path / "cut.pt"))


# ----------------------------------------------------------------------------- Stable Diffusion's text tower


def test_tokenize_pads_with_the_end_token_for_stable_diffusion():
    """SD-1.x pads with <|endoftext|> (49407); OpenAI's default zero padding is unchanged."""
    texts = ["a photo of a bottle", "a cable"]
    zeros = clip.tokenize(texts)
    sd = clip.tokenize(texts, pad_id=49407)
    assert (zeros == 0).sum() > 100 and torch.equal(sd, zeros.masked_fill(zeros == 0, 49407))


def test_encode_text_is_the_end_token_of_encode_text_tokens_projected():
    """encode_text_tokens is every token's final-layer-norm state; encode_text pools the (first) end token
    and projects it, also with SD's end-token padding."""
    model = clip.CLIP(**TINY).eval()
    tokens = random_tokens(3, TINY["vocab_size"])
    tokens[0, 40:] = TINY["vocab_size"] - 1  # end-token padding after the end token
    with torch.no_grad():
        states = model.encode_text_tokens(tokens)
        pooled = states[torch.arange(3), tokens.argmax(-1)] @ model.text_projection
        torch.testing.assert_close(model.encode_text(tokens), pooled)
    assert states.shape == (3, 77, TINY["transformer_width"])


def test_text_only_clip_holds_only_the_text_tower():
    """vision_layers=0 builds SD's text encoder: no image tower, projection or temperature."""
    model = clip.CLIP(None, None, 0, None, None, 77, 1000, 64, 1, 2)
    assert all(not k.startswith(("visual.", "text_projection", "logit_scale")) for k in model.state_dict())
    assert model.encode_text_tokens(random_tokens(2, 1000)).shape == (2, 77, 64)


# ----------------------------------------------------------------------------- files that claim more than they hold


def not_built_outside_meta(monkeypatch):
    """Fail the test if a CLIP is built anywhere but on the meta device (where it takes no memory)."""
    init = clip.CLIP.__init__

    def checked(self, *args, **kwargs):
        assert torch.empty(()).is_meta, "a CLIP was built before the file was checked"
        init(self, *args, **kwargs)
    monkeypatch.setattr(clip.CLIP, "__init__", checked)


def test_a_state_dict_whose_tensor_repeats_one_number_is_refused_before_building(tmp_path, monkeypatch):
    """torch.zeros(1).expand(N, width) takes 4 bytes in the file; a token embedding of N rows once built."""
    sd = dict(tiny_checkpoint(), **{"token_embedding.weight": torch.zeros(1).expand(1_000_000, 64)})
    torch.save(sd, tmp_path / "clip.pt")
    not_built_outside_meta(monkeypatch)
    with pytest.raises(ValueError, match=r"clip.pt: tensor token_embedding.weight claims shape \[1000000, 64\]"):
        clip.load(str(tmp_path / "clip.pt"))


def test_layer_keys_that_claim_more_layers_than_tensors_are_refused_before_building(tmp_path, monkeypatch):
    """Layer counts are key counts: a thousand one-number keys would build a thousand layers."""
    sd = dict(tiny_checkpoint(), **{f"transformer.resblocks.{i}.ln_1.weight": torch.zeros(1) for i in range(1, 1000)})
    torch.save(sd, tmp_path / "clip.pt")
    sd = tiny_checkpoint()
    sd["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(256, 1)  # the width read elsewhere says [256, 64]
    torch.save(sd, tmp_path / "misshapen.pt")
    not_built_outside_meta(monkeypatch)
    with pytest.raises(ValueError, match=r"clip.pt: not a CLIP state dict of one model \(1 \+ 1000 layers of 12 "
                                         r"tensors, but 1037 tensors\)"):
        clip.load(str(tmp_path / "clip.pt"))
    with pytest.raises(ValueError, match=r"misshapen.pt: not a CLIP state dict of one model \(missing \[\], "
                                         r"unexpected \[\], misshapen \['transformer.resblocks.0.mlp.c_fc.weight'\]\)"):
        clip.load(str(tmp_path / "misshapen.pt"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notice
def test_a_torchscript_archive_is_checked_like_a_state_dict(tmp_path, monkeypatch):
    """An OpenAI-style archive whose buffer repeats one number is refused after torch.jit.load (which builds only
    what the file holds); one whose code runs when it loads (a __setstate__ could build tensors of any size) is
    refused before torch.jit.load is called."""
    torch.manual_seed(0)
    archive = Archive(clip.CLIP(**TINY).eval())
    archive.register_buffer("vocab_size", torch.zeros(1).expand(1_000_000))
    torch.jit.save(torch.jit.trace(archive, torch.ones(())), str(tmp_path / "ViT-tiny.pt"))
    not_built_outside_meta(monkeypatch)
    with pytest.raises(ValueError, match=r"ViT-tiny.pt: tensor vocab_size claims shape \[1000000\]"):
        clip.load(str(tmp_path / "ViT-tiny.pt"))
    with zipfile.ZipFile(tmp_path / "code.pt", "w") as forged:  # the entries torch.jit.save writes, code with a hook
        forged.writestr("code/constants.pkl", b"\x80\x02).")
        forged.writestr("code/code/__torch__/model.py", "def __setstate__(self, state: Tuple[Tensor]) -> None:\n")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran the archive"))
    with pytest.raises(ValueError, match=r"code.pt: a TorchScript archive whose code runs when it loads"):
        clip.load(str(tmp_path / "code.pt"))
