"""The AnomalyXFusion method (paper §4): MIF embeddings, aggregator, DDF, ablations, loss, blended sampling."""
import pytest
import torch

import axf
import checkpoints
import cli
import clip
import config
import data
from mask_encoder import LocationTokens, MaskAutoencoder, MaskEncoder


def tiny_config(**overrides):
    resolved = config.resolve("toy", dict(
        image_size=16, vae_channels=32, vae_channel_mult=(1, 2), unet_channels=32, unet_channel_mult=(1, 2),
        unet_num_res_blocks=1, unet_attention_levels=(0, 1), unet_num_heads=2, num_tokens=3, context_dim=32,
        mask_channels=8, mask_feature_channels=16, num_diffusion_steps=100))
    resolved.update(overrides)
    return resolved


def tiny_clip(width):
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=width, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def tiny_model(**overrides):
    config = tiny_config(**overrides)
    model = axf.AnomalyXFusion(config, tiny_clip(config["context_dim"]), {"toy": ["crack", "hole"]})
    # the UNet's zero-initialised output layers would hide every input: give them weights
    torch.manual_seed(1)
    for name, p in model.unet.named_parameters():
        if p.dim() > 1 and not p.abs().sum():
            p.data.normal_(0, 0.05)
    return model.eval()


def example_batch(B=2, S=16):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(B, 1, S, S)
    masks[:, :, 4:10, 5:11] = 1
    return dict(images=torch.rand(B, 3, S, S, generator=g), masks=masks,
                captions=["a red crack", "a blue hole"][:B] + ["x"] * max(0, B - 2),
                texture_ids=torch.tensor([1, 2] * B)[:B])


@pytest.mark.parametrize("k,d", [(1, 32), (3, 32), (4, 64)])
def test_each_embedding_has_k_tokens_of_width_d(k, d):
    """Eq. (1)-(5): semantic, location and textural embeddings are [B, k, d]; the context is [B, 3k, d]."""
    model = tiny_model(num_tokens=k, context_dim=d)
    b = example_batch()
    assert axf.unit_tokens(model.mif.encode_captions(b["captions"]), k).shape == (2, k, d)
    assert model.mif.location(model.mif.mask_encoder(b["masks"])).shape == (2, k, d)
    assert model.mif.texture_tokens[b["texture_ids"]].shape == (2, k, d)
    t = torch.tensor([5, 50])
    assert model.condition(b["captions"], b["masks"], b["texture_ids"], t).shape == (2, 3 * k, d)


def test_semantic_tokens_are_unit_direction_repeats():
    """Eq. (1): e_sem is the CLIP text feature, L2-normalised (then scaled by sqrt(d)), repeated k times."""
    model = tiny_model()
    features = model.mif.encode_captions(["a red crack"])
    tokens = axf.unit_tokens(features, 3)
    expected = features[0] / features[0].norm() * 32**0.5
    assert torch.allclose(tokens[0], expected.expand(3, -1), atol=1e-5)


