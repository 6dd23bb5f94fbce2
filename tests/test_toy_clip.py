"""toy_clip.py, the miniature CLIP pretrained on the toy world: its loss is CLIP's, its file is an OpenAI file
that clip.load reads, the shipped weights know the toy world's colours on worlds they never saw, and training
trains. (The pretraining itself is run by hand: docs/toy_clip.md.)"""
import math
import types

import pytest
import torch
import torch.nn.functional as F

import axf
import clip
import config
import toy
import toy_clip


def explicit_clip_loss(image_features, text_features, positives, logit_scale):
    """The loss written out pair by pair: each image's -log softmax over the texts at its true texts, and each
    text's over the images at its true images, every true pair weighted 1 / (how many the row has)."""
    a = F.normalize(image_features, dim=-1).tolist()
    b = F.normalize(text_features, dim=-1).tolist()
    s = math.exp(logit_scale)
    logit = [[s * sum(x * y for x, y in zip(u, v)) for v in b] for u in a]
    N, M = len(a), len(b)
    images = texts = 0.0
    for i in range(N):
        true = [j for j in range(M) if positives[i][j]]
        log_z = math.log(sum(math.exp(logit[i][k]) for k in range(M)))
        images += sum(-(logit[i][j] - log_z) for j in true) / len(true)
    for j in range(M):
        true = [i for i in range(N) if positives[i][j]]
        log_z = math.log(sum(math.exp(logit[k][j]) for k in range(N)))
        texts += sum(-(logit[i][j] - log_z) for i in true) / len(true)
    return (images / N + texts / M) / 2


def test_clip_loss_matches_an_explicit_double_loop_with_repeated_captions():
    """Five images of three captions (one caption has three images): the soft-target loss is, entry by entry,
    the mean -log softmax at the true pairs, both ways."""
    torch.manual_seed(0)
    image_features, text_features = torch.randn(5, 8), torch.randn(3, 8)
    caption_of_image = [0, 1, 0, 2, 0]
    positives = torch.tensor([[c == j for j in range(3)] for c in caption_of_image])
    loss = toy_clip.clip_loss(image_features, text_features, positives, torch.tensor(2.0))
    expected = explicit_clip_loss(image_features, text_features, positives.tolist(), 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_with_distinct_captions_is_clips_own():
    """With one text per image (positives = identity) it is Fig. 3's pseudocode: labels = arange(n),
    (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2."""
    torch.manual_seed(1)
    image_features, text_features = torch.randn(6, 8), torch.randn(6, 8)
    logits = math.exp(1.5) * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss = toy_clip.clip_loss(image_features, text_features, torch.eye(6, dtype=torch.bool), torch.tensor(1.5))
    torch.testing.assert_close(loss, expected)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped file, decompressed into a temporary folder and read by clip.load like any OpenAI file."""
    path = toy.ensure_toy_clip(toy_clip.SHIPPED, tmp_path_factory.mktemp("toy_clip"))
    return path, clip.load(path)[0]


def test_shipped_file_is_small_and_loads_through_clip_load_with_its_sizes(shipped):
    """Under 2.5 MB in the repository; clip.load reads every size back from the shapes, and they are SIZES."""
    path, model = shipped
    assert toy_clip.SHIPPED.stat().st_size < 2.5e6
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert model.token_embedding.weight.shape == (49408, 64) and model.text_projection.shape == (64, 256)
    assert model.visual.input_resolution == 64 and model.visual.conv1.kernel_size == (16, 16)
    assert model.visual.conv1.out_channels == toy_clip.SIZES["vision_width"]
    assert len(model.visual.transformer.resblocks) == toy_clip.SIZES["vision_layers"]
    assert len(model.transformer.resblocks) == toy_clip.SIZES["transformer_layers"]
    assert model.logit_scale.exp().item() <= 100 + 1e-3  # CLIP's clamp


def test_shipped_clip_tells_swapped_colours_apart_on_an_unseen_world(shipped, tmp_path):
    """On a toy world it never saw (seed 100, rendered small to stay fast), "The green cable is replaced by a
    repeated gray cable" scores its own images above those of "The gray cable is replaced by a repeated green
    cable", for every colour-swapped pair of captions: the words' order, not only their bag, reaches the feature.
    The random CLIP gives such captions a cosine of 0.975 and cannot."""
    _, model = shipped
    world = toy_clip.load_world([100], tmp_path, categories=("cable",), render_size=64)
    captions = world["captions"]
    swapped, _ = toy_clip.colour_pairs([c for c in captions if c])
    assert len(swapped) == 3
    with torch.no_grad():
        images = clip.normalize_images(world["images"].float() / 255, 64)
        image_f = F.normalize(model.encode_image(images), dim=-1)
        for a, b in swapped:
            for caption, other in ((a, b), (b, a)):
                text_f = F.normalize(model.encode_text(clip.tokenize([caption])), dim=-1)[0]
                own = [image_f[i] @ text_f for i, c in enumerate(captions) if c == caption]
                theirs = [image_f[i] @ text_f for i, c in enumerate(captions) if c == other]
                assert min(own) > max(theirs), f"{caption!r} prefers an image of {other!r}"


def test_training_lowers_the_loss_and_the_file_keeps_the_model(tmp_path):
    """A few steps on a tiny world lower the loss of a fixed batch; the written file holds the same model (fp16),
    keeps the temperature within CLIP's clamp, and zeroes the embedding of every word no text uses."""
    world = toy_clip.load_world([1], tmp_path, categories=("pill",), render_size=32)
    args = types.SimpleNamespace(anomalies=8, normals=4, lr=1e-3, warmup_steps=1, steps=15, weight_decay=0.2, seed=0)
    model = toy_clip.build_model(0)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above the clamp: the first step must bring it back to log(100)

    def fixed_batch_loss():
        with torch.no_grad():
            return toy_clip.batch_loss(model.eval(), world, args, torch.Generator().manual_seed(123)).item()

    before = fixed_batch_loss()
    toy_clip.train(model, world, args, log_every=100)
    assert fixed_batch_loss() < before - 0.1
    assert model.logit_scale.item() <= math.log(100) + 1e-6

    texts = toy_clip.all_texts(world)
    written = toy_clip.save_toy_clip(model, tmp_path / "t.pt.gz", texts)
    loaded = clip.load(toy.ensure_toy_clip(written, tmp_path))[0]
    with torch.no_grad():
        tokens = clip.tokenize(texts[:3])
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0.02, rtol=0.02)
    used = {clip.START_ID, clip.END_ID} | {t for text in texts for t in clip.bpe_tokens(text)}
    nonzero = set(loaded.token_embedding.weight.abs().sum(1).nonzero()[:, 0].tolist())
    assert nonzero == used


def test_a_toy_run_conditions_on_the_toy_clip_by_default_and_says_so(capsys):
    """The toy preset's CLIP is the shipped toy CLIP (clip.load of its file); --clip random gives the random one."""
    settings = config.resolve("toy")
    model = axf.build_clip(settings)
    assert "CLIP: the toy world's, pretrained by toy_clip.py" in capsys.readouterr().out
    shipped = clip.load(toy.ensure_toy_clip())[0].state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    assert axf.clip_width(model) == settings["context_dim"] == 256
    random_one = axf.build_clip(dict(settings, clip="random"))
    assert "CLIP: a small random one" in capsys.readouterr().out
    assert not torch.equal(random_one.token_embedding.weight, model.token_embedding.weight)
