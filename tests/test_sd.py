"""sd.load_sd: Stable Diffusion 1.x single files into the project's VAE, UNet and CLIP text tower.

Parity numbers come from diffusers and transformers via tests/fixtures/make_sd_fixtures.py
(sd_reference.pt); the weights are rebuilt here from the script's seeded generator, written as an
original-layout SD file (safetensors by sd.write_safetensors, or a Lightning-style .ckpt) and
loaded with sd.load_sd. The full-size SD-1.5 layout (sd_layouts.json.gz) is checked on the meta device.
"""
import importlib.util
import re
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import axf
import sd

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
        sd.write_safetensors(tensors, path, metadata={"format": "pt"})
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


def test_lightning_ckpt_with_callback_state_loads_weights_only(ref, tmp_path, monkeypatch):
    """Lightning-era .ckpt files pickle a ModelCheckpoint object beside the weights; weights-only loading
    must still read them (without running the file's code)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names:  # pickle imports the class's module, parents first
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    weights = tiny_weights(ref, 4)
    torch.save({"state_dict": weights, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, tmp_path / "pl.ckpt")
    for name in names:  # the user has no pytorch_lightning installed
        monkeypatch.delitem(sys.modules, name)
    _, unet, _ = sd.load_sd(tmp_path / "pl.ckpt")
    assert torch.equal(unet.conv_out.weight, weights["model.diffusion_model.out.2.weight"])


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
    """Strict loading: one shape check per tensor, and every tensor of the module must be in the file."""
    layout = ref[2]["sd15"]
    state = meta_state_dict(layout)
    key = "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    state[key] = torch.empty(1280, 1024, device="meta")
    with pytest.raises(ValueError, match=r"sd15: UNet tensor output_blocks\.4\.1\.block\.attn2\.to_v\.weight has shape"):
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
    sd.write_safetensors(data["safetensors_tensors"], tmp_path / "ours.safetensors")
    for file in (tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"):
        got = sd.read_safetensors(file)
        assert got.keys() == data["safetensors_tensors"].keys()
        for name, want in data["safetensors_tensors"].items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_reader_maps_the_file_instead_of_reading_it(ref, tmp_path):
    """The tensors view one memory map of the file (a 4 GB file is not copied into memory): they share
    its buffer, and the file is never written."""
    path = tmp_path / "t.safetensors"
    sd.write_safetensors({"a": torch.ones(1000), "b": torch.zeros(10)}, path)
    before = path.read_bytes()
    tensors = sd.read_safetensors(path)
    a, b = tensors["a"], tensors["b"]
    assert a.untyped_storage().data_ptr() + 4000 == b.untyped_storage().data_ptr()  # consecutive in one map
    a.mul_(2)  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- bad files: one clear line


def test_missing_file_or_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file .*Stable Diffusion 1.x"):
        sd.load_sd(tmp_path / "nope.safetensors")
    (tmp_path / "pipeline" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="pipeline: a folder .*Stable Diffusion 1.x single file is expected"):
        sd.load_sd(tmp_path / "pipeline")


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
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "holds no Stable Diffusion UNet"),
    ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "a diffusers-layout file"),
    ({"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
      "cond_stage_model.model.token_embedding.weight": (10, 1024)}, "a Stable Diffusion 2.x checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "an SDXL checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.transformer.token_emb.weight": (10, 1280)}, "an LDM txt2img checkpoint"),
])
def test_files_that_are_not_sd1_say_what_they_are(ref, tmp_path, keys, what):
    """A VAE-only, diffusers-layout, SD-2, SDXL or LDM-BERT file is named as such, and SD-1.x is asked for."""
    sd.write_safetensors({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=f"other.safetensors: {what}.*Stable Diffusion 1.x single file expected"):
        sd.load_sd(tmp_path / "other.safetensors")


def test_command_line_prints_sizes_or_one_error_line(ref, tmp_path, monkeypatch, capsys):
    """`python sd.py --sd FILE` prints what it found; a bad file gives one line, not a traceback."""
    path = write(ref, tmp_path / "tiny.safetensors", tiny_weights(ref, 4))
    monkeypatch.setattr(sys, "argv", ["sd.py", "--sd", str(path)])
    runpy.run_path(sd.__file__, run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith("UNet: ") and "'channel_mult': (1, 2, 4, 4)" in out[1]
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
    names = {**{sd.SD_PREFIXES["UNet"] + k: v for k, v in sd.unet_module.to_sd(unet.state_dict()).items()},
             **{sd.SD_PREFIXES["VAE"] + k: v for k, v in sd.vae_module.to_sd(vae.state_dict()).items()},
             **{sd.SD_PREFIXES["text encoder"] + k: v for k, v in sd.clip.to_hf_text(text.state_dict()).items()}}
    names = {original_name(k): v for k, v in names.items()}
    assert names.keys() == layout.keys()
    assert all(original_shape(k, v.shape) == tuple(layout[k]) for k, v in names.items())


def test_save_sd_refuses_what_load_sd_would_misread(tmp_path):
    """A UNet with LoRA adapters (no SD key for them) or with other head counts than SD-1.x's 8 is refused."""
    from unet import UNet, add_lora
    from vae import VAE
    vae, text = VAE(3, 32, (1, 2), 1, 4), axf.clip.CLIP(None, None, 0, None, None, 77, 49408, 64, 1, 1)
    with pytest.raises(ValueError, match="head counts"):
        sd.save_sd(tmp_path / "x.safetensors", vae, UNet(4, 4, 32, (1, 2), 1, (1,), 4, 64), text)
    unet = UNet(4, 4, 32, (1, 2), 1, (1,), 8, 64)
    add_lora(unet, 2)
    with pytest.raises(ValueError, match="merge_lora"):
        sd.save_sd(tmp_path / "x.safetensors", vae, unet, text)