def test_centred_captions_have_zero_mean_and_each_caption_counts_once():
    """center_captions subtracts the mean CLIP feature of the distinct captions before Eq. (1)'s norm."""
    model = tiny_model()
    captions = ["a red crack", "a blue hole", "a green hole"]
    assert not model.mif.text_mean.any()  # untouched: Eq. (1) exactly
    model.mif.center_captions(captions + ["a red crack"] * 5)  # repeats do not tilt the mean
    centred = model.mif.encode_captions(captions) - model.mif.text_mean
    torch.testing.assert_close(centred.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    t, masks, ids = torch.tensor([5, 5, 5]), torch.zeros(3, 1, 16, 16), torch.tensor([1, 1, 1])
    context = model.condition(captions, masks, ids, t)
    model.mif.text_mean.zero_()
    assert not torch.allclose(context, model.condition(captions, masks, ids, t))  # the centring reaches e_t
    assert "mif.text_mean" in checkpoints.model_state_dict(model)  # saved with the checkpoint


def test_aggregator_is_permutation_equivariant():
    """Eq. (5) uses no positions: reordering the tokens reorders the output the same way."""
    torch.manual_seed(0)
    aggregator = axf.Aggregator(32, 2).eval()
    e = torch.randn(2, 9, 32)
    order = torch.randperm(9)
    assert torch.allclose(aggregator(e)[:, order], aggregator(e[:, order]), atol=1e-5)
    assert not torch.allclose(aggregator(e), e)  # and it does change the tokens


@pytest.mark.parametrize("use_ddf", [True, False])
def test_context_changes_with_t_only_with_ddf(use_ddf):
    """Eq. (14): with DDF the context e_t depends on the timestep; without it, it is e_X for every t."""
    model = tiny_model(use_ddf=use_ddf)
    b = example_batch()
    early = model.condition(b["captions"], b["masks"], b["texture_ids"], torch.tensor([1, 1]))
    late = model.condition(b["captions"], b["masks"], b["texture_ids"], torch.tensor([90, 90]))
    assert (not torch.allclose(early, late)) == use_ddf


def test_use_text_false_means_the_caption_has_no_effect():
    """Table 6 without semantic tokens: the caption reaches neither the context nor the sample."""
    model = tiny_model(use_text=False)
    b = example_batch()
    t = torch.tensor([3, 4])
    red = model.condition(["a red crack"] * 2, b["masks"], b["texture_ids"], t)
    assert torch.equal(red, model.condition(["a blue hole"] * 2, b["masks"], b["texture_ids"], t))
    kwargs = dict(steps=2, guidance_scale=3.0)
    red = model.sample(b["images"], b["masks"], ["a red crack"] * 2, b["texture_ids"], generator=torch.Generator().manual_seed(0), **kwargs)
    blue = model.sample(b["images"], b["masks"], ["a blue hole"] * 2, b["texture_ids"], generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(red, blue)


def test_use_mif_false_means_the_mask_and_defect_type_leave_the_context_alone():
    """Table 6 without MIF: no location or texture tokens, so the context ignores the mask and the defect type
    (the UNet still sees the mask as its fifth input channel: that is where to draw, not a token)."""
    model = tiny_model(use_mif=False)
    b = example_batch()
    t = torch.tensor([3, 4])
    context = model.condition(b["captions"], b["masks"], b["texture_ids"], t)
    other_masks, other_ids = 1 - b["masks"], torch.tensor([2, 1])
    assert torch.equal(context, model.condition(b["captions"], other_masks, other_ids, t))
    full = tiny_model()
    assert not torch.allclose(full.condition(b["captions"], b["masks"], b["texture_ids"], t),
                              full.condition(b["captions"], other_masks, other_ids, t))


@pytest.mark.parametrize("use_text", [True, False])
@pytest.mark.parametrize("use_mif", [True, False])
@pytest.mark.parametrize("use_ddf", [True, False])
def test_every_switch_combination_trains_and_samples(use_text, use_mif, use_ddf):
    """Each row of Table 6 runs through loss() and sample(); with everything off the context is the null one."""
    model = tiny_model(use_text=use_text, use_mif=use_mif, use_ddf=use_ddf)
    b = example_batch()
    latents = model.encode_images(b["images"])
    loss = model.loss(latents, b["masks"], b["captions"], b["texture_ids"], torch.tensor([True, False]))
    assert torch.isfinite(loss)
    out = model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=2)
    assert out.shape == b["images"].shape and torch.isfinite(out).all()
    n = model.x_embedding(b["captions"], b["masks"], b["texture_ids"]).shape[1]
    assert n == 3 * (use_text + 2 * use_mif) or (n == 3 and not use_text and not use_mif)


def test_guidance_at_scale_one_is_the_conditional_model():
    """Classifier-free guidance eps_u + s (eps_c - eps_u) is linear in s: the mean of s = 0 and s = 2 (both
    branches in one batched call) equals s = 1 (the conditional branch alone)."""
    model = tiny_model()
    b = example_batch()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    region, t = axf.latent_mask(b["masks"], model.latent_factor), torch.tensor([10, 60])
    e_x = model.x_embedding(b["captions"], b["masks"], b["texture_ids"])
    eps = {s: model.predict_noise(x, region, t, e_x, s) for s in (0.0, 1, 2.0)}
    torch.testing.assert_close((eps[0.0] + eps[2.0]) / 2, eps[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(eps[0.0], eps[1])  # and the branches differ


def test_a_dropped_condition_becomes_the_null_context():
    """Condition dropout (classifier-free guidance's training half): a dropped sample's e_X is null_context."""
    model = tiny_model()
    b = example_batch()
    t = torch.tensor([5, 50])
    e_x = model.x_embedding(b["captions"], b["masks"], b["texture_ids"])
    dropped = model.context(e_x, t, drop=torch.tensor([True, False]))
    torch.testing.assert_close(dropped[:1], model.context(model.null_context, t[:1]))
    torch.testing.assert_close(dropped[1:], model.context(e_x[1:], t[1:]))


def test_sampling_computes_e_x_once_per_batch_and_ddf_once_per_step(monkeypatch):
    """The reader's path: Eq. (1)-(5) once, then each step DDF with its t (both guidance branches at once)."""
    model = tiny_model()
    b = example_batch()
    calls = {"x_embedding": 0, "ddf": 0}
    x_embedding, ddf_forward = model.x_embedding, model.ddf.forward
    monkeypatch.setattr(model, "x_embedding", lambda *a, **k: calls.__setitem__("x_embedding", calls["x_embedding"] + 1) or x_embedding(*a, **k))
    monkeypatch.setattr(model.ddf, "forward", lambda *a: calls.__setitem__("ddf", calls["ddf"] + 1) or ddf_forward(*a))
    model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=4, guidance_scale=3.0)
    assert calls == {"x_embedding": 1, "ddf": 4}


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_ddpm_and_stochastic_ddim_sampling_run_and_keep_the_background(sampler, eta):
    """Both samplers of the paper run through sample(); stochastic ones depend on the generator, only inside the mask."""
    model = tiny_model(num_diffusion_steps=20)
    b = example_batch()
    draw = lambda seed: model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], sampler=sampler, steps=5,
                                     eta=eta, generator=torch.Generator().manual_seed(seed))
    first, second = draw(0), draw(1)
    outside = (b["masks"] == 0).expand_as(first)
    assert torch.equal(first[outside], b["images"][outside]) and torch.equal(second[outside], b["images"][outside])
    assert not torch.equal(first, second)


