"""sd.load_sd: Stable Diffusion 1.x single files into the project's VAE, UNet and CLIP text tower.

Parity numbers come from diffusers and transformers via tests/fixtures/make_sd_fixtures.py
(sd_reference.pt); the weights are rebuilt here from the script's seeded generator, written as an
original-layout SD file (safetensors by files.write_safetensors, or a Lightning-style .ckpt) and
loaded with sd.load_sd. The full-size SD-1.5 layout (sd_layouts.json.gz) is checked on the meta device; so are
the other layouts people download: diffusers folders (names as diffusers' save_pretrained writes them, stored in
sd_layouts.json.gz), Lightning .ckpt files with an EMA copy and numpy scalars, a separate VAE.
"""
import importlib.util
import os
import re
import runpy
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import axf
import clip
import files
import sd
import sd_backbone

FIXTURES = Path(__file__).parent / "fixtures"
EXTRA = {  # what real SD files carry besides the three networks; load_sd must ignore it
    "betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.linspace(1, 0.005, 1000),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
}


@pytest.fixture(scope="module")
def ref():
    """(reference outputs, the fixture script as a module, the stored layouts)."""
    spec = importlib.util.spec_from_file_location("make_sd_fixtures", FIXTURES / "make_sd_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports only torch at module level; diffusers only in main()
    return torch.load(FIXTURES / "sd_reference.pt", weights_only=True), script, script.layouts()


WEIGHTS = {}  # in_channels -> the tiny SD file's weights, drawn once


def tiny_weights(ref, in_channels):
    """The tiny SD file's weights, in original names, rebuilt from the fixture script's generator."""
    if in_channels not in WEIGHTS:
        data, script, layouts = ref
        weights = script.random_weights(layouts[f"tiny{in_channels}"], data["seed"])
        want = data["checksums"][str(in_channels)]
        assert torch.allclose(script.checksums(weights), want, rtol=1e-6), "this torch build draws other random weights"
        WEIGHTS[in_channels] = weights
    return WEIGHTS[in_channels]


def write(ref, path, weights, dtype=torch.float32):
    """An original-layout SD file of these weights: .safetensors, or a .ckpt as Lightning writes it."""
    tensors = {**{k: v.to(dtype) for k, v in weights.items()}, **EXTRA}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, "global_step": 840000, "epoch": 6}, path)
    else:
        files.write_safetensors(tensors, path, metadata={"format": "pt"})
    return path


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("in_channels, dtype, suffix", [
    (4, torch.float32, ".safetensors"),
    (4, torch.float32, ".ckpt"),
    (9, torch.float16, ".safetensors"),  # SD-1.5-inpainting's 9-channel UNet, as an fp16 file
    (9, torch.float16, ".ckpt"),
])
def test_load_sd_matches_diffusers_and_transformers(ref, tmp_path, in_channels, dtype, suffix):
    """Same weights, same inputs: ε, the posterior mode, the decoded image and the text hidden states equal
    diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel to 1e-4 relative."""
    data, script, _ = ref
    path = write(ref, tmp_path / f"tiny{suffix}", tiny_weights(ref, in_channels), dtype)
    vae, unet, text = sd.load_sd(path)
    assert not (vae.training or unet.training or text.training)
    assert vae.scale_factor.item() == pytest.approx(0.18215)
    assert unet.conv_in.in_channels == in_channels
    x, t, context, image, z, tokens = script.inputs(in_channels, text.transformer.width)
    with torch.no_grad():
        got = {"eps": unet(x, t, context), "mode": vae.encode(image).mode(), "decoded": vae.decode(z),
               "hidden": text.encode_text_tokens(tokens)}
    for name, value in got.items():
        want = data["outputs"][str(in_channels)][name]
        assert value.shape == want.shape and relative_error(value, want) < 1e-4, name


def test_sizes_are_read_from_the_shapes(ref, tmp_path):
    """No size table: widths, levels, attention levels, input channels and context width come from the file."""
    vae, unet, text = sd.load_sd(write(ref, tmp_path / "tiny.safetensors", tiny_weights(ref, 9)))
    assert unet.sd_sizes == dict(in_channels=9, out_channels=4, channels=32, channel_mult=(1, 2, 4, 4),
                                 num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=8, context_dim=128)
    assert vae.sd_sizes == dict(in_channels=3, channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4)
    assert (text.transformer.width, text.transformer.layers, text.context_length, text.vocab_size) == (128, 2, 77, 49408)
    assert text.transformer.resblocks[0].attn.n_head == 2 and text.text_only and not hasattr(text, "visual")


