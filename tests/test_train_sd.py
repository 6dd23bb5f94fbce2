"""train.py --sd and sample.py on a tiny random Stable Diffusion 1.x file: what trains in each
--train_unet mode and what axf.pt holds, the one SD file a checkpoint belongs to, resuming, step 0 being the
pretrained model, and the way e_t reaches the frozen text encoder (splice) or the UNet (append)."""
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import axf
import checkpoints
import clip
import config
import data
import sample
import files
import sd
import sd_backbone
import toy
import train
import training
from sd_backbone import add_lora, lora_state_dict
from unet import UNet
from vae import VAE
from helpers import kill_after_two_steps_and_resume

# the sizes of tests/test_train_sample.py's TINY that an SD file leaves to the config (the rest is the file's)
SD_TINY = ["--preset", "toy", "--clip", "random", "--image_size", "32", "--num_tokens", "2", "--context_dim", "32", "--mask_channels", "8",
           "--mask_feature_channels", "16", "--mask_steps", "2", "--steps", "4", "--batch_size", "4",
           "--checkpoint_every", "2", "--preview_every", "4", "--sample_steps", "2"]
# one run per --train_unet mode on a text-to-image file (sd_context append, the default), and SD-inpainting's
# 9 channels from a .ckpt with the authors' splice
RUNS = {  # the text-to-image runs with the mask channel (opt-in), whose conv_in widening is tested here
    "none": ("txt2img", ["--train_unet", "none", "--sd_vae", "{vae}", "--unet_mask_input", "True"]),  # a separate VAE
    "lora": ("txt2img", ["--train_unet", "lora", "--lora_rank", "4", "--unet_mask_input", "True"]),
    "full": ("txt2img", ["--train_unet", "full", "--unet_mask_input", "True"]),
    "inpainting": ("inpainting", ["--train_unet", "none", "--sd_context", "splice", "--gradient_checkpointing", "True"]),
}
NORMALS = 16  # normal training images kept of the toy bottle's 200
MASK_CHANNEL = {"unet.conv_in.extra_weight"}  # the mask channel's conv_in weights: all that trains of a frozen conv_in
FROM_THEIR_FILES = ("vae.", "sd_adapter.text_encoder.", "mif.clip.")  # rebuilt from their own files, never in axf.pt


def tiny_sd(path, in_channels=4, seed=0):
    """A random SD-1.x file in the original layout (.safetensors or .ckpt by suffix). The UNet's zero-initialised
    output layers get weights, so that every input and every adapter reaches its output."""
    torch.manual_seed(seed)
    vae = VAE(3, 32, (1, 2), 1, 4)
    unet = UNet(in_channels, 4, 32, (1, 2), 1, (0, 1), sd.SD_HEADS, 64)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(0, 0.05)
    text = clip.CLIP(None, None, 0, None, None, 77, 49408, 64, 1, 1)
    return Path(sd.save_sd(path, vae, unet, text))


def sd_args(root, out, file, extra=()):
    return ["--category", "bottle", "--data_root", str(root), "--out_dir", str(out), "--sd", str(file), *SD_TINY, *extra]


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    folder = toy.make_toy(root, "bottle", size=32, seed=0)
    for path in sorted((folder / "train" / "good").iterdir())[NORMALS:]:  # encoding 200 costs more than 4 steps
        path.unlink()
    return root


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(2)  # a VAE alone, as vae-ft-mse-840000-ema-pruned.safetensors ships one (LDM names, no prefix)
    vae = files.write_safetensors(sd.vae_to_sd(VAE(3, 32, (1, 2), 1, 4).state_dict()), folder / "vae.safetensors",
                               metadata={"format": "pt"})
    return {"txt2img": tiny_sd(folder / "tiny.safetensors"), "vae": Path(vae),
            "inpainting": tiny_sd(folder / "tiny-inpainting.ckpt", in_channels=9, seed=1)}


@pytest.fixture(scope="module")
def trained(toy_root, sd_files, tmp_path_factory):
    """trained(name) -> the --out_dir of that run in RUNS, trained once (4 steps) the first time it is asked for."""
    done = {}

    def run(name):
        if name not in done:
            kind, extra = RUNS[name]
            extra = [arg.format(**sd_files) for arg in extra]
            out = tmp_path_factory.mktemp(f"run_{name}")
            train.main(sd_args(toy_root, out, sd_files[kind], extra))
            done[name] = out
        return done[name]
    return run


