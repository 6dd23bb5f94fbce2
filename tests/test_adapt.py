"""Adapting a pretrained SD to AnomalyXFusion: the textual-inversion splice into the frozen text
encoder (clip.py), LoRA adapters and a mask input channel (sd_backbone.py), gradient checkpointing (unet.py).
Each adaptation must leave the pretrained model exactly as it was until it trains."""
import pytest
import torch
import torch.nn.functional as F

import clip
import unet as unet_module
from sd_backbone import add_lora, expand_input_channels, lora_state_dict, merge_lora
from unet import UNet


def text_tower():
    torch.manual_seed(0)
    return clip.CLIP(None, None, 0, None, None, 77, 49408, 64, 1, 2).eval().requires_grad_(False)


def small_unet(in_channels=4):
    """A UNet with random (not zero) output layers, so that every path reaches the output."""
    torch.manual_seed(0)
    unet = UNet(in_channels, 4, 32, (1, 2), 1, (0, 1), 8, 64)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def small_unet_with_random_adapters():
    """small_unet with rank-4 LoRA whose weights are random (fresh adapters are a no-op: up starts at zero)."""
    unet = small_unet()
    add_lora(unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.1)
    return unet


def unet_inputs(channels=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 64, generator=g)


# ----------------------------------------------------------------------------- textual-inversion splice


PROMPT = "a photo of a * * * * on a table"


def test_splicing_the_words_own_embeddings_back_is_the_plain_call():
    """The splice replaces the token lookup only: give it the embeddings of the words the placeholders stand
    for and the output is the plain prompt's, bit for bit."""
    text = text_tower()
    spliced, plain = clip.tokenize(PROMPT), clip.tokenize("a photo of a red large glass bottle on a table")
    vectors = text.token_embedding(plain[:, 5:9])  # [1, 4, width]: the four words at the placeholders
    assert (spliced[0, 5:9] == clip.PLACEHOLDER_ID).all()
    assert torch.equal(text.encode_text_tokens(spliced, replace=(clip.PLACEHOLDER_ID, vectors)),
                       text.encode_text_tokens(plain))


def test_gradient_reaches_the_spliced_vectors_and_not_the_frozen_encoder():
    """e_t is what trains; the frozen text encoder passes gradients through without collecting any."""
    text = text_tower()
    vectors = torch.randn(2, 4, 64, requires_grad=True)
    out = text.encode_text_tokens(clip.tokenize([PROMPT] * 2), replace=(clip.PLACEHOLDER_ID, vectors))
    out.square().sum().backward()
    assert vectors.grad is not None and (vectors.grad.abs().sum(dim=-1) > 0).all()  # every spliced token
    assert all(p.grad is None for p in text.parameters())


def test_tokens_before_the_placeholder_do_not_see_it():
    """Causal attention: the positions left of the splice are untouched by it; those right of it change."""
    text = text_tower()
    tokens = clip.tokenize([PROMPT] * 2)
    plain = text.encode_text_tokens(tokens)
    out = text.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, torch.randn(2, 4, 64)))
    assert torch.equal(out[:, :5], plain[:, :5])
    assert not torch.isclose(out[:, 5:], plain[:, 5:]).all(dim=-1).any()


def test_each_row_gets_its_own_vectors_in_order():
    """Row b's i-th placeholder takes vectors[b, i]: the same vectors in another order give another output."""
    text = text_tower()
    tokens, vectors = clip.tokenize([PROMPT] * 2), torch.randn(1, 4, 64).repeat(2, 1, 1)
    vectors[1] = vectors[1].flip(0)
    out = text.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, vectors))
    assert torch.equal(out[0, 5], text.encode_text_tokens(tokens[:1], replace=(clip.PLACEHOLDER_ID, vectors[:1]))[0, 5])
    assert not torch.allclose(out[0, 9:], out[1, 9:])


def test_placeholder_count_must_match_the_vectors():
    text = text_tower()
    with pytest.raises(ValueError, match="each row holding token 265 n times"):
        text.encode_text_tokens(clip.tokenize("a photo of a * *"), replace=(clip.PLACEHOLDER_ID, torch.randn(1, 4, 64)))


# ----------------------------------------------------------------------------- LoRA