def test_gradients_reach_every_trainable_part_but_never_clip():
    """Eq. (17) trains the mask encoder, texture tokens, aggregator, DDF and UNet holistically; CLIP stays frozen."""
    model = tiny_model().train()
    b = example_batch()
    latents = model.encode_images(b["images"])
    loss = model.loss(latents, b["masks"], b["captions"], b["texture_ids"], torch.tensor([True, False]),
                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    for part in (model.mif.mask_encoder, model.mif.location, model.mif.aggregator, model.ddf, model.unet):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert model.mif.texture_tokens.grad[1:].abs().sum() > 0
    assert all(p.grad is None for p in model.mif.clip.parameters())


@pytest.mark.parametrize("outside_weight", [0.0, 0.1])
def test_loss_weights_anomalies_to_their_mask(outside_weight):
    """Eq. (17) for an anomaly counts errors inside its mask fully and outside by outside_loss_weight."""
    model = tiny_model(outside_loss_weight=outside_weight, cond_dropout=0.0)
    b = example_batch(B=1)
    region = axf.latent_mask(b["masks"], model.latent_factor)  # 12 of 64 latent cells
    recorded = {}
    q_sample = model.ddpm.q_sample
    model.ddpm.q_sample = lambda x0, t, noise: recorded.setdefault("noise", noise) is not None and q_sample(x0, t, noise)
    # a UNet that predicts the noise exactly inside the mask and is off by 5 outside it
    model.unet.forward = lambda x, t, context: recorded["noise"] + 5 * (1 - region)
    latents = model.encode_images(b["images"])
    anomaly = model.loss(latents, b["masks"], b["captions"][:1], b["texture_ids"][:1], torch.tensor([True]))
    n_in, n_out = region.sum(), (1 - region).sum()
    assert torch.allclose(anomaly, outside_weight * 25 * n_out / (n_in + outside_weight * n_out))
    recorded.clear()
    normal = model.loss(latents, b["masks"], [""], torch.tensor([0]), torch.tensor([False]))
    assert torch.allclose(normal, 25 * n_out / (n_in + n_out))  # a normal image counts every cell


def test_blended_sampling_keeps_background_latent_on_the_forward_process():
    """Eq. (16): outside the mask the latent is q_sample(z0, t, ε) with one fixed ε, at every step."""
    model = tiny_model()
    b = example_batch()
    z0 = model.encode_images(b["images"])
    region = axf.latent_mask(b["masks"], model.latent_factor)
    seen = []
    model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=5, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0), callback=lambda t, x: seen.append((t, x.clone())))
    assert len(seen) == 5 and seen[-1][0] == -1
    outside = region == 0
    implied = []
    for t, x in seen[:-1]:
        a = model.ddpm.alphas_cumprod[t]
        implied.append(((x - a.sqrt() * z0) / (1 - a).sqrt())[outside.expand_as(x)])
    for eps in implied[1:]:
        assert torch.allclose(eps, implied[0], atol=1e-4)
    assert torch.allclose(seen[-1][1][outside.expand_as(z0)], z0[outside.expand_as(z0)])