def test_text_encoder_parity_depends_on_quick_gelu(ref, tmp_path):
    """SD's text encoder uses CLIP's quick_gelu: with the exact GELU the hidden states would miss the reference."""
    data, script, _ = ref
    _, _, text = sd.load_sd(write(ref, tmp_path / "tiny.safetensors", tiny_weights(ref, 4)))
    for block in text.transformer.resblocks:
        block.mlp.gelu = nn.GELU()
    tokens = script.inputs(4, 128)[-1]
    with torch.no_grad():
        assert relative_error(text.encode_text_tokens(tokens), data["outputs"]["4"]["hidden"]) > 1e-3


def importable_as(monkeypatch, obj, module, name):
    """Make `obj` pickle as module.name (the name the library that wrote real files gave it): pickle writes an
    object's __module__ and __qualname__ and checks that importing them gives it back."""
    for i in range(1, module.count(".") + 2):
        parent = ".".join(module.split(".")[:i])
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setattr(sys.modules[module], name, obj, raising=False)
    obj.__module__, obj.__qualname__ = module, name


def unet_of(state):
    """The UNet tensors of an original-layout state dict, prefix removed."""
    prefix = sd.SD_PREFIXES["UNet"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_v1_5_pruned_ckpt_loads_weights_only_with_its_ema_unet(ref, tmp_path, monkeypatch, capsys):
    """v1-5-pruned.ckpt as LDM's Lightning training wrote it: the raw UNet under model.diffusion_model.*, LitEma's
    copy under model_ema.* (the parameter names without their dots, plus decay and num_updates), the VAE's loss
    buffer, the schedule, and callback state keyed by pytorch_lightning's ModelCheckpoint holding numpy scalars,
    one pickled under numpy 1's name numpy.core.multiarray.scalar. Without pytorch_lightning, weights-only, it
    gives the EMA UNet by default (one line says so) and the raw one with weights="raw"; the rest is skipped
    with a count."""
    weights = tiny_weights(ref, 4)
    raw = {k: -v for k, v in unet_of(weights).items()}
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in unet_of(weights).items()}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema  # v1-5-pruned.ckpt's name of conv_in's weight
    state = {**weights, **{sd.SD_PREFIXES["UNet"] + k: v for k, v in raw.items()}, **ema, **EXTRA,
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
             "first_stage_model.loss.logvar": torch.zeros(())}
    with monkeypatch.context() as m:
        ModelCheckpoint = type("ModelCheckpoint", (), {})
        importable_as(m, ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
        scalar = np.float64(0).__reduce__()[0]  # numpy's: numpy 1 names it numpy.core..., numpy 2 numpy._core...
        if scalar.__module__ != "numpy.core.multiarray":  # numpy 2: write one as numpy 1 did
            scalar = lambda dtype, data: np.frombuffer(data, dtype)[0]
            importable_as(m, scalar, "numpy.core.multiarray", "scalar")
        numpy1 = type("Numpy1Scalar", (), {"__reduce__": lambda self: (scalar, (np.dtype("f8"), np.float64(np.inf).tobytes()))})
        callbacks = {ModelCheckpoint: {"best_model_score": np.float64(0.25), "kth_value": numpy1(), "dirpath": "logs"}}
        torch.save({"state_dict": state, "callbacks": callbacks, "global_step": 840000}, tmp_path / "v1-5-pruned.ckpt")
    pickled = zipfile.ZipFile(tmp_path / "v1-5-pruned.ckpt").read("v1-5-pruned/data.pkl")
    assert b"numpy.core.multiarray\nscalar" in pickled and b"pytorch_lightning" in pickled
    assert "pytorch_lightning" not in sys.modules
    capsys.readouterr()
    _, unet, _ = sd.load_sd(tmp_path / "v1-5-pruned.ckpt")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "using the EMA ones" in lines[0], lines
    assert "2 model_ema.*" in lines[1] and "1 first_stage_model.loss.*" in lines[1] and "top-level buffers" in lines[1]
    assert all(torch.equal(v, unet_of(weights)[k]) for k, v in sd.unet_to_sd(unet.state_dict()).items())
    _, unet, _ = sd.load_sd(tmp_path / "v1-5-pruned.ckpt", weights="raw")
    assert "688 model_ema.*" in capsys.readouterr().out
    assert all(torch.equal(v, raw[k]) for k, v in sd.unet_to_sd(unet.state_dict()).items())


def test_a_file_that_pickles_anything_else_is_refused_naming_it(tmp_path, monkeypatch):
    """Loading stays weights-only: an object of any other class is refused in one plain line that names its class
    (not torch's multi-line message with terminal colour codes) and points to the .safetensors release."""
    with monkeypatch.context() as m:
        Config = type("Config", (), {})
        importable_as(m, Config, "mytrainer.config", "Config")
        torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "cfg": Config()}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError) as error:
        sd.load_sd(tmp_path / "x.ckpt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'x.ckpt'}: pickles mytrainer.config.Config") and ".safetensors release" in message
    assert "\n" not in message and "\x1b" not in message and "Weights only" not in message