def test_fresh_lora_is_the_pretrained_unet():
    """The adapters' up-projections start at zero: step 0 of LoRA fine-tuning is the pretrained model."""
    unet = small_unet()
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = unet(x, t, c)
        add_lora(unet, rank=4)
        assert torch.equal(unet(x, t, c), before)


def test_adapted_attention_is_the_frozen_layer_plus_its_adapters_bit_for_bit():
    """LoRA acts from outside the attention layer, by replacing its projections; the layer computes what it did when
    it held the adapters itself: q = W_q x + up(down(x)), k and v likewise on the context, and the output
    W_out h + b_out + up(down(h)), bit for bit."""
    unet = small_unet_with_random_adapters()
    layer = unet.middle_block[1].block.attn2  # cross-attention: k and v from the context
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 16, 64, generator=g), torch.randn(2, 77, 64, generator=g)
    lora = {name: getattr(layer, name).lora for name in ("to_q", "to_k", "to_v", "to_out")}
    with torch.no_grad():
        q = F.linear(x, layer.to_q.weight) + lora["to_q"](x)
        k = F.linear(context, layer.to_k.weight) + lora["to_k"](context)
        v = F.linear(context, layer.to_v.weight) + lora["to_v"](context)
        h = unet_module.attention(q, k, v, layer.num_heads)
        assert torch.equal(layer(x, context), F.linear(h, layer.to_out.weight, layer.to_out.bias) + lora["to_out"](h))


def test_lora_trains_only_its_adapters_with_distinct_keys():
    """add_lora returns exactly the adapter parameters (4 projections x 2 matrices x every attention layer);
    with the UNet frozen they are the only ones with gradients, and their keys name nothing pretrained."""
    unet = small_unet().requires_grad_(False)
    params = add_lora(unet, rank=2)
    attention_layers = 2 * (2 + 1 + 2 + 2)  # self + cross in each transformer: 2 in, 1 middle, 2 + 2 out
    assert len(params) == attention_layers * 4 * 2
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    unet.train()
    x, t, c = unet_inputs()
    unet(x, t, c).square().mean().backward()
    assert all(p.grad is not None for p in params)
    lora = lora_state_dict(unet)
    assert len(lora) == len(params) and all(".lora." in k for k in lora)
    assert all(".lora." not in k for k in small_unet().state_dict())  # the pretrained names stay as they were
    fresh = small_unet()
    add_lora(fresh, rank=2)
    missing, unexpected = fresh.load_state_dict(lora, strict=False)  # a LoRA checkpoint loads on its own
    assert not unexpected and all(".lora." not in k for k in missing)


def test_merged_lora_gives_the_same_output():
    unet = small_unet_with_random_adapters()
    with torch.no_grad():
        x, t, c = unet_inputs()
        adapted = unet(x, t, c)
        merge_lora(unet)
        assert not lora_state_dict(unet)
        torch.testing.assert_close(unet(x, t, c), adapted, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_with_lora_and_a_frozen_unet():
    """The UNet's gradient_checkpointing switch recomputes each block in backward: with LoRA on a frozen UNet
    the adapters' and the context's gradients are the same as without it."""
    unet = small_unet().requires_grad_(False)
    params = add_lora(unet, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    unet.train()
    x, t, c = unet_inputs()
    grads = []
    for switch in (False, True):
        unet.gradient_checkpointing = switch
        context = c.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        unet(x, t, context).square().mean().backward()
        grads.append([context.grad] + [p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- a mask input channel


def test_mask_channel_with_zero_weights_is_the_pretrained_unet():
    """[x_t, mask] into the expanded UNet gives exactly what x_t gives the 4-channel one, whatever the mask."""
    unet = small_unet()
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = unet(x, t, c)
        expand_input_channels(unet, 5)
        mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
        assert unet.conv_in.in_channels == 5 and unet.conv_in.extra_weight.shape == (32, 1, 3, 3)
        assert torch.equal(unet(torch.cat([x, mask], dim=1), t, c), before)


def test_mask_channel_weights_train():
    unet = expand_input_channels(small_unet(), 5).train()
    x, t, c = unet_inputs(5)
    unet(x, t, c).square().mean().backward()
    assert unet.conv_in.extra_weight.grad.abs().sum() > 0