@pytest.mark.parametrize("thin", [False, True])
def test_every_changed_pixel_lies_inside_the_mask(thin):
    """The saved mask is the exact ground truth: every pixel that differs from the normal image lies inside
    the mask, however the latent region (whole cells) and the decoder spread the generated content. A mask
    one pixel wide, thinner than a latent cell, keeps that promise too."""
    model = tiny_model()
    b = example_batch()
    if thin:
        b["masks"] = torch.zeros(2, 1, 16, 16)
        b["masks"][:, :, 3:13, 7] = 1
    out = model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=3,
                       generator=torch.Generator().manual_seed(0))
    changed = (out != b["images"]).any(1, keepdim=True)
    assert not (changed & (b["masks"] == 0)).any()
    assert changed[b["masks"] > 0].float().mean() > 0.9  # and inside, the image does change


def test_mask_input_false_is_the_papers_unet_reading_x_t_alone():
    """unet_mask_input False (the default): a UNet of 4 input channels that reads x_t alone. With text and MIF off as well, the
    mask reaches ε through nothing (Table 6's first row as the paper has it); sampling still changes pixels
    only inside the mask (Eq. (16)'s blend)."""
    with_mask, without = tiny_model(unet_mask_input=True), tiny_model()
    assert (with_mask.unet.conv_in.in_channels, without.unet.conv_in.in_channels) == (5, 4)
    x, region = torch.randn(2, 4, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    assert torch.equal(without.unet_input(x, region), x) and torch.equal(with_mask.unet_input(x, region)[:, 4:], region)
    b, t = example_batch(), torch.tensor([5, 50])
    bare = tiny_model(unet_mask_input=False, use_text=False, use_mif=False, use_ddf=False)
    other = torch.flip(b["masks"], (2, 3))
    eps = [bare.unet(bare.unet_input(x, axf.latent_mask(m, bare.latent_factor)), t,
                     bare.condition(b["captions"], m, b["texture_ids"], t)) for m in (b["masks"], other)]
    assert torch.equal(*eps)
    out = without.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=3,
                         generator=torch.Generator().manual_seed(0))
    changed = (out != b["images"]).any(1, keepdim=True)
    assert not (changed & (b["masks"] == 0)).any() and changed[b["masks"] > 0].float().mean() > 0.9


def test_guidance_does_nothing_when_every_condition_is_off():
    """Table 6's first row (no caption, no MIF, no DDF): the conditional and unconditional branches both read the
    null context, so guidance's scale cannot change a sample; with the caption on it does."""
    b = example_batch()
    for switches, guidance_matters in ((dict(use_text=False, use_mif=False, use_ddf=False), False), ({}, True)):
        model = tiny_model(**switches)
        one, three = (model.sample(b["images"], b["masks"], b["captions"], b["texture_ids"], steps=3,
                                   guidance_scale=scale, generator=torch.Generator().manual_seed(0))
                      for scale in (1.0, 3.0))
        assert torch.allclose(one, three, atol=1e-5) != guidance_matters