def few_shot_batch(toy_root, n=2):
    """n normal images and n few-shot anomalies' masks, captions and defect ids of the toy bottle, at 32 px."""
    category = data.load_category(toy_root / "bottle")
    few_shot, _ = data.few_shot_split(category.anomalies)
    picks = few_shot[::len(few_shot) // n][:n]
    normals = torch.stack([data.read_image(p, 32) for p in category.train_good[:n]])
    masks = torch.stack([data.read_mask(a, 32) for a in picks])
    return normals, masks, [a.caption for a in picks], axf.texture_ids(axf.texture_rows({"bottle": category.defects}), "bottle",
                                                                  [a.defect for a in picks])


def sd_model(file, **overrides):
    """AnomalyXFusion on an SD file as train.py builds it, without training (random conditioning)."""
    settings = config.resolve("toy", dict(sd=str(file), clip="random", image_size=32, num_tokens=2, context_dim=32, mask_channels=8,
                                          mask_feature_channels=16, **overrides))
    backbone = sd_backbone.load_backbone(settings)
    settings.update(sd_backbone.file_sizes(backbone))
    return axf.AnomalyXFusion(settings, axf.build_clip(settings), {"toy": ["crack", "hole"]}, **backbone)


def changed_copy(file, path, key=sd.SD_PREFIXES["UNet"] + "out.2.weight"):  # SD-1.x's name of conv_out
    """The SD file with one weight altered: same size, same header, another sha256."""
    tensors = {k: v.clone() for k, v in files.read_safetensors(file).items()}
    tensors[key].view(-1)[0] += 1
    files.write_safetensors(tensors, path, metadata={"format": "pt"})
    assert path.stat().st_size == file.stat().st_size
    return path


# ----------------------------------------------------------------------------- what axf.pt holds


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_holds_only_the_weights_that_trained(name, trained, sd_files):
    """axf.pt leaves out what the SD file gives back (VAE, text encoder, frozen UNet weights) and CLIP: of the
    UNet it holds the mask channel's conv_in weights (none), those and the LoRA adapters (lora), every weight
    (full), and nothing of a frozen 9-channel inpainting UNet, which needs no widening."""
    kind, _ = RUNS[name]
    file = sd_files[kind]
    checkpoint = torch.load(trained(name) / "axf.pt", weights_only=True)
    assert checkpoint["step"] == 4
    for part in ("model", "ema"):
        assert not [k for k in checkpoint[part] if k.startswith(FROM_THEIR_FILES)], part
    assert set(checkpoint["ema"]) <= set(checkpoint["model"])
    pretrained = sd.load_sd(file)[1]
    if name == "lora":
        add_lora(pretrained, 4)
    adapters = {f"unet.{k}" for k in lora_state_dict(pretrained)}
    expected = {"none": MASK_CHANNEL, "inpainting": set(), "lora": MASK_CHANNEL | adapters,
                "full": {f"unet.{k}" for k in pretrained.state_dict()} | MASK_CHANNEL}[name]
    assert {k for k in checkpoint["model"] if k.startswith("unet.")} == expected
    assert bool(adapters) == (name == "lora")
    if name != "inpainting":
        assert checkpoint["model"]["unet.conv_in.extra_weight"].shape[1] == 1  # the mask, beside x_t's 4 channels


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_is_small_unless_the_whole_unet_trains(name, trained, sd_files):
    """A checkpoint on SD-1.5 must weigh megabytes, not the 3.4 GB UNet: with none or lora its weights are a
    small fraction of the file's UNet; full fine-tuning saves at least the whole UNet."""
    kind, _ = RUNS[name]
    file = sd_files[kind]
    checkpoint = torch.load(trained(name) / "axf.pt", weights_only=True)
    unet_bytes = tensor_bytes(v for k, v in sd.read_checkpoint(file).items() if k.startswith(sd.SD_PREFIXES["UNet"]))
    saved_bytes = tensor_bytes(checkpoint["model"].values())
    if name == "full":
        assert saved_bytes > unet_bytes
    else:
        assert saved_bytes < unet_bytes / 10, (saved_bytes, unet_bytes)


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_names_its_sd_file_by_path_size_and_sha256(name, trained, sd_files):
    """The file's identity is its bytes: what check_sd_file compares a later file against."""
    file = sd_files[RUNS[name][0]]
    checkpoint = torch.load(trained(name) / "axf.pt", weights_only=True)
    assert checkpoint["sd_file"] == {"path": str(file.resolve()), "size": file.stat().st_size,
                                     "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


@pytest.mark.parametrize("name", list(RUNS))
def test_conditioning_trains_through_the_frozen_networks(name, trained):
    """Gradients reach DDF through the UNet and the frozen text encoder (through a frozen, checkpointed
    inpainting UNet too): its weights moved, so their EMA lags behind them. (Weights that never moved
    would equal their EMA bit for bit: lerp(w, w) = w.)"""
    checkpoint = torch.load(trained(name) / "axf.pt", weights_only=True)
    ddf = [k for k in checkpoint["ema"] if k.startswith("ddf.")]
    assert ddf and all(not torch.equal(checkpoint["model"][k], checkpoint["ema"][k]) for k in ddf)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", list(RUNS))
def test_sampling_changes_pixels_only_inside_the_mask(name, trained, toy_root):
    """Eq. (16) on an SD backbone: loaded with its SD file, the model draws inside the mask, and every pixel
    outside it is the normal image's, exactly (the saved mask is the whole ground truth)."""
    model, _ = checkpoints.load_checkpoint(trained(name) / "axf.pt")
    assert model.unet.conv_in.in_channels == (9 if name == "inpainting" else 5)
    assert model.reads_masked_image == (name == "inpainting")
    normals, masks, captions, ids = few_shot_batch(toy_root)
    out = model.sample(normals, masks, captions, ids, steps=2, generator=torch.Generator().manual_seed(0))
    outside = masks.expand_as(out) == 0
    assert torch.equal(out[outside], normals[outside])
    assert (out != normals)[~outside].any()


def test_sample_script_takes_the_moved_sd_file_and_refuses_another(trained, sd_files, toy_root, tmp_path):
    """sample.py --sd: where the very file is now (a copy) draws a category folder (here on SD-inpainting's
    9 channels); a changed file of the same size stops it before anything is written."""
    args = ["--category", "bottle", "--data_root", str(toy_root), "--n", "1", "--sample_steps", "2"]
    moved = tmp_path / "elsewhere.ckpt"
    shutil.copy(sd_files["inpainting"], moved)
    sample.main(args + ["--ckpt", str(trained("inpainting")), "--sd", str(moved), "--out_dir", str(tmp_path / "bottle")])
    assert len(data.load_category(tmp_path / "bottle").anomalies) == 3  # one per defect type
    changed = changed_copy(sd_files["txt2img"], tmp_path / "changed.safetensors")
    with pytest.raises(ValueError, match="is not the Stable Diffusion file this checkpoint was trained on"):
        sample.main(args + ["--ckpt", str(trained("lora")), "--sd", str(changed), "--out_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- the SD file a checkpoint belongs to


def test_another_sd_file_is_refused_and_a_missing_one_named(trained, sd_files, tmp_path):
    """The trained weights (the mask channel's, adapters, conditioning) belong to one SD file: a file of the same
    size with one weight changed is refused in one line naming it; a missing file is a FileNotFoundError naming it."""
    path = trained("lora") / "axf.pt"
    changed = changed_copy(sd_files["txt2img"], tmp_path / "changed.safetensors")
    with pytest.raises(ValueError) as error:
        checkpoints.load_checkpoint(path, sd_path=changed)
    message = str(error.value)
    assert message.startswith(f"{changed} is not the Stable Diffusion file this checkpoint was trained on"), message
    assert str(sd_files["txt2img"].resolve()) in message and "\n" not in message
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: missing")):
        checkpoints.load_checkpoint(path, sd_path=missing)


def test_a_moved_sd_file_loads_from_where_it_is_now(trained, sd_files, tmp_path):
    """The checkpoint's SD file is gone from where it was trained: loading says so and asks for --sd; the
    identical file at its new place (sd_path=) gives the very model loaded from the original."""
    checkpoint = torch.load(trained("lora") / "axf.pt", weights_only=True)
    gone = str(tmp_path / "gone" / "tiny.safetensors")
    checkpoint["config"]["sd"], checkpoint["sd_file"]["path"] = gone, gone
    torch.save(checkpoint, tmp_path / "axf.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(gone) + ".*pass --sd"):
        checkpoints.load_checkpoint(tmp_path / "axf.pt")
    moved = tmp_path / "moved.safetensors"
    shutil.copy(sd_files["txt2img"], moved)
    model, _ = checkpoints.load_checkpoint(tmp_path / "axf.pt", sd_path=moved)
    original, _ = checkpoints.load_checkpoint(trained("lora") / "axf.pt")
    assert model.config["sd"] == str(moved)
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_with_another_sd_file_is_refused(trained, toy_root, sd_files, tmp_path):
    """Re-running train.py in an --out_dir trained on one SD file, with another, stops before writing anything."""
    for name in ("mask_ae.pt", "axf.pt"):
        shutil.copy(trained("lora") / name, tmp_path / name)
    before = (tmp_path / "axf.pt").read_bytes()
    changed = changed_copy(sd_files["txt2img"], tmp_path / "changed.safetensors")
    with pytest.raises(ValueError, match="is not the Stable Diffusion file this checkpoint was trained on"):
        train.main(sd_args(toy_root, tmp_path, changed, RUNS["lora"][1] + ["--steps", "6"]))
    assert (tmp_path / "axf.pt").read_bytes() == before


def test_a_separate_vae_is_used_recorded_and_checked(trained, sd_files, tmp_path):
    """--sd_vae: the run's VAE is that file's (not the SD file's own), the checkpoint names it by its hash and
    sample.py's load refuses another file in its place; a resume may not drop it."""
    checkpoint = torch.load(trained("none") / "axf.pt", weights_only=True)
    file = sd_files["vae"]
    assert checkpoint["config"]["sd_vae"] == str(file)
    assert checkpoint["sd_vae_file"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    model, _ = checkpoints.load_checkpoint(trained("none") / "axf.pt")
    assert all(torch.equal(v, files.read_safetensors(file)[k]) for k, v in sd.vae_to_sd(model.vae.state_dict()).items())
    assert not torch.equal(model.vae.decoder.conv_out.weight, sd.load_sd(sd_files["txt2img"])[0].decoder.conv_out.weight)
    changed = changed_copy(file, tmp_path / "vae.safetensors", "decoder.conv_out.weight")
    checkpoint["config"]["sd_vae"] = str(changed)
    torch.save(checkpoint, tmp_path / "axf.pt")
    with pytest.raises(ValueError, match=f"{changed} is not the VAE file this checkpoint was trained on"):
        checkpoints.load_checkpoint(tmp_path / "axf.pt")
    assert "--sd_vae" in config.architecture_changes(checkpoint["config"], dict(checkpoint["config"], sd_vae=""))[0]
    with pytest.raises(ValueError, match="sd_vae replaces the VAE of an --sd file"):
        config.resolve("toy", dict(sd_vae=str(file)))


def test_a_checkpoint_with_the_old_lora_keys_loads_as_the_same_model(trained, tmp_path):
    """Adapters were once saved beside their layer (`attn1.lora.to_q.down.weight`), now inside it
    (`attn1.to_q.lora.down.weight`): a checkpoint in the old names loads as the very model of today's."""
    checkpoint = torch.load(trained("lora") / "axf.pt", weights_only=True)
    old_name = lambda key: re.sub(r"\.(to_q|to_k|to_v|to_out)\.lora\.", r".lora.\1.", key)
    for part in ("model", "ema"):
        checkpoint[part] = {old_name(k): v for k, v in checkpoint[part].items()}
    assert any(".attn1.lora.to_q.down.weight" in k for k in checkpoint["model"])
    torch.save(checkpoint, tmp_path / "axf.pt")
    model, _ = checkpoints.load_checkpoint(tmp_path / "axf.pt")
    original, _ = checkpoints.load_checkpoint(trained("lora") / "axf.pt")
    assert model.state_dict().keys() == original.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_that_trained_conv_in_whole_loads_as_the_model_it_was(trained, sd_files, tmp_path):
    """Before the pretrained conv_in stayed frozen, --train_unet none trained all of the widened conv_in and saved it
    whole (unet.conv_in.weight of 5 channels, unet.conv_in.bias). Such a checkpoint loads with that very conv_in, its
    trained first channels and bias rather than the file's, and is otherwise the model of today's checkpoint."""
    checkpoint = torch.load(trained("none") / "axf.pt", weights_only=True)
    pretrained = sd.load_sd(sd_files["txt2img"])[1].conv_in
    g = torch.Generator().manual_seed(0)
    for part in ("model", "ema"):
        weight = torch.cat([pretrained.weight, checkpoint[part].pop("unet.conv_in.extra_weight")], dim=1)
        checkpoint[part]["unet.conv_in.weight"] = weight + 0.01 * torch.randn(weight.shape, generator=g)  # trained
        checkpoint[part]["unet.conv_in.bias"] = pretrained.bias + 0.01 * torch.randn(pretrained.bias.shape, generator=g)
    torch.save(checkpoint, tmp_path / "axf.pt")
    x = torch.randn(2, 5, 8, 8, generator=g)
    for part in ("model", "ema"):
        model, _ = checkpoints.load_checkpoint(tmp_path / "axf.pt", use_ema=part == "ema")
        weight, bias = checkpoint[part]["unet.conv_in.weight"], checkpoint[part]["unet.conv_in.bias"]
        assert torch.equal(model.unet.conv_in.weight, weight) and torch.equal(model.unet.conv_in.bias, bias)
        with torch.no_grad():
            assert torch.equal(model.unet.conv_in(x), F.conv2d(x, weight, bias, padding=1))
        today, _ = checkpoints.load_checkpoint(trained("none") / "axf.pt", use_ema=part == "ema")
        rest = {k: v for k, v in today.state_dict().items() if not k.startswith("unet.conv_in.")}
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in rest.items())


# ----------------------------------------------------------------------------- resuming


def test_interrupted_lora_run_resumes_to_the_weights_of_an_uninterrupted_run(trained, toy_root, sd_files, tmp_path,
                                                                             monkeypatch, capsys):
    """A kill after the step-2 checkpoint loses nothing on an SD backbone either: the adapters, the mask channel's
    weights and the conditioning are saved with optimiser, EMA and RNGs, the frozen rest comes back from the file,
    and the resumed run ends with the very weights and EMA of the run that was never stopped."""
    args = sd_args(toy_root, tmp_path, sd_files["txt2img"], RUNS["lora"][1])
    resumed = kill_after_two_steps_and_resume(args, tmp_path, monkeypatch, capsys)
    uninterrupted = torch.load(trained("lora") / "axf.pt", weights_only=True)
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        assert resumed[key].keys() == uninterrupted[key].keys()
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


# ----------------------------------------------------------------------------- step 0 is the pretrained model


def unet_inputs(channels=4):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, channels, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    return x, mask, torch.tensor([10, 900]), context


@pytest.mark.parametrize("mode", ["none", "lora", "full"])
def test_adapted_unet_at_step_0_is_the_pretrained_unet(mode, sd_files):
    """The mask channel's conv_in weights are zero and a fresh LoRA's up is zero: until they train, the adapted
    UNet given [x_t, mask] predicts exactly what the file's UNet predicts from x_t."""
    original = sd.load_sd(sd_files["txt2img"])[1]
    adapted = sd_backbone.adapt_sd_unet(sd.load_sd(sd_files["txt2img"])[1], mode, 4)
    x, mask, t, context = unet_inputs()
    with torch.no_grad():
        assert torch.equal(adapted(torch.cat([x, mask], dim=1), t, context), original(x, t, context))


def test_mask_input_false_keeps_the_text_to_image_unet_as_it_is(sd_files):
    """--unet_mask_input False: no fifth channel, so with --train_unet none not one UNet weight trains."""
    original = sd.load_sd(sd_files["txt2img"])[1]
    adapted = sd_backbone.adapt_sd_unet(sd.load_sd(sd_files["txt2img"])[1], "none", 4, unet_mask_input=False)
    x, _, t, context = unet_inputs()
    assert adapted.conv_in.in_channels == 4 and not any(p.requires_grad for p in adapted.parameters())
    with torch.no_grad():
        assert torch.equal(adapted(x, t, context), original(x, t, context))


@pytest.mark.parametrize("mode", ["none", "lora", "full"])
def test_train_unet_decides_which_unet_weights_train(mode, sd_files):
    """none: only the mask channel's conv_in weights (the mask must be read); lora: those and the adapters;
    full: all."""
    adapted = sd_backbone.adapt_sd_unet(sd.load_sd(sd_files["txt2img"])[1], mode, 4)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    everything = {n for n, _ in adapted.named_parameters()}
    adapters = {n for n in everything if ".lora." in n}
    conv_in = {"conv_in.extra_weight"}
    assert bool(adapters) == (mode == "lora")
    assert trainable == {"none": conv_in, "lora": conv_in | adapters, "full": everything}[mode]


def test_train_unet_none_trains_the_mask_channel_and_never_the_pretrained_conv_in(sd_files, toy_root):
    """--train_unet none is only the conditioning: of the widened conv_in, only the mask channel's weights (zero at
    first) learn; the pretrained weights of x_t's 4 channels and the bias stay the file's, bit for bit, through
    training steps (AdamW's weight decay alone would move any weight it was given)."""
    torch.manual_seed(0)
    model = sd_model(sd_files["txt2img"], train_unet="none", unet_mask_input=True)
    pretrained = sd.load_sd(sd_files["txt2img"])[1].conv_in
    normals, masks, captions, ids = few_shot_batch(toy_root)
    latents = model.encode_images(normals)
    optimizer = training.adamw(axf.parameter_groups(model), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(latents, masks, captions, ids, torch.tensor([True, True])).backward()
        optimizer.step()
    conv_in = model.unet.conv_in
    assert torch.equal(conv_in.weight, pretrained.weight) and torch.equal(conv_in.bias, pretrained.bias)
    assert conv_in.extra_weight.abs().sum() > 0


def test_a_widened_conv_in_is_one_tensor_in_an_sd_file(sd_files):
    """save_sd (sd.unet_to_sd) writes the widened conv_in as the plain 5-channel conv it computes."""
    adapted = sd_backbone.adapt_sd_unet(sd.load_sd(sd_files["txt2img"])[1], "none", 4)
    with torch.no_grad():
        adapted.conv_in.extra_weight.normal_()
    saved = sd.unet_to_sd(adapted.state_dict())
    conv_in = adapted.conv_in
    assert "conv_in.extra_weight" not in saved and "input_blocks.0.0.extra_weight" not in saved
    assert torch.equal(saved["input_blocks.0.0.weight"], torch.cat([conv_in.weight, conv_in.extra_weight], dim=1))
    assert torch.equal(saved["input_blocks.0.0.bias"], conv_in.bias)


def test_inpainting_unet_keeps_its_nine_channels_and_its_outputs(sd_files):
    """SD-inpainting already reads [x_t, mask, masked-image latent]: adapted with none it is the file's UNet,
    untouched and entirely frozen."""
    original = sd.load_sd(sd_files["inpainting"])[1]
    adapted = sd_backbone.adapt_sd_unet(sd.load_sd(sd_files["inpainting"])[1], "none", 4)
    assert adapted.conv_in.in_channels == 9 and not any(p.requires_grad for p in adapted.parameters())
    x, _, t, context = unet_inputs(9)
    with torch.no_grad():
        assert torch.equal(adapted(x, t, context), original(x, t, context))


def test_a_unet_of_neither_layout_is_refused():
    """5 input channels of a 4-channel latent is neither text-to-image nor SD-inpainting: say so, adapt nothing."""
    unet = UNet(5, 4, 32, (1, 2), 1, (0, 1), sd.SD_HEADS, 64)
    with pytest.raises(ValueError, match=r"5 input channels is neither text-to-image \(4\) nor inpainting \(9\)"):
        sd_backbone.adapt_sd_unet(unet, "none", 4)


# ----------------------------------------------------------------------------- e_t into the text encoder


def test_prompt_tokens_hold_every_placeholder_and_cut_a_long_caption(sd_files):
    """sd_prompt "{caption} *" becomes SD's 77 ids: start token, the caption's words, n placeholders (each one
    a token of e_t), end-token padding. A 100-word caption is cut, never a placeholder; a * in a caption is
    not one."""
    model = sd_model(sd_files["txt2img"])
    n = model.mif.num_context
    assert n == 6  # k = 2 tokens of each of the three modalities
    row = model.sd_adapter.prompt_tokens(["a red stain"], n)[0]
    words = clip.bpe_tokens("a red stain")
    assert row.shape == (77,) and row[0] == clip.START_ID
    assert row[1:1 + len(words)].tolist() == words
    assert row[1 + len(words):1 + len(words) + n].tolist() == [clip.PLACEHOLDER_ID] * n
    assert (row[1 + len(words) + n:] == clip.END_ID).all()
    long = model.sd_adapter.prompt_tokens([" ".join(["stain"] * 100)], n)[0]
    assert long.shape == (77,) and long[0] == clip.START_ID and long[-1] == clip.END_ID
    assert (long == clip.PLACEHOLDER_ID).sum() == n and (long[-1 - n:-1] == clip.PLACEHOLDER_ID).all()
    assert ((model.sd_adapter.prompt_tokens(["a * stain"], n)[0]) == clip.PLACEHOLDER_ID).sum() == n
    assert not (model.sd_adapter.prompt_tokens(["a red stain"], 0) == clip.PLACEHOLDER_ID).any()


@pytest.mark.parametrize("mode", ["splice", "append"])
def test_context_gradients_reach_e_t_and_never_the_frozen_networks(mode, sd_files, toy_root):
    """splice: e_t's n tokens replace the placeholders, the context is the encoder's 77 states; append: the
    prompt's own 77 states, then e_t's n tokens. Either way the loss's gradient reaches DDF, the projection to
    the text width and (for a dropped condition) the null context, and no weight of the text encoder, the VAE
    or CLIP."""
    torch.manual_seed(0)
    model = sd_model(sd_files["txt2img"], sd_context=mode)
    n, width = model.mif.num_context, model.sd_adapter.text_encoder.token_embedding.weight.shape[1]
    _, masks, captions, ids = few_shot_batch(toy_root)
    t = torch.tensor([10, 900])
    context = model.condition(captions, masks, ids, t, drop=torch.tensor([True, False]))
    assert context.shape == (2, 77 + (n if mode == "append" else 0), width)
    if mode == "append":  # the dropped condition's prompt is the empty caption's
        plain = model.sd_adapter.text_encoder.encode_text_tokens(model.sd_adapter.prompt_tokens(["", captions[1]], 0))
        assert torch.allclose(context[:, :77], plain, atol=1e-6)
    region = axf.latent_mask(masks, model.latent_factor)
    x = torch.randn(2, 4, 16, 16)
    model.unet(model.unet_input(x, region), t, context).square().sum().backward()
    for part in (model.ddf, model.sd_adapter.to_text):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.null_context.grad.abs().sum() > 0
    frozen = [*model.sd_adapter.text_encoder.parameters(), *model.vae.parameters(), *model.mif.clip.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


# ----------------------------------------------------------------------------- the command lines


def test_help_lists_the_sd_flags(capsys):
    """`train.py --help` documents --sd and --train_unet (with --lora_rank, --sd_context); `sample.py --help`
    its --sd for a file that has moved."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--sd ", "--train_unet ", "--lora_rank ", "--sd_context ", "--sd_prompt "):
        assert flag in text, flag
    assert "only the conditioning" in text  # train_unet's help text, not only its name
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "--sd SD" in capsys.readouterr().out


def test_a_run_is_not_resumed_with_sd_switched_on_or_off(trained, toy_root, sd_files, tmp_path):
    """--sd decides which networks a run trains: an --out_dir of a from-scratch run is refused with --sd, and an SD
    run's without it, both before any stage trains (no vae.pt is written into the SD run's folder)."""
    scratch = tmp_path / "scratch"
    train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(scratch), "--vae_channels", "32",
                "--vae_channel_mult", "1,2", "--unet_channels", "32", "--unet_channel_mult", "1,2",
                "--unet_num_heads", "8", "--vae_steps", "1", "--vae_batch_size", "2", "--steps", "1"] + SD_TINY +
               ["--vae_weights", "train"])
    with pytest.raises(ValueError, match="--sd"):
        train.main(sd_args(toy_root, scratch, sd_files["txt2img"], ["--train_unet", "none"]))
    sd_run = tmp_path / "sd_run"
    shutil.copytree(trained("none"), sd_run)
    with pytest.raises(ValueError, match="--sd"):
        train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(sd_run)] + SD_TINY)
    assert not (sd_run / "vae.pt").exists()