def test_a_legacy_format_torch_file_is_read(tmp_path):
    """torch.save before torch 1.6 wrote a bare pickle, not a zip: read weights-only too (no memory map)."""
    tensor = torch.arange(4.0)
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": tensor}, "epoch": np.int64(6)}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "old.ckpt")
    assert torch.equal(sd.read_checkpoint(tmp_path / "old.ckpt")["model.diffusion_model.out.2.bias"], tensor)


# ----------------------------------------------------------------------------- the rename rules, one by one


def test_unet_rule_renames_compvis_keys_and_reshapes_conv_proj():
    """sd.unet_from_sd: SD-1.x's names (CompVis openaimodel.py) -> ours; 1x1-conv proj_in/out become Linear."""
    w = torch.randn(8, 8, 1, 1)
    renamed = sd.unet_from_sd({
        "input_blocks.0.0.weight": torch.zeros(1), "input_blocks.3.0.op.weight": torch.zeros(1),
        "input_blocks.4.0.skip_connection.bias": torch.zeros(1), "input_blocks.1.0.emb_layers.1.weight": torch.zeros(1),
        "input_blocks.1.1.proj_in.weight": w, "output_blocks.2.1.conv.weight": torch.zeros(1),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": torch.zeros(1),
        "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0.bias": torch.zeros(1),
        "out.0.weight": torch.zeros(1), "out.2.bias": torch.zeros(1)})
    assert list(renamed) == ["conv_in.weight", "input_blocks.2.0.conv.weight", "input_blocks.3.0.skip.bias",
                             "input_blocks.0.0.time_proj.weight", "input_blocks.0.1.proj_in.weight",
                             "output_blocks.2.1.conv.weight", "middle_block.1.block.ff.proj.weight",
                             "output_blocks.5.1.block.attn2.to_out.bias", "norm_out.weight", "conv_out.bias"]
    assert torch.equal(renamed["input_blocks.0.1.proj_in.weight"], w[:, :, 0, 0])


def test_vae_rule_accepts_mid_attention_stored_as_linear():
    """sd.vae_from_sd keeps SD's names; a mid-attention weight stored as Linear [C, C] becomes the 1x1 conv."""
    w = torch.randn(32, 32)
    renamed = sd.vae_from_sd({"encoder.mid.attn_1.q.weight": w, "decoder.mid.attn_1.proj_out.weight": w[:, :, None, None],
                              "encoder.mid.attn_1.q.bias": w[0], "quant_conv.weight": torch.zeros(8, 8, 1, 1)})
    q, proj_out = renamed["encoder.mid.attn_1.q.weight"], renamed["decoder.mid.attn_1.proj_out.weight"]
    assert q.shape == proj_out.shape == (32, 32, 1, 1)
    assert torch.equal(q[:, :, 0, 0], w) and renamed["encoder.mid.attn_1.q.bias"].shape == (32,)


def test_text_from_hf_maps_transformers_names_and_stacks_q_k_v():
    """transformers' CLIPTextModel keys map onto OpenAI's; in_proj is q, k and v stacked in that order."""
    model = clip.CLIP(None, None, 0, None, None, 77, 1000, 64, 1, 2)
    ours = model.state_dict()
    hf = {"text_model.embeddings.token_embedding.weight": ours["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": ours["positional_embedding"],
          "text_model.embeddings.position_ids": torch.arange(77)[None],
          "text_model.final_layer_norm.weight": ours["ln_final.weight"], "text_model.final_layer_norm.bias": ours["ln_final.bias"]}
    names = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(2):
        for a, b in names.items():
            for kind in ("weight", "bias"):
                hf[f"text_model.encoder.layers.{i}.{b}.{kind}"] = ours[f"transformer.resblocks.{i}.{a}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = ours[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3)
            for name, t in zip("qkv", (q, k, v)):
                hf[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = t
    converted = sd.text_from_hf(hf)
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], v) for k, v in ours.items())