def test_changing_only_the_caption_changes_pixels_only_inside_the_mask():
    """The caption steers what is drawn, never the background."""
    model = tiny_model()
    b = example_batch()
    kwargs = dict(steps=3, guidance_scale=3.0)
    red = model.sample(b["images"], b["masks"], ["a red crack"] * 2, b["texture_ids"],
                       generator=torch.Generator().manual_seed(0), **kwargs)
    blue = model.sample(b["images"], b["masks"], ["a blue crack"] * 2, b["texture_ids"],
                        generator=torch.Generator().manual_seed(0), **kwargs)
    inside = (b["masks"] > 0).expand_as(red)
    assert torch.equal(red[~inside], blue[~inside])
    assert not torch.allclose(red[inside], blue[inside])


def test_texture_tokens_start_from_clip_features_of_the_masked_anomaly():
    """Eq. (3): each defect's texture tokens are initialised from CLIP(image * mask) of its examples."""
    model = tiny_model()
    b = example_batch()
    model.mif.init_textures(b["texture_ids"], b["images"], b["masks"])
    features = model.mif.encode_texture(b["images"], b["masks"])
    assert torch.allclose(model.mif.texture_tokens[1], axf.unit_tokens(features[:1], 3)[0], atol=1e-5)
    assert torch.allclose(model.mif.texture_tokens[2], axf.unit_tokens(features[1:], 3)[0], atol=1e-5)


def test_mask_autoencoder_learns_to_reconstruct_masks():
    """The mask encoder is pre-trained as an autoencoder: its reconstruction error falls."""
    torch.manual_seed(0)
    autoencoder = MaskAutoencoder(16, channels=8, feature_channels=16)
    masks = (torch.rand(8, 1, 4, 4) > 0.5).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-2)
    first = autoencoder.loss(masks)[0].item()
    for _ in range(40):
        loss, logs = autoencoder.loss(masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 3 and logs["mask_iou"] > 0.8


def test_a_thin_mask_survives_and_an_empty_one_is_refused(tmp_path):
    """A one-pixel scratch at 64 px keeps its pixels at the model's 16 px (nearest-neighbour would drop
    them), and a mask that is empty at full size is refused with its file name."""
    from PIL import Image
    scratch = torch.zeros(64, 64, dtype=torch.uint8)
    scratch[10:50, 33] = 255
    Image.fromarray(scratch.numpy()).save(tmp_path / "scratch.png")
    mask = data.read_mask(tmp_path / "scratch.png", 16)
    assert mask.shape == (1, 16, 16) and mask[0, :, 8].sum() >= 9 and mask.sum() == mask[0, :, 8].sum()
    Image.fromarray(torch.zeros(64, 64, dtype=torch.uint8).numpy()).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="empty.png: empty mask"):
        data.read_mask(tmp_path / "empty.png", 16)


def test_texture_ids_put_good_first_then_the_sorted_defect_types():
    """One convention across train.py, sample.py and evaluate.py: per category 0 is good, then Category.defects in
    order; a second category's rows follow the first's."""
    rows = axf.texture_rows({"toy": ["crack", "hole"], "pill": ["color"]})
    assert axf.texture_ids(rows, "toy", ["hole", "good", "crack"]).tolist() == [2, 0, 1]
    assert axf.texture_ids(rows, "pill", ["color", "good"]).tolist() == [4, 3]
    assert tiny_model().texture_rows == [("toy", "good"), ("toy", "crack"), ("toy", "hole")]


def test_location_tokens_shape_and_bad_image_size():
    """Eq. (2): features of any image size come down to 8x8, then k tokens of width d; bad sizes say why."""
    encoder = MaskEncoder(64, channels=8, feature_channels=16)
    features = encoder(torch.zeros(2, 1, 64, 64))
    assert features.shape == (2, 16, 8, 8)
    assert LocationTokens(16, 5, 48)(features).shape == (2, 5, 48)
    with pytest.raises(ValueError, match="power of two"):
        MaskEncoder(48)


def test_progress_writes_a_few_whole_lines_to_a_log(capsys):
    """Redirected to a file, a long loop's progress is a handful of plain lines, not thousands of
    carriage-return updates (a quick start's log was 278 KB)."""
    bar = cli.progress(1000, "steps")
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.1000", refresh=False)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 1 <= len(err.splitlines()) <= 3 and "1000/1000" in err.splitlines()[-1]
