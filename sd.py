"""Stable Diffusion 1.x files <-> the project's networks: the rename rules, reading a file, load_sd and save_sd.

An SD-1.x single file (CompVis / RunwayML layout: .safetensors, or a Lightning .ckpt) holds three networks under
three prefixes; a diffusers folder (unet/, vae/, text_encoder/) holds them in three files. unet.py, vae.py and
clip.py hold their own layout only; what maps a file's names onto theirs is here, in reading order:
  the rename rules   unet_from_sd / unet_to_sd and unet_from_diffusers, vae_from_sd / vae_to_sd and
                     vae_from_diffusers, text_from_hf / text_to_hf (transformers' names of the text encoder)
  reading a file     read_checkpoint (a diffusers folder renamed onto the single file's names first), check_sd1
                     (what a file is when it is not an SD-1.x one), choose_weights (EMA or raw), split
  building           every size read off the tensor shapes (as clip.build_model does), each module filled strictly,
                     one shape check per tensor: build, build_sd; read_vae for a separate VAE file
  load_sd, save_sd   a file -> (vae, unet, text_encoder), and back
Anything else is refused in one line that says what it is. What train.py --sd does with these networks (LoRA, the
mask channel, how e_t reaches the UNet) is sd_backbone.py's.
"""
import functools
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import clip
from files import read_safetensors, read_torch, refuse_special_file, save_atomic, write_safetensors
from unet import Attention, UNet
from vae import VAE

SD_PREFIXES = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.", "text encoder": "cond_stage_model.transformer."}
SD_SCALE_FACTOR = 0.18215  # kl-f8's latent scale: SD keeps it in its yaml config, not in the file
SD_HEADS = 8  # SD-1.x's UNet has 8 heads at every width (SD-2 has 64-wide heads): not readable from shapes
# diffusers folders: part -> (subfolder, weights file, its pickle twin); fp16 variants are name.fp16.suffix
DIFFUSERS_FILES = {"UNet": ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                   "VAE": ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                   "text encoder": ("text_encoder", "model.safetensors", "pytorch_model.bin")}  # transformers' names
# what SD files carry besides the three networks' weights, skipped with a count: LitEma's copy (model_ema.*, when
# not used) and its decay, the VAE's training loss (LPIPS, discriminator, logvar), the noise schedule's buffers at
# the top level (betas, alphas_cumprod, ...), and the text tower's index buffer, projection and temperature
EXTRAS = re.compile(r"[^.]+$|model_ema\.|(first_stage_model\.)?loss\.|cond_stage_model\.transformer\.(text_model\.)?"
                    r"(embeddings\.position_ids|text_projection|logit_scale)")
EXPECTED = "Stable Diffusion 1.x file expected (e.g. v1-5-pruned-emaonly.safetensors or a diffusers folder)"


# ----------------------------------------------------------------------------------------------
# The rename rules: each network's names in an SD-1.x file -> those of its module here (unet.UNet, vae.VAE, clip.CLIP),
# and back for save_sd. Each table of names is written once and read in both directions.

UNET_RESBLOCK = [  # a ResBlock's layers: (ours, SD-1.x's (CompVis openaimodel.py), diffusers')
    ("norm1", "in_layers.0", "norm1"), ("conv1", "in_layers.2", "conv1"),
    ("time_proj", "emb_layers.1", "time_emb_proj"), ("norm2", "out_layers.0", "norm2"),
    ("conv2", "out_layers.3", "conv2"), ("skip", "skip_connection", "conv_shortcut")]
UNET_TRANSFORMER = [  # a transformer's layers that SD-1.x (and diffusers) name otherwise: (ours, SD-1.x's)
    ("block", "transformer_blocks.0"), ("to_out", "to_out.0"), ("ff.proj", "ff.net.0.proj"), ("ff.out", "ff.net.2")]