# ----------------------------------------------------------------------------- diffusers folders, a separate VAE


def diffusers_folder(ref, folder, weights, kind="safetensors", parts=("unet", "vae", "text_encoder")):
    """The weights as a diffusers folder, with the files and tensor names diffusers' and transformers'
    save_pretrained write (sd_layouts.json.gz): safetensors, the fp16 variant alone, or the .bin pickles."""
    layout = ref[2]["diffusers_tiny4"]
    for sub in parts:
        tensors = {saved: weights[original] for saved, original in layout["keys"][sub]}
        if sub == "vae":  # diffusers' VAE attention is Linear [C, C], LDM's a 1x1 conv
            tensors = {k: v.flatten(1) if ".attentions." in k and v.ndim == 4 else v for k, v in tensors.items()}
        file = folder / layout["files"][sub][kind]
        file.parent.mkdir(parents=True, exist_ok=True)
        if kind == "bin":
            torch.save(tensors, file)
        else:
            files.write_safetensors({k: v.half() if kind == "fp16" else v for k, v in tensors.items()}, file)
    return folder


def assert_same_modules(a, b):
    for m, n in zip(a, b):
        mine, theirs = m.state_dict(), n.state_dict()  # once: a state_dict() walks the whole module
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())


@pytest.mark.parametrize("kind", ["safetensors", "fp16", "bin"])
def test_diffusers_folder_loads_as_the_single_file_it_was_converted_from(ref, tmp_path, kind):
    """A diffusers folder (unet/, vae/, text_encoder/) gives the very modules of the single file of the same
    weights: in fp32 safetensors (chosen over an fp16 variant beside it; its UNet matches diffusers' ε), as the
    fp16 variant alone (equal to an fp16 single file), or as .bin pickles with the names of older libraries
    (transformers 4's text_model. prefix, as SD-1.5's own folder has it; the VAE attention's query, key, value,
    proj_attn of diffusers before 0.14)."""
    data, script, _ = ref
    weights = tiny_weights(ref, 4)
    folder = diffusers_folder(ref, tmp_path / "stable-diffusion-v1-5", weights, kind)
    if kind == "safetensors":  # never read: full precision comes first
        (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read")
    if kind == "bin":
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        renamed = lambda k: re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k)
        vae = torch.load(folder / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
        torch.save({renamed(k): v for k, v in vae.items()}, folder / "vae" / "diffusion_pytorch_model.bin")
        text = torch.load(folder / "text_encoder" / "pytorch_model.bin", weights_only=True)
        torch.save({"text_model." + k: v for k, v in text.items()}, folder / "text_encoder" / "pytorch_model.bin")
    dtype = torch.float16 if kind == "fp16" else torch.float32
    modules = sd.load_sd(folder)
    assert_same_modules(modules, sd.load_sd(write(ref, tmp_path / "single.safetensors", weights, dtype)))
    if kind == "safetensors":
        x, t, context = script.inputs(4, 128)[:3]
        with torch.no_grad():
            assert relative_error(modules[1](x, t, context), data["outputs"]["4"]["eps"]) < 1e-4


def test_a_separate_vae_replaces_the_files_own(ref, tmp_path, capsys):
    """vae= (--sd_vae): a VAE-only .ckpt as vae-ft-mse-840000-ema-pruned.ckpt ships it (LDM names, no prefix, with its
    loss buffers and EMA counters), or a diffusers pipeline folder's vae/, gives the VAE; the UNet and text
    encoder stay the file's."""
    weights = tiny_weights(ref, 4)
    path = write(ref, tmp_path / "tiny.safetensors", weights)
    prefix = sd.SD_PREFIXES["VAE"]
    other = {k: v * 0.5 if k.startswith(prefix) else v for k, v in weights.items()}  # another VAE
    vae_only = {k[len(prefix):]: v for k, v in other.items() if k.startswith(prefix)}
    torch.save({"state_dict": {**vae_only, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}},
               tmp_path / "vae-ft-mse.ckpt")
    own = sd.load_sd(path)
    for vae_path in (tmp_path / "vae-ft-mse.ckpt", diffusers_folder(ref, tmp_path / "pipeline", other, parts=("vae",))):
        vae, unet, text = sd.load_sd(path, vae=vae_path)
        assert all(torch.equal(v, vae_only[k].reshape(v.shape)) for k, v in sd.vae_to_sd(vae.state_dict()).items())
        assert_same_modules((unet, text), own[1:])
    out = capsys.readouterr().out
    assert "vae-ft-mse.ckpt: skipped 2 tensors no network uses (1 loss.*, 1 model_ema.*)" in out
    assert "tiny.safetensors: skipped 251 tensors no network uses (248 first_stage_model.*, " in out  # its own VAE


# ----------------------------------------------------------------------------- SD-1.5 at full size


def meta_state_dict(layout):
    return {k: torch.empty(shape, device="meta") for k, shape in layout}


@pytest.mark.parametrize("in_channels, unet_params", [(4, 859_520_964), (9, 859_535_364)])
def test_sd15_layout_loads_key_for_key_and_shape_for_shape(ref, in_channels, unet_params):
    """Every tensor of a real SD-1.5 file (686 UNet, 248 VAE, 196 text; layout made from diffusers' and
    transformers' SD-1.5 configs) fills the modules strictly; the sizes come out as SD-1.5's."""
    layout = ref[2]["sd15"]
    counts = [sum(1 for k, _ in layout if k.startswith(p)) for p in sd.SD_PREFIXES.values()]
    assert counts == [686, 248, 196]
    state = meta_state_dict(layout)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, in_channels, 3, 3, device="meta")
    vae, unet, text = sd.build_sd(state, "sd15", device="meta")
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert (params(unet), params(vae), params(text)) == (unet_params, 83_653_863, 123_060_480)
    assert len(unet.state_dict()) == 686 and len(vae.state_dict()) == 248 + 1  # + the scale_factor buffer
    assert unet.sd_sizes == dict(in_channels=in_channels, out_channels=4, channels=320, channel_mult=(1, 2, 4, 4),
                                 num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=8, context_dim=768)
    assert (text.transformer.width, text.transformer.layers, text.transformer.resblocks[0].attn.n_head) == (768, 12, 12)


