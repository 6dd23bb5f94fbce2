"""The AnomalyXFusion method (paper §4): MIF embeddings, aggregator, DDF, ablations, loss, blended sampling."""
import pytest
import torch

import axf
import clip
from mask_encoder import LocationTokens, MaskAutoencoder, MaskEncoder


def tiny_config(**overrides):
    config = axf.resolve_config("toy", dict(
        image_size=16, vae_channels=32, vae_channel_mult=(1, 2), unet_channels=32, unet_channel_mult=(1, 2),
        unet_num_res_blocks=1, unet_attention_levels=(0, 1), unet_num_heads=2, num_tokens=3, context_dim=32,
        mask_channels=8, mask_feature_channels=16, aggregator_heads=2, num_diffusion_steps=100, composite_radius=1))
    config.update(overrides)
    return config


def tiny_clip(width):
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=width, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def tiny_model(**overrides):
    config = tiny_config(**overrides)
    model = axf.AnomalyXFusion(config, tiny_clip(config["context_dim"]), ["crack", "hole"])
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
                defect_ids=torch.tensor([1, 2] * B)[:B])


@pytest.mark.parametrize("k,d", [(1, 32), (3, 32), (4, 64)])
def test_each_embedding_has_k_tokens_of_width_d(k, d):
    """Eq. (1)-(5): semantic, location and textural embeddings are [B, k, d]; the context is [B, 3k, d]."""
    model = tiny_model(num_tokens=k, context_dim=d)
    b = example_batch()
    assert axf.unit_tokens(model.encode_captions(b["captions"]), k).shape == (2, k, d)
    assert model.location(model.mask_encoder(b["masks"])).shape == (2, k, d)
    assert model.texture_tokens[b["defect_ids"]].shape == (2, k, d)
    t = torch.tensor([5, 50])
    assert model.condition(b["captions"], b["masks"], b["defect_ids"], t).shape == (2, 3 * k, d)


def test_semantic_tokens_are_unit_direction_repeats():
    """Eq. (1): e_sem is the CLIP text feature, L2-normalised (then scaled by sqrt(d)), repeated k times."""
    model = tiny_model()
    features = model.encode_captions(["a red crack"])
    tokens = axf.unit_tokens(features, 3)
    expected = features[0] / features[0].norm() * 32**0.5
    assert torch.allclose(tokens[0], expected.expand(3, -1), atol=1e-5)