def unet_from_sd(state_dict):
    """SD-1.x UNet tensors (keys without `model.diffusion_model.`) -> unet.UNet's names. SD-1.x counts conv_in as
    input block 0, names the output layers out.0 and out.2 and Downsample's conv op. One reshape: SD-1.x's proj_in /
    proj_out are 1x1 convs [C, C, 1, 1], ours Linear [C, C] (the same map)."""
    sd = {}
    for key, value in state_dict.items():
        key = re.sub(r"^input_blocks\.0\.0\.", "conv_in.", key)
        key = re.sub(r"^input_blocks\.(\d+)\.", lambda m: f"input_blocks.{int(m[1]) - 1}.", key)
        key = re.sub(r"^out\.0\.", "norm_out.", re.sub(r"^out\.2\.", "conv_out.", key))
        key = key.replace(".op.", ".conv.")  # Downsample
        for ours, theirs, _ in UNET_RESBLOCK:
            key = key.replace(f".{theirs}.", f".{ours}.")
        for ours, theirs in UNET_TRANSFORMER:
            key = key.replace(f".{theirs}.", f".{ours}.")
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        sd[key] = value
    return sd


def unet_to_sd(state_dict):
    """The inverse of unet_from_sd: unet.UNet's names -> SD-1.x's (keys without `model.diffusion_model.`), proj_in /
    proj_out back to 1x1 convs. LoRA adapters have no place in an SD file: merge or drop them first."""
    if any(".lora." in k for k in state_dict):
        raise ValueError("unet_to_sd: the UNet holds LoRA adapters; sd_backbone.merge_lora(unet) first (or save "
                         "lora_state_dict alone)")
    resblock = [(ours, theirs) for ours, theirs, _ in UNET_RESBLOCK]
    state_dict = dict(state_dict)
    extra = state_dict.pop("conv_in.extra_weight", None)  # a conv_in widened by sd_backbone: one tensor in a file
    if extra is not None:
        state_dict["conv_in.weight"] = torch.cat([state_dict["conv_in.weight"], extra], dim=1)
    sd = {}
    for key, value in state_dict.items():
        if re.search(r"\.proj_(in|out)\.weight$", key):
            value = value[:, :, None, None]
        key = re.sub(r"^conv_in\.", "input_blocks.-1.0.", key)
        key = re.sub(r"^input_blocks\.(-?\d+)\.", lambda m: f"input_blocks.{int(m[1]) + 1}.", key)
        key = re.sub(r"^norm_out\.", "out.0.", re.sub(r"^conv_out\.", "out.2.", key))
        key = re.sub(r"^(input_blocks\.\d+\.0)\.conv\.", r"\1.op.", key)  # Downsample (Upsample keeps conv)
        # a transformer's own norm1..3 keep their names: only a ResBlock's are renamed
        for ours, theirs in UNET_TRANSFORMER if ".block." in key else resblock:
            key = key.replace(f".{ours}.", f".{theirs}.")
        sd[key] = value
    return sd