def test_a_wrong_shape_or_a_missing_tensor_is_named(ref):
    """Strict loading: one shape check per tensor, every tensor of the module must be in the file, and an unknown
    one under a network's prefix is an error too (only known extras are skipped)."""
    layout = ref[2]["sd15"]
    state = meta_state_dict(layout)
    key = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    state[key] = torch.empty(1280, 1024, device="meta")
    with pytest.raises(ValueError, match=r"sd15: UNet tensor output_blocks\.4\.1\.block\.attn2\.to_v\.weight has shape"):
        sd.build_sd(state, "sd15", device="meta")
    state = {**meta_state_dict(layout), "cond_stage_model.transformer.text_model.pooler.weight": torch.empty(1, device="meta")}
    with pytest.raises(ValueError, match=r"its text encoder does not have SD-1.x's layout \(missing \[\], unexpected \['pooler.weight'\]"):
        sd.build_sd(state, "sd15", device="meta")
    state = meta_state_dict(layout)
    del state["first_stage_model.decoder.up.2.block.1.norm1.bias"]
    with pytest.raises(ValueError, match=r"sd15: its VAE does not have SD-1.x's layout \(missing \['decoder.up.2.block.1.norm1.bias'\]"):
        sd.build_sd(state, "sd15", device="meta")


# ----------------------------------------------------------------------------- the safetensors reader