def test_centred_captions_have_zero_mean_and_each_caption_counts_once():
    """center_captions subtracts the mean CLIP feature of the distinct captions before Eq. (1)'s norm."""
    model = tiny_model()
    captions = ["a red crack", "a blue hole", "a green hole"]
    assert not model.text_mean.any()  # untouched: Eq. (1) exactly
    model.center_captions(captions + ["a red crack"] * 5)  # repeats do not tilt the mean
    centred = model.encode_captions(captions) - model.text_mean
    torch.testing.assert_close(centred.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    t, masks, ids = torch.tensor([5, 5, 5]), torch.zeros(3, 1, 16, 16), torch.tensor([1, 1, 1])
    context = model.condition(captions, masks, ids, t)
    model.text_mean.zero_()
    assert not torch.allclose(context, model.condition(captions, masks, ids, t))  # the centring reaches e_t
    assert "text_mean" in axf.model_state_dict(model)  # saved with the checkpoint


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
    early = model.condition(b["captions"], b["masks"], b["defect_ids"], torch.tensor([1, 1]))
    late = model.condition(b["captions"], b["masks"], b["defect_ids"], torch.tensor([90, 90]))
    assert (not torch.allclose(early, late)) == use_ddf


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def test_each_ablation_switch_removes_exactly_its_part():
    """Table 6: use_text drops k semantic tokens; use_mif drops location, texture, aggregator; use_ddf the DDF."""
    full = tiny_model()
    b = example_batch()
    t = torch.tensor([3, 4])
    tokens = lambda m: m.condition(b["captions"], b["masks"], b["defect_ids"], t).shape[1]
    assert tokens(full) == 9
    no_text = tiny_model(use_text=False)
    assert tokens(no_text) == 6 and count_params(full) - count_params(no_text) == 3 * 32  # only null tokens shrink
    no_mif = tiny_model(use_mif=False)
    mif_params = sum(count_params(getattr(full, n)) for n in ("mask_encoder", "location", "aggregator"))
    mif_params += full.texture_tokens.numel() + 6 * 32  # and the null tokens of the 6 MIF tokens
    assert tokens(no_mif) == 3 and count_params(full) - count_params(no_mif) == mif_params
    no_ddf = tiny_model(use_ddf=False)
    assert tokens(no_ddf) == 9 and count_params(full) - count_params(no_ddf) == count_params(full.ddf)
    nothing = tiny_model(use_text=False, use_mif=False, use_ddf=False)
    assert tokens(nothing) == 3  # the learned null context alone


def test_gradients_reach_every_trainable_part_but_never_clip():
    """Eq. (17) trains the mask encoder, texture tokens, aggregator, DDF and UNet holistically; CLIP stays frozen."""
    model = tiny_model().train()
    b = example_batch()
    latents = model.encode_images(b["images"])
    loss = model.loss(latents, b["masks"], b["captions"], b["defect_ids"], torch.tensor([True, False]),
                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    for part in (model.mask_encoder, model.location, model.aggregator, model.ddf, model.unet):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert model.texture_tokens.grad[1:].abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())


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
    anomaly = model.loss(latents, b["masks"], b["captions"][:1], b["defect_ids"][:1], torch.tensor([True]))
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
    model.sample(b["images"], b["masks"], b["captions"], b["defect_ids"], steps=5, guidance_scale=2.0,
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


def test_sampled_image_equals_normal_image_outside_the_mask():
    """The final composite: pixels beyond the dilated, feathered mask are the normal image exactly."""
    model = tiny_model()
    b = example_batch()
    out = model.sample(b["images"], b["masks"], b["captions"], b["defect_ids"], steps=3,
                       generator=torch.Generator().manual_seed(0))
    weight = axf.composite_mask(b["masks"], model.config["composite_radius"])
    outside = (weight == 0).expand_as(out)
    assert outside.any() and torch.equal(out[outside], b["images"][outside])
    assert not torch.allclose(out[b["masks"].expand_as(out) > 0], b["images"][b["masks"].expand_as(out) > 0])


def test_changing_only_the_caption_changes_pixels_only_inside_the_mask():
    """The caption steers what is drawn, never the background."""
    model = tiny_model()
    b = example_batch()
    kwargs = dict(steps=3, guidance_scale=3.0)
    red = model.sample(b["images"], b["masks"], ["a red crack"] * 2, b["defect_ids"],
                       generator=torch.Generator().manual_seed(0), **kwargs)
    blue = model.sample(b["images"], b["masks"], ["a blue crack"] * 2, b["defect_ids"],
                        generator=torch.Generator().manual_seed(0), **kwargs)
    weight = axf.composite_mask(b["masks"], model.config["composite_radius"]).expand_as(red)
    assert torch.equal(red[weight == 0], blue[weight == 0])
    assert not torch.allclose(red[weight > 0], blue[weight > 0])


def test_texture_tokens_start_from_clip_features_of_the_masked_anomaly():
    """Eq. (3): each defect's texture tokens are initialised from CLIP(image * mask) of its examples."""
    model = tiny_model()
    b = example_batch()
    model.init_textures(b["defect_ids"], b["images"], b["masks"])
    features = model.encode_texture(b["images"], b["masks"])
    assert torch.allclose(model.texture_tokens[1], axf.unit_tokens(features[:1], 3)[0], atol=1e-5)
    assert torch.allclose(model.texture_tokens[2], axf.unit_tokens(features[1:], 3)[0], atol=1e-5)


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


def test_location_tokens_shape_and_bad_image_size():
    """Eq. (2): features of any image size come down to 8x8, then k tokens of width d; bad sizes say why."""
    encoder = MaskEncoder(64, channels=8, feature_channels=16)
    features = encoder(torch.zeros(2, 1, 64, 64))
    assert features.shape == (2, 16, 8, 8)
    assert LocationTokens(16, 5, 48)(features).shape == (2, 5, 48)
    with pytest.raises(ValueError, match="power of two"):
        MaskEncoder(48)