def unet_from_diffusers(state_dict):
    """diffusers UNet2DConditionModel tensors (a diffusers folder's unet/) -> SD-1.x's original names, which
    unet_from_sd then reads. diffusers counts blocks per level (down_blocks.i.resnets.j, .attentions.j,
    .downsamplers.0); the original counts them across levels with conv_in as input block 0, n ResBlocks a level:
    level i's j-th ResBlock is input_blocks.{i(n+1) + j + 1}.0, its transformer .1, its downsampler
    input_blocks.{(i+1)(n+1)}.0.op. On the way up a level has n + 1 blocks, and its upsampler follows the last
    one, after its transformer if the level has one. Transformer blocks keep their names."""
    n = sum(1 for k in state_dict if re.fullmatch(r"down_blocks\.0\.resnets\.\d+\.conv1\.weight", k))
    attends = {m[1] for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    resblock = {diffusers: theirs for _, theirs, diffusers in UNET_RESBLOCK}
    renames = [
        (r"\.resnets\.(\d+)\.(\w+)\.", lambda m: f".resnets.{m[1]}.{resblock.get(m[2], m[2])}."),
        (r"^time_embedding\.linear_([12])\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^conv_in\.", "input_blocks.0.0."), (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op."),
        (r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"input_blocks.{int(m[1]) * (n + 1) + int(m[3]) + 1}.{int(m[2] == 'attentions')}."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if m[1] in attends else 1}."),
        (r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}.{int(m[2] == 'attentions')}."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
    ]
    rename = lambda key: functools.reduce(lambda k, rule: re.sub(*rule, k), renames, key)  # every rule in turn
    return {rename(key): value for key, value in state_dict.items()}


def vae_from_sd(state_dict):
    """SD-1.x VAE tensors (keys without `first_stage_model.`) -> vae.VAE's names: the same names (vae.py names its
    modules after LDM's). The mid-block attention's q, k, v, proj_out are 1x1 convs there and in CompVis's files;
    files that went through diffusers store them as Linear [C, C], which is the same map: reshaped to [C, C, 1, 1]."""
    attention = ("attn_1.q.weight", "attn_1.k.weight", "attn_1.v.weight", "attn_1.proj_out.weight")
    return {k: v[:, :, None, None] if k.endswith(attention) and v.ndim == 2 else v for k, v in state_dict.items()}


def vae_to_sd(state_dict):
    """The inverse of vae_from_sd: the same names, without the scale_factor buffer (SD keeps it in its yaml)."""
    return {k: v for k, v in state_dict.items() if k != "scale_factor"}


def vae_from_diffusers(state_dict):
    """diffusers AutoencoderKL tensors (a diffusers folder's vae/, or a VAE file in its layout) -> LDM's names,
    which vae_from_sd then reads: down_blocks.i.resnets.j -> down.i.block.j; the decoder's up_blocks count from the
    bottom (up_blocks.0 is LDM's up.{L-1}); mid_block.resnets.j -> mid.block_{j+1}; the mid-block attention is
    to_q/to_k/to_v/to_out.0, or query/key/value/proj_attn in files saved before diffusers renamed them."""
    levels = 1 + max((int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    renames = [
        (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."), (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
        (r"\.up_blocks\.(\d+)\.resnets\.", lambda m: f".up.{levels - 1 - int(m[1])}.block."),
        (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f".up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."), (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
        (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."), (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
        (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."), (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
        (r"\.conv_norm_out\.", ".norm_out."), (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    rename = lambda key: functools.reduce(lambda k, rule: re.sub(*rule, k), renames, key)  # every rule in turn
    return {rename(key): value for key, value in state_dict.items()}


# SD-1.x keeps its text encoder in transformers' CLIPTextModel names (under `cond_stage_model.transformer.`): the same
# weights as OpenAI's ViT-L/14 text tower, whose names clip.CLIP has.
TEXT_RENAMES = [  # (transformers' name, OpenAI's); one that starts with a dot is a layer's, anywhere in a key
    ("embeddings.token_embedding.", "token_embedding."),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."), (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
    ("final_layer_norm.", "ln_final.")]


def renamed(key, renames):
    """key with each (old, new) of renames applied in turn: an old name that starts with a dot is a layer's, renamed
    wherever it occurs; any other is the start of a key."""
    for old, new in renames:
        if old.startswith("."):
            key = key.replace(old, new)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def text_from_hf(state_dict):
    """transformers CLIPTextModel tensors (keys `text_model.…`) -> the same tensors in OpenAI's names (clip.CLIP's).
    A rename, plus one merge: OpenAI keeps q, k, v as one stacked in_proj (nn.MultiheadAttention's layout)."""
    sd = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":  # an index buffer some files carry: not a weight
            sd[renamed(key, TEXT_RENAMES)] = value
    for key in [k for k in sd if ".attn.q_proj." in k]:  # ....attn.q_proj.weight -> ....attn.in_proj_weight
        prefix, kind = key.split(".attn.q_proj.")
        parts = [sd.pop(f"{prefix}.attn.{x}_proj.{kind}") for x in "qkv"]
        sd[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts)  # [3 * width, width]: q, k, v stacked
    return sd


def text_to_hf(state_dict):
    """The inverse of text_from_hf: a text tower's tensors in OpenAI's names -> transformers' `text_model.…` names
    (in_proj split back into q, k, v). Image-tower, projection and temperature tensors have no place there."""
    sd = {}
    for key, value in state_dict.items():
        if key.startswith("visual.") or key in ("text_projection", "logit_scale"):
            continue
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            prefix, kind = key.split(".attn.in_proj_")
            for x, part in zip("qkv", value.chunk(3)):
                sd[f"{prefix}.attn.{x}_proj.{kind}"] = part
        else:
            sd[key] = value
    inverse = [(ours, theirs) for theirs, ours in TEXT_RENAMES]
    return {"text_model." + renamed(key, inverse): value for key, value in sd.items()}




# ----------------------------------------------------------------------------------------------
# Reading a file: what it holds, in the single file's names

def _named(obj, module, name):
    """obj under the name a file pickles, for the weights-only allow-list (torch 2.4 keys it by __module__ and
    __name__, later ones by __qualname__; aliases as (obj, name) arrived in torch 2.6)."""
    obj.__module__, obj.__name__, obj.__qualname__ = module, name, name
    return obj


class _ModelCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint, which Lightning-era .ckpt files pickle beside the weights
    (as the key of their callback state, or an instance): an inert class, so the load stays weights-only."""


def lightning_globals():
    """What Lightning-era .ckpt files (sd-v1-4.ckpt, v1-5-pruned.ckpt) pickle besides tensors, allowed as A1111 and
    ComfyUI do: ModelCheckpoint and the numpy scalars of its state: numpy.core.multiarray.scalar(dtype, bytes),
    numpy._core since numpy 2; unpickling a dtype sets its state, so its classes (numpy.dtypes.Float64DType, ...)
    are allowed too, and _codecs.encode for the bytes (torch >= 2.5 allows it itself)."""
    from _codecs import encode
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    return [_named(_ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"), encode,
            np.dtype, *dtypes, *(_named(lambda *a: scalar(*a), module, "scalar")
                                 for module in ("numpy.core.multiarray", "numpy._core.multiarray"))]


def flat(tree, prefix=""):
    """Nested dicts -> one dict of dotted names, tensors only: what a state dict is."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def read_file(path):
    """One weights file -> its flat state dict: .safetensors by read_safetensors, a torch.save file (.ckpt, .bin,
    .pt) by read_torch, unwrapped from Lightning's {"state_dict": ...}; anything else is named in one line."""
    refuse_special_file(path, "a Stable Diffusion file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(100)
    if size == 0:
        raise ValueError(f"{path}: an empty file (0 bytes; an interrupted download?)")
    if head.startswith(b"version https://git-lfs"):
        pointed = re.search(rb"size (\d+)", head)
        raise ValueError(f"{path}: a Git LFS pointer to {int(pointed[1]) if pointed else '?'} bytes of weights, not "
                         f"the file itself: run `git lfs pull` where it was cloned")
    if head[8:9] == b"{":  # safetensors: its JSON header starts after the 8 bytes of its length
        return read_safetensors(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: a zip archive, or a bare pickle (legacy)
        checkpoint = read_torch(path, lightning_globals())
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict of a Stable Diffusion model")
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]  # Lightning wraps the weights
        return flat(checkpoint)
    if head.lstrip()[:1] == b"{":
        raise ValueError(f"{path}: a JSON file, not weights (a diffusers folder's {Path(path).name}? give the folder: "
                         f"{Path(path).parent})")
    raise ValueError(f"{path}: neither a safetensors file nor a PyTorch checkpoint")


def diffusers_files(folder, parts=tuple(DIFFUSERS_FILES)):
    """{part: its weights file} of a diffusers folder: full precision before fp16, safetensors before a pickle.
    A VAE alone may be its own folder (an AutoencoderKL's) or a pipeline's vae/."""
    folder = Path(folder)
    if (folder / "text_encoder_2").is_dir():
        raise ValueError(f"{folder}: a diffusers SDXL pipeline (it has text_encoder_2/); {EXPECTED}")
    files = {}
    for part in parts:
        sub, *names = DIFFUSERS_FILES[part]
        where = folder if parts == ("VAE",) and not (folder / sub).is_dir() else folder / sub
        names += [Path(n).with_suffix(".fp16" + Path(n).suffix).name for n in names]
        for name in names:
            refuse_special_file(where / name, f"a diffusers {part} file")
        files[part] = next((where / n for n in names if (where / n).is_file()), None)
        if files[part] is None:
            raise FileNotFoundError(f"{folder}: a folder without {where.relative_to(folder) / names[0]} (nor "
                                    f"{', '.join(names[1:])}); {EXPECTED}")
    return files


def read_checkpoint(path):
    """An SD file or a diffusers folder -> one flat state dict in the single file's (original) layout."""
    path = os.fspath(path)
    refuse_special_file(path, "a Stable Diffusion file or folder")
    if os.path.isdir(path):  # each part renamed by its rule above; transformers' text names are the file's own
        rules = {"UNet": unet_from_diffusers, "VAE": vae_from_diffusers, "text encoder": dict}
        return {SD_PREFIXES[part] + k: v for part, file in diffusers_files(path).items()
                for k, v in rules[part](read_file(file)).items()}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a Stable Diffusion 1.x checkpoint, "
                                "e.g. v1-5-pruned-emaonly.safetensors or sd-v1-5-inpainting.ckpt, or a diffusers folder)")
    return read_file(path)


def check_sd1(state_dict, name, parts=tuple(SD_PREFIXES)):
    """Say what a file is when it is not an SD-1.x one, in one line."""
    keys = list(state_dict)
    has = lambda pattern: any(re.match(pattern, k) for k in keys)
    unet_in, unet_out = (state_dict.get(SD_PREFIXES["UNet"] + k) for k in ("input_blocks.0.0.weight", "out.2.weight"))
    if has(r"conditioner\.embedders\."):
        raise ValueError(f"{name}: an SDXL checkpoint; {EXPECTED}")
    if has(r"cond_stage_model\.model\.") or any(
            k.startswith(SD_PREFIXES["UNet"]) and k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()):
        raise ValueError(f"{name}: a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, linear proj_in); {EXPECTED}")
    if "cond_stage_model.transformer.token_emb.weight" in state_dict:
        raise ValueError(f"{name}: an LDM txt2img checkpoint (BERT text encoder, not CLIP): not supported "
                         f"(docs/stable-diffusion.md); {EXPECTED}")
    if has(r"(.*[._])?lora[._]"):
        raise ValueError(f"{name}: a LoRA (adapter weights, lora_* tensors), not a model; {EXPECTED}")
    if has(r"control_model\.|controlnet_"):
        raise ValueError(f"{name}: a ControlNet (control_model.* / controlnet_* tensors), not a base model; {EXPECTED}")
    if has(r"string_to_param\.|emb_params$"):
        raise ValueError(f"{name}: a textual-inversion embedding (string_to_param / emb_params), not a model; {EXPECTED}")
    wrapped = next((m[1] for k in keys if (m := re.match(r"(.+?\.)(model\.diffusion_model|first_stage_model)\.", k))), None)
    if wrapped:
        raise ValueError(f"{name}: a state dict wrapped one level too deep (its weights are {wrapped}model.diffusion_"
                         f"model.* ...): save the dict under '{wrapped[:-1]}' on its own, as SD files keep it")
    if not has(r"model\.diffusion_model\.|(unet\.)?down_blocks\.") and has(r"(first_stage_model\.)?(en|de)coder\."):
        raise ValueError(f"{name}: a VAE on its own (encoder.* / decoder.* tensors): give it as --sd_vae, with an "
                         f"SD-1.x file as --sd")
    if has(r"(unet\.|vae\.|text_encoder\.)?(down_blocks|time_embedding|text_model)\."):
        raise ValueError(f"{name}: a diffusers-layout file (keys like down_blocks.0.resnets.0...): give the diffusers "
                         f"folder it belongs to (unet/, vae/, text_encoder/); {EXPECTED}")
    if unet_in is not None and unet_out is not None and unet_in.shape[1] == 2 * unet_out.shape[0]:
        raise ValueError(f"{name}: an InstructPix2Pix checkpoint (8-channel UNet: noisy and image latents); {EXPECTED}")
    for part in parts:
        if not has(re.escape(SD_PREFIXES[part])):
            raise ValueError(f"{name}: holds no Stable Diffusion {part} (no {SD_PREFIXES[part]}* tensors); {EXPECTED}")


def choose_weights(state_dict, name, weights, prefixes):
    """weights="ema": where a file holds both (v1-5-pruned.ckpt), LitEma's average of the weights replaces the raw
    ones; LDM saves it under model_ema.* with the dots removed (model.diffusion_model.input_blocks.0.0.weight ->
    model_ema.diffusion_modelinput_blocks00weight). SD's emaonly files ship it: the weights it sampled with."""
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): k for k in state_dict if k.startswith(prefixes)}
    found = sum(e in state_dict for e in ema)
    if weights == "raw" or not found:
        return state_dict
    if found < len(ema):
        missing = next(raw for e, raw in ema.items() if e not in state_dict)
        raise ValueError(f"{name}: its EMA weights (model_ema.*) lack {missing}; --sd_weights raw loads the raw ones")
    print(f"{name}: holds raw and EMA weights; using the EMA ones (--sd_weights raw for the others)")
    return {**{k: v for k, v in state_dict.items() if k not in ema}, **{raw: state_dict[e] for e, raw in ema.items()}}


def split(state_dict, prefixes, name):
    """{part: its tensors, prefix removed}; what lies under no prefix, or is a known extra (EXTRAS), is skipped
    with one summary line (a network's missing or misshapen tensor is fill's error, not this)."""
    parts, skipped = {part: {} for part in prefixes}, Counter()
    for key, value in state_dict.items():
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
        extra = EXTRAS.match(key)
        if part is None or extra:
            label = "top-level buffers" if "." not in key else extra[0] if extra else key.split(".")[0] + "."
            skipped[label + "*" * label.endswith(".")] += 1
        else:
            parts[part][key[len(prefixes[part]):]] = value
    if skipped:
        print(f"{name}: skipped {sum(skipped.values())} tensors no network uses ("
              f"{', '.join(f'{n} {label}' for label, n in skipped.most_common())})")
    return parts


# ----------------------------------------------------------------------------------------------
# Building the networks: every size read off the shapes, each module filled strictly

def fill(module, tensors, name, part, device):
    """Copy tensors (in the module's own names) into a module built on the meta device: the same key set,
    one shape check per tensor, both on the meta device, so that a file whose sizes describe a network bigger than
    its tensors is refused before any memory is taken; then allocated on `device` (uninitialised: every tensor is
    then overwritten)."""
    own = module.state_dict(keep_vars=True)
    own.pop("scale_factor", None)  # the VAE's: not in SD files
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{name}: its {part} does not have SD-1.x's layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, p in own.items():
        if tensors[key].shape != p.shape:
            raise ValueError(f"{name}: {part} tensor {key} has shape {list(tensors[key].shape)}, expected {list(p.shape)}")
    own = module.to_empty(device=device).state_dict(keep_vars=True)
    own.pop("scale_factor", None)
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(tensors[key])  # casts F16 / BF16 to the module's fp32
    return module.eval()


def unet_sizes(u):
    ch, in_ch = u["conv_in.weight"].shape[:2]
    downs = sorted(int(k.split(".")[1]) for k in u if re.fullmatch(r"input_blocks\.\d+\.0\.conv\.weight", k))
    firsts = [level * (downs[0] + 1) for level in range(len(downs) + 1)]  # each level's first input block
    return dict(in_channels=in_ch, out_channels=u["conv_out.weight"].shape[0], channels=ch,
                channel_mult=tuple(u[f"input_blocks.{i}.0.conv1.weight"].shape[0] // ch for i in firsts),
                num_res_blocks=downs[0], attention_levels=tuple(
                    level for level, i in enumerate(firsts) if f"input_blocks.{i}.1.norm.weight" in u),
                num_heads=SD_HEADS, context_dim=u["middle_block.1.block.attn2.to_k.weight"].shape[1])


def vae_sizes(v):
    ch = v["encoder.conv_in.weight"].shape[0]
    levels = sum(1 for k in v if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
    return dict(in_channels=v["encoder.conv_in.weight"].shape[1], channels=ch,
                channel_mult=tuple(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(max(levels, 1))),
                num_res_blocks=sum(1 for k in v if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k)),
                latent_channels=v["post_quant_conv.weight"].shape[0])


def text_sizes(t):
    width = t["ln_final.weight"].shape[0]
    return dict(embed_dim=None, image_resolution=None, vision_layers=0, vision_width=None, vision_patch_size=None,
                context_length=t["positional_embedding"].shape[0], vocab_size=t["token_embedding.weight"].shape[0],
                transformer_width=width, transformer_heads=width // 64,  # CLIP's 64-wide heads
                transformer_layers=sum(1 for k in t if k.endswith(".attn.in_proj_weight")))


BUILDERS = {"UNet": (unet_from_sd, unet_sizes, UNet), "VAE": (vae_from_sd, vae_sizes, VAE),
            "text encoder": (text_from_hf, text_sizes, clip.CLIP)}  # part -> (rename rule, sizes, module)


def build(part, tensors, name, device):
    """One network from its tensors (in the file's names, prefix removed): renamed, sized, filled."""
    rename, sizes_of, Module = BUILDERS[part]
    try:
        tensors = rename(tensors)
    except KeyError as e:  # a text encoder's q_proj without its k_proj or v_proj
        raise ValueError(f"{name}: not a complete Stable Diffusion 1.x {part} (no tensor {e} after renaming)") from None
    except RuntimeError:  # its q, k and v projections do not stack into one in_proj
        raise ValueError(f"{name}: not a Stable Diffusion 1.x {part} (its q, k and v projections differ in shape)") from None
    try:
        sizes = sizes_of(tensors)
    except (KeyError, IndexError) as e:
        raise ValueError(f"{name}: not a complete Stable Diffusion 1.x {part} (no tensor {e} after renaming)") from None
    except (ValueError, ZeroDivisionError):  # a shape with too few dimensions, or a width of 0
        raise ValueError(f"{name}: not a Stable Diffusion 1.x {part} (its tensors' shapes give no sizes)") from None
    blocks = sizes.get("num_res_blocks", 0) * len(sizes.get("channel_mult", ()))
    if 8 * blocks > len(tensors):  # a block has 8 tensors or more; the UNet's count is read off a key's index
        raise ValueError(f"{name}: its {part} claims {blocks:,} residual blocks but holds {len(tensors):,} tensors")
    try:
        with torch.device("meta"):  # no memory and no random init: every tensor comes from the file
            model = Module(**sizes)
    except Exception as e:  # sizes no such network has (a width GroupNorm cannot split, ...)
        raise ValueError(f"{name}: not a Stable Diffusion 1.x {part} (its sizes {sizes} build none: "
                         f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')[:200]})") from None
    model = fill(model, tensors, name, part, device)
    model.sd_sizes = sizes  # what was read off the shapes; `python sd.py --sd FILE` prints it
    if part == "VAE":
        model.scale_factor.fill_(SD_SCALE_FACTOR)
    return model


def read_vae(path, weights="ema"):
    """A separate VAE -> its tensors in LDM's names: vae-ft-mse-840000-ema-pruned.safetensors / .ckpt (encoder.*, ...
    maybe under first_stage_model.), a diffusers AutoencoderKL file or folder (or a pipeline's vae/)."""
    path = Path(path)
    refuse_special_file(path, "a VAE file or folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VAE file or folder (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    state = read_file(diffusers_files(path, ("VAE",))["VAE"] if path.is_dir() else path)
    if any(re.match(r"(en|de)coder\.(down|up|mid)_block", k) for k in state):
        state = vae_from_diffusers(state)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in state) else ""
    networks = tuple(prefix + p for p in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    return split(choose_weights(state, str(path), weights, networks), {"VAE": prefix}, str(path))["VAE"]


def build_sd(state_dict, name="state dict", device="cpu", weights="ema", vae=None):
    """An SD-1.x state dict (original layout) -> (vae, unet, text_encoder), every size read off the shapes.
    weights: "ema" or "raw", the UNet of a file that holds both; vae: a separate VAE's tensors (read_vae) that
    replace the file's own. device="meta" checks a layout without any memory."""
    prefixes = {p: prefix for p, prefix in SD_PREFIXES.items() if p != "VAE" or vae is None}
    check_sd1(state_dict, name, tuple(prefixes))
    parts = split(choose_weights(state_dict, name, weights, SD_PREFIXES["UNet"]), prefixes, name)
    if vae is not None:
        parts["VAE"] = vae
    unet, vae, text = (build(part, parts[part], name, device) for part in ("UNet", "VAE", "text encoder"))
    return vae, unet, text


def load_sd(path, device="cpu", weights="ema", vae=None):
    """A Stable Diffusion 1.x single file (.safetensors or .ckpt) or diffusers folder -> (vae, unet, text_encoder),
    fp32, eval mode. weights: "ema" (default) or "raw", for a file that holds both UNets; vae: a separate VAE
    file or folder replacing the file's own. unet(x, t, context) takes 4 channels (9 for SD-1.5-inpainting:
    x_t, mask, masked-image latent); vae.encode(x).mode() / vae.decode(z) with vae.scale_factor = 0.18215;
    text_encoder.encode_text_tokens(clip.tokenize(texts, pad_id=49407)) is the [B, 77, width] context SD's UNet
    attends to."""
    separate = read_vae(vae, weights) if vae else None
    return build_sd(read_checkpoint(path), os.fspath(path), device, weights, separate)


def save_sd(path, vae, unet, text_encoder, dtype=None):
    """(vae, unet, text_encoder) -> an SD-1.x single file in the original layout, the inverse of load_sd:
    .safetensors by write_safetensors, anything else (.ckpt) by torch.save({"state_dict": ...}) as Lightning
    writes it. dtype (e.g. torch.float16) casts the floating-point tensors. A UNet with LoRA adapters is
    refused: sd_backbone.merge_lora(unet) first. Returns the path."""
    heads = {m.num_heads for m in unet.modules() if isinstance(m, Attention)}
    if heads - {SD_HEADS} or any(b.attn.n_head != text_encoder.transformer.width // 64 for b in text_encoder.transformer.resblocks):
        raise ValueError(f"save_sd: load_sd reads SD-1.x's head counts ({SD_HEADS} in the UNet, width / 64 in the text "
                         f"encoder); this UNet has {sorted(heads)}: the file would load as a different model")
    parts = {"UNet": unet_to_sd(unet.state_dict()), "VAE": vae_to_sd(vae.state_dict()),
             "text encoder": text_to_hf(text_encoder.state_dict())}
    tensors = {SD_PREFIXES[part] + k: v.detach().cpu() for part, state in parts.items() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return write_safetensors(tensors, path, metadata={"format": "pt"})
    save_atomic({"state_dict": tensors}, path)
    return path


if __name__ == "__main__":  # python sd.py --sd FILE: load a Stable Diffusion 1.x file, print the sizes found
    import argparse
    import sys
    from config import KEYS
    parser = argparse.ArgumentParser(description="Load a Stable Diffusion 1.x file and print the sizes found.")
    for key in ("sd", "sd_vae", "sd_weights"):
        parser.add_argument(f"--{key}", default=KEYS[key].default, choices=KEYS[key].choices, help=KEYS[key].help,
                            required=key == "sd")
    args = parser.parse_args()
    try:
        modules = dict(zip(("VAE", "UNet", "text encoder"), load_sd(args.sd, "cpu", args.sd_weights, args.sd_vae or None)))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    for part, model in modules.items():
        sizes = {k: v for k, v in model.sd_sizes.items() if v is not None}
        print(f"{part}: {sum(p.numel() for p in model.parameters()):,} parameters, {sizes}")