def test_reader_matches_the_safetensors_library(ref, tmp_path):
    """A file written by the safetensors package (F32, F16, BF16, I64, a 0-d tensor, metadata) reads back
    bit for bit, and so does the test writer's output."""
    data, script, _ = ref
    (tmp_path / "ref.safetensors").write_bytes(data["safetensors_file"].numpy().tobytes())
    files.write_safetensors(data["safetensors_tensors"], tmp_path / "ours.safetensors")
    for file in (tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"):
        got = files.read_safetensors(file)
        assert got.keys() == data["safetensors_tensors"].keys()
        for name, want in data["safetensors_tensors"].items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_reader_maps_the_file_instead_of_reading_it(ref, tmp_path):
    """The tensors view one memory map of the file (a 4 GB file is not copied into memory): they share
    its buffer, and the file is never written."""
    path = tmp_path / "t.safetensors"
    files.write_safetensors({"a": torch.ones(1000), "b": torch.zeros(10)}, path)
    before = path.read_bytes()
    tensors = files.read_safetensors(path)
    a, b = tensors["a"], tensors["b"]
    assert a.untyped_storage().data_ptr() + 4000 == b.untyped_storage().data_ptr()  # consecutive in one map
    a.mul_(2)  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- bad files: one clear line


def test_missing_file_or_a_folder_of_another_kind(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file .*Stable Diffusion 1.x"):
        sd.load_sd(tmp_path / "nope.safetensors")
    (tmp_path / "pipeline" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pipeline: a folder without unet/diffusion_pytorch_model.safetensors"):
        sd.load_sd(tmp_path / "pipeline")
    (tmp_path / "pipeline" / "text_encoder_2").mkdir()
    with pytest.raises(ValueError, match="pipeline: a diffusers SDXL pipeline"):
        sd.load_sd(tmp_path / "pipeline")


@pytest.mark.parametrize("content, what", [
    (b"", "an empty file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:6ce0\nsize 4265380512\n",
     "a Git LFS pointer .*4265380512 bytes of weights.*run `git lfs pull`"),
    (b'{\n  "_class_name": "StableDiffusionPipeline",\n  "_diffusers_version": "0.6.0"\n}', "a JSON file.*give the folder"),
])
def test_files_that_are_no_weights_say_what_they_are(tmp_path, content, what):
    (tmp_path / "model_index.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"model_index.json: {what}"):
        sd.load_sd(tmp_path / "model_index.json")


@pytest.mark.parametrize("checkpoint, what", [
    ({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "rust", "step": 500},
     "a textual-inversion embedding"),
    ({"state_dict": {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}},
     "a state dict wrapped one level too deep .*under 'state_dict' on its own"),
    ({"model": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, "a state dict wrapped one level too deep .*under 'model'"),
])
def test_torch_files_that_are_not_sd1_say_what_they_are(tmp_path, checkpoint, what):
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"other.pt: {what}"):
        sd.load_sd(tmp_path / "other.pt")


def test_truncated_files(ref, tmp_path):
    """An interrupted download is the usual cause: say 'truncated', for both formats."""
    small = {k: v for k, v in tiny_weights(ref, 4).items() if not k.startswith("cond_stage_model")}
    for suffix in (".safetensors", ".ckpt"):
        full = write(ref, tmp_path / f"full{suffix}", small).read_bytes()
        for cut in (len(full) // 2, 100):  # in the data; in the safetensors header
            (tmp_path / f"cut{suffix}").write_bytes(full[:cut])
            with pytest.raises(ValueError, match=rf"cut{suffix}: truncated"):
                sd.load_sd(tmp_path / f"cut{suffix}")


def test_neither_safetensors_nor_torch_file(tmp_path):
    (tmp_path / "notes.txt").write_text("a text file, not weights")
    with pytest.raises(ValueError, match="notes.txt: neither a safetensors file nor a PyTorch checkpoint"):
        sd.load_sd(tmp_path / "notes.txt")


def test_corrupted_safetensors_header(tmp_path):
    """A header that is not the format's JSON (here: a tensor without its offsets) is named, not a KeyError."""
    body = b'{"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [4]}}'
    (tmp_path / "bad.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(ValueError, match="bad.safetensors: corrupted safetensors file"):
        sd.load_sd(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("keys, what", [
    ({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}, "holds no Stable Diffusion VAE"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "a VAE on its own"),
    ({"encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3)}, "a VAE on its own"),
    ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "a diffusers-layout file"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
      "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ()}, "a LoRA"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 320)}, "a LoRA"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3), "control_model.zero_convs.0.0.weight": (320, 320, 1, 1)},
     "a ControlNet"),
    ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
     "a ControlNet"),
    ({"emb_params": (4, 768)}, "a textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3), "model.diffusion_model.out.2.weight": (4, 320, 3, 3)},
     "an InstructPix2Pix checkpoint"),
    ({"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
      "cond_stage_model.model.token_embedding.weight": (10, 1024)}, "a Stable Diffusion 2.x checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "an SDXL checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.transformer.token_emb.weight": (10, 1280)}, "an LDM txt2img checkpoint"),
])
def test_files_that_are_not_sd1_say_what_they_are(ref, tmp_path, keys, what):
    """An incomplete, VAE-only, diffusers-layout, LoRA, ControlNet, textual-inversion, InstructPix2Pix, SD-2, SDXL
    or LDM-BERT file is named as such in one line."""
    files.write_safetensors({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=f"other.safetensors: {what}") as error:
        sd.load_sd(tmp_path / "other.safetensors")
    assert "\n" not in str(error.value)


def test_command_line_prints_sizes_or_one_error_line(ref, tmp_path, monkeypatch, capsys):
    """`python sd.py --sd FILE` prints what it found; a bad file gives one line, not a traceback."""
    path = write(ref, tmp_path / "tiny.safetensors", tiny_weights(ref, 4))
    monkeypatch.setattr(sys, "argv", ["sd.py", "--sd", str(path)])
    runpy.run_path(sd.__file__, run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "skipped 3 tensors no network uses" in out[0]  # the schedule and position_ids of EXTRA
    assert out[2].startswith("UNet: ") and "'channel_mult': (1, 2, 4, 4)" in out[2]
    monkeypatch.setattr(sys, "argv", ["sd.py", "--sd", str(tmp_path / "nope.ckpt")])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(sd.__file__, run_name="__main__")
    assert str(exit.value).startswith("error: ") and "nope.ckpt: no such file" in str(exit.value)
    assert "\n" not in str(exit.value)


# ----------------------------------------------------------------------------- save_sd: the inverse of load_sd


VAE_ATTENTION = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def original_name(key):
    """Real SD-1.x files name the text encoder `cond_stage_model.transformer.text_model.…` (save_sd writes that);
    the fixtures' layouts, made with transformers 5, lack `text_model.`. load_sd reads both."""
    return key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")


def original_shape(key, shape):
    """Real SD-1.x files keep the VAE's mid-block attention as 1x1 convs [C, C, 1, 1] (save_sd writes that);
    the fixtures' layouts store them as [C, C]. load_sd reads both."""
    return tuple(shape)[:2] if VAE_ATTENTION.search(key) else tuple(shape)


@pytest.mark.parametrize("in_channels, suffix", [(4, ".safetensors"), (9, ".ckpt")])
def test_save_sd_writes_back_the_file_it_loaded(ref, tmp_path, in_channels, suffix):
    """load_sd -> save_sd gives the original file's tensors under the original names (nothing renamed wrong,
    nothing added but what load_sd drops), and loading it again gives identical modules and outputs."""
    weights = tiny_weights(ref, in_channels)
    vae, unet, text = sd.load_sd(write(ref, tmp_path / f"a{suffix}", weights))
    path = sd.save_sd(tmp_path / f"b{suffix}", vae, unet, text)
    saved = {original_name(k): v for k, v in sd.read_checkpoint(path).items()}
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k].reshape(v.shape), v) for k, v in weights.items())
    assert all(saved[k].shape == (128, 128, 1, 1) for k in saved if VAE_ATTENTION.search(k))
    vae2, unet2, text2 = sd.load_sd(path)
    x, t, context, image, z, tokens = ref[1].inputs(in_channels, 128)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), unet2(x, t, context))
        assert torch.equal(vae.decode(z), vae2.decode(z))
        assert torch.equal(text.encode_text_tokens(tokens), text2.encode_text_tokens(tokens))


def test_save_sd_names_every_tensor_of_the_sd15_layout(ref):
    """At SD-1.5's full size (meta device): the writer's names are exactly a real SD-1.5 file's, shape for shape."""
    layout = dict(ref[2]["sd15"])
    vae, unet, text = sd.build_sd(meta_state_dict(layout.items()), "sd15", device="meta")
    names = {**{sd.SD_PREFIXES["UNet"] + k: v for k, v in sd.unet_to_sd(unet.state_dict()).items()},
             **{sd.SD_PREFIXES["VAE"] + k: v for k, v in sd.vae_to_sd(vae.state_dict()).items()},
             **{sd.SD_PREFIXES["text encoder"] + k: v for k, v in sd.text_to_hf(text.state_dict()).items()}}
    names = {original_name(k): v for k, v in names.items()}
    assert names.keys() == layout.keys()
    assert all(original_shape(k, v.shape) == tuple(layout[k]) for k, v in names.items())


def test_save_sd_refuses_what_load_sd_would_misread(tmp_path):
    """A UNet with LoRA adapters (no SD key for them) or with other head counts than SD-1.x's 8 is refused."""
    from sd_backbone import add_lora
    from unet import UNet
    from vae import VAE
    vae, text = VAE(3, 32, (1, 2), 1, 4), axf.clip.CLIP(None, None, 0, None, None, 77, 49408, 64, 1, 1)
    with pytest.raises(ValueError, match="head counts"):
        sd.save_sd(tmp_path / "x.safetensors", vae, UNet(4, 4, 32, (1, 2), 1, (1,), 4, 64), text)
    unet = UNet(4, 4, 32, (1, 2), 1, (1,), 8, 64)
    add_lora(unet, 2)
    with pytest.raises(ValueError, match="merge_lora"):
        sd.save_sd(tmp_path / "x.safetensors", vae, unet, text)


# ----------------------------------------------------------------------------- files that claim more than they hold


def test_a_ckpt_whose_text_encoder_repeats_one_number_is_refused_before_building(ref, tmp_path, monkeypatch):
    """torch.save stores torch.zeros(1).expand(N, 64) in a few bytes: a file of kilobytes would build (and fill) a
    text encoder of N x 64 parameters. It is refused as it is read, naming the file and the tensor."""
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    weights = dict(tiny_weights(ref, 4), **{key: torch.zeros(1).expand(4_000_000, 64)})
    path = write(ref, tmp_path / "forged.ckpt", weights)
    monkeypatch.setattr(sd, "build", lambda *a: pytest.fail("a network was built"))
    with pytest.raises(ValueError) as error:
        sd.load_sd(path)
    assert str(error.value).startswith(f"{path}: tensor state_dict.{key} claims shape [4000000, 64] (1,024,000,000 "
                                       f"bytes) but holds 4 bytes"), error.value


def test_sizes_that_describe_a_bigger_network_than_the_tensors_are_refused_before_any_memory(ref, tmp_path, monkeypatch):
    """A shape read for the sizes (the text encoder's vocabulary: token_embedding's rows) that the other tensors do
    not match is refused on the meta device, before the module is allocated; so is a UNet whose block count, read
    off a key's index, exceeds its tensors (a million blocks from two keys)."""
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    path = write(ref, tmp_path / "narrow.safetensors", dict(tiny_weights(ref, 4), **{key: torch.zeros(1_000_000, 1)}))
    monkeypatch.setattr(clip.CLIP, "to_empty", lambda *a, **k: pytest.fail("memory was allocated"), raising=False)
    with pytest.raises(ValueError, match=r"narrow.safetensors: text encoder tensor token_embedding.weight has shape "
                                         r"\[1000000, 1\], expected \[1000000, 128\]"):
        sd.load_sd(path)
    monkeypatch.undo()
    state = {k: v for k, v in meta_state_dict(ref[2]["sd15"]).items() if not re.search(r"input_blocks\.\d+\.0\.op\.", k)}
    state["model.diffusion_model.input_blocks.1000001.0.op.weight"] = torch.empty(1, device="meta")
    state["model.diffusion_model.input_blocks.1000002.0.in_layers.2.weight"] = torch.empty(640, device="meta")
    rename, sizes, _ = sd.BUILDERS["UNet"]
    monkeypatch.setitem(sd.BUILDERS, "UNet", (rename, sizes, lambda **k: pytest.fail("a UNet was built")))
    with pytest.raises(ValueError, match=r"sd15: its UNet claims 2,000,000 residual blocks but holds 682 tensors"):
        sd.build_sd(state, "sd15", device="meta")


def test_a_pipe_or_a_device_is_refused_wherever_an_sd_file_goes(ref, tmp_path):
    """--sd <(cat file) gives /dev/fd/N, a link to a pipe; a named pipe without a writer would block a reader for
    ever. Each place a file is read from refuses one in a line, without waiting on it."""
    from test_files import without_blocking
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    (tmp_path / "link").symlink_to(pipe)
    folder = diffusers_folder(ref, tmp_path / "pipeline", tiny_weights(ref, 4), parts=("vae", "text_encoder"))
    (folder / "unet").mkdir()
    os.mkfifo(folder / "unet" / "diffusion_pytorch_model.safetensors")
    real = write(ref, tmp_path / "tiny.safetensors", tiny_weights(ref, 4))
    for call, path in ((sd.load_sd, pipe), (sd.load_sd, tmp_path / "link"), (sd.read_file, pipe),
                       (lambda vae: sd.load_sd(real, vae=vae), pipe), (sd_backbone.sd_file, pipe),
                       (lambda path: sd_backbone.check_sd_file(path, {"path": "x", "size": 1, "sha256": "0" * 64}), pipe),
                       (sd.load_sd, folder)):
        error = without_blocking(call, path)
        assert isinstance(error, ValueError) and "a pipe, not a file" in str(error) and "\n" not in str(error), error
