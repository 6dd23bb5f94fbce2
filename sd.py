"""Stable Diffusion 1.x weights: a safetensors reader and writer, load_sd and its inverse save_sd.

An SD-1.x single file (CompVis / RunwayML layout: .safetensors, or a Lightning .ckpt) holds three networks under
three prefixes; a diffusers folder (unet/, vae/, text_encoder/) holds them in three files, renamed onto the single
file's names first. Each module file has the rules that rename its part (unet.from_sd, unet.from_diffusers,
vae.from_sd, vae.from_diffusers, clip.from_hf_text); here the files are read, every size is read off the tensor
shapes (as clip.build_model does), and each module is filled strictly, one shape check per tensor. A separate VAE
file may replace the file's own. Anything else is refused in one line that says what it is.

Then what train.py --sd needs to use such a file: load_backbone (the networks AnomalyXFusion takes from it)
and file_sizes (its sizes, for the config), adapt_sd_unet (the mask channel, what trains), sd_file /
check_sd_file (the file's identity in a checkpoint), and TextEncoderContext: how e_t reaches the pretrained
UNet, the one hook axf.AnomalyXFusion calls (its `sd_adapter`).
"""
import hashlib
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import clip
from files import read_safetensors, read_torch, refuse_special_file, save_atomic, write_safetensors
import unet as unet_module
import vae as vae_module
from unet import UNet
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
    if os.path.isdir(path):  # each part renamed by its module's rule; transformers' text names are the file's own
        rules = {"UNet": unet_module.from_diffusers, "VAE": vae_module.from_diffusers, "text encoder": dict}
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


BUILDERS = {"UNet": (unet_module.from_sd, unet_sizes, UNet), "VAE": (vae_module.from_sd, vae_sizes, VAE),
            "text encoder": (clip.from_hf_text, text_sizes, clip.CLIP)}  # part -> (rename rule, sizes, module)


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
        state = vae_module.from_diffusers(state)
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
    refused: unet_module.merge_lora(unet) first. Returns the path."""
    heads = {m.num_heads for m in unet.modules() if isinstance(m, unet_module.Attention)}
    if heads - {SD_HEADS} or any(b.attn.n_head != text_encoder.transformer.width // 64 for b in text_encoder.transformer.resblocks):
        raise ValueError(f"save_sd: load_sd reads SD-1.x's head counts ({SD_HEADS} in the UNet, width / 64 in the text "
                         f"encoder); this UNet has {sorted(heads)}: the file would load as a different model")
    parts = {"UNet": unet_module.to_sd(unet.state_dict()), "VAE": vae_module.to_sd(vae.state_dict()),
             "text encoder": clip.to_hf_text(text_encoder.state_dict())}
    tensors = {SD_PREFIXES[part] + k: v.detach().cpu() for part, state in parts.items() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return write_safetensors(tensors, path, metadata={"format": "pt"})
    save_atomic({"state_dict": tensors}, path)
    return path


# ----------------------------------------------------------------------------------------------
# A Stable Diffusion 1.x backbone for AnomalyXFusion (train.py --sd): the networks it takes from the file,
# how its UNet is adapted, the file's identity, and how e_t reaches the UNet (TextEncoderContext)


def load_backbone(config, device="cpu"):
    """The networks AnomalyXFusion takes from config["sd"] (and config["sd_vae"]): {vae, unet (adapted),
    sd_adapter}, the keyword arguments of axf.AnomalyXFusion. The file's own sizes are file_sizes(); the config
    is not changed here."""
    vae, unet, text = load_sd(config["sd"], device, config["sd_weights"], config["sd_vae"] or None)
    f = 2 ** (len(vae.sd_sizes["channel_mult"]) - 1) * 2 ** (len(unet.sd_sizes["channel_mult"]) - 1)
    if config["image_size"] % f:
        raise ValueError(f"image_size {config['image_size']} must be a multiple of {f} for {config['sd']}")
    unet = adapt_sd_unet(unet, config["train_unet"], config["lora_rank"], config["unet_mask_input"])
    return dict(vae=vae, unet=unet, sd_adapter=TextEncoderContext(text, config).to(device))


def file_sizes(backbone):
    """The config keys an SD file decides, whatever the preset says: its VAE's and UNet's sizes."""
    sizes = {}
    for prefix, model in (("vae_", backbone["vae"]), ("unet_", backbone["unet"])):
        for key in ("channels", "channel_mult", "num_res_blocks", "attention_levels", "num_heads"):
            if key in model.sd_sizes:
                value = model.sd_sizes[key]
                sizes[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return sizes


def sd_file(path, parts=tuple(SD_PREFIXES), chunk=1 << 24):
    """What names an SD file (or folder: the part files it reads) in a checkpoint: its path, size in bytes and
    sha256 (~3 s for SD-1.5's 4 GB). parts=("VAE",) for a separate VAE."""
    path = Path(path)
    refuse_special_file(path, "a Stable Diffusion file or folder")
    files = list(diffusers_files(path, parts).values()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return {"path": str(path.resolve()), "size": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


def check_sd_file(path, saved, parts=tuple(SD_PREFIXES)):
    """Raise one clear line unless `path` is the very file a checkpoint was trained on (same size and hash)."""
    wanted = f"{saved['path']} ({saved['size']:,} bytes, sha256 {saved['sha256'][:16]}...)"
    what, flag = ("VAE file", "--sd_vae") if parts == ("VAE",) else ("Stable Diffusion file", "--sd")
    refuse_special_file(path, f"the {what}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: missing; this checkpoint was trained on the {what} {wanted}: "
                                f"pass {flag} with where that file is now")
    if sd_file(path, parts)["sha256"] != saved["sha256"]:
        raise ValueError(f"{path} is not the {what} this checkpoint was trained on ({wanted}); "
                         f"its trained weights belong to that file")


def adapt_sd_unet(unet, train_unet, lora_rank, unet_mask_input=True):
    """A pretrained SD UNet made ready for AnomalyXFusion (paper §4 conditions a frozen LDM):
    - with unet_mask_input, a 4-channel UNet gets the mask as a fifth input channel, zero-initialised: at step
      0 it is the pretrained model; SD-1.5-inpainting keeps its 9 channels (x_t, mask, masked-image latent);
    - train_unet: none freezes it (only conv_in trains, if it was widened), lora adds rank-r adapters
      (unet.add_lora) and trains them, full trains every weight."""
    channels = unet.conv_in.in_channels
    latent = unet.conv_out.out_channels
    if channels not in (latent, 2 * latent + 1):
        raise ValueError(f"a UNet with {channels} input channels is neither text-to-image ({latent}) nor inpainting "
                         f"({2 * latent + 1})")
    unet.requires_grad_(train_unet == "full")
    unet.train()  # load_sd returns eval mode; UNet's gradient checkpointing acts in training mode only
    if channels == latent and unet_mask_input:
        unet_module.expand_input_channels(unet, latent + 1)
        unet.conv_in.requires_grad_(True)  # the mask channel must learn, whatever else is frozen
    if train_unet == "lora":
        unet_module.add_lora(unet, lora_rank)
    return unet


class TextEncoderContext(nn.Module):
    """e_t [B, n, d] -> the pretrained UNet's context [B, 77 (+ n), width]: Eq. (13)'s condition for SD's UNet.

    append (the default): the frozen text encoder's 77 hidden states of the caption's prompt (computed once
    per caption), then e_t's n tokens. splice (the authors' textual inversion, as AnomalyDiffusion): the n
    placeholders * of the prompt are replaced by e_t's tokens at the encoder's input, and its 77 hidden
    states are the context; DDF makes e_t depend on t, so the encoder then runs at every step. Which one
    drew the caption's colour and defect type more often: docs/stable-diffusion.md.
    """

    def __init__(self, text_encoder, config):
        super().__init__()
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.mode, self.prompt, self.use_text = config["sd_context"], config["sd_prompt"], config["use_text"]
        width = text_encoder.token_embedding.weight.shape[1]
        # e_t's tokens -> the text encoder's width (768 = d for SD-1.5 with CLIP ViT-L/14: no layer then)
        self.to_text = nn.Linear(config["context_dim"], width) if width != config["context_dim"] else nn.Identity()
        # spliced at the encoder's input, e_t's tokens take the size of its word embeddings; at e_t's own
        # unit scale they would drown the prompt's words in the residual stream
        self.token_scale = text_encoder.token_embedding.weight.float().std().item()
        self._prompt_cache, self._hidden_cache = {}, {}

    def forward(self, e_t, captions=None, drop=None):
        """captions: the conditions' captions (none: ""); a dropped condition (drop, bool [B]) has ""."""
        captions = list(captions) if captions is not None and self.use_text else [""] * len(e_t)
        if drop is not None:
            captions = ["" if dropped else c for c, dropped in zip(captions, drop.tolist())]
        vectors = self.to_text(e_t)  # [B, n, width]
        if self.mode == "splice":
            tokens = self.prompt_tokens(captions, e_t.shape[1]).to(e_t.device)
            return self.text_encoder.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, vectors * self.token_scale))
        hidden = self.prompt_hidden_states(captions)
        return torch.cat([hidden.to(vectors.dtype), vectors], dim=1)

    def prompt_tokens(self, captions, n):
        """sd_prompt with {caption} filled in and its * made n placeholders -> [B, 77] token ids (SD's end-token
        padding). A long caption is cut; the placeholders never are."""
        rows = []
        for caption in captions:
            if (caption, n) not in self._prompt_cache:
                before, after = self.prompt.replace("{caption}", caption.replace("*", " ")).split("*")
                tail = clip.bpe_tokens(after)[:75 - n]
                head = clip.bpe_tokens(before)[:75 - n - len(tail)]
                ids = [clip.START_ID] + head + [clip.PLACEHOLDER_ID] * n + tail + [clip.END_ID]
                self._prompt_cache[caption, n] = torch.tensor(ids + [clip.END_ID] * (77 - len(ids)))
            rows.append(self._prompt_cache[caption, n])
        return torch.stack(rows)

    @torch.no_grad()
    def prompt_hidden_states(self, captions):
        """The frozen encoder's 77 hidden states of the prompt without its * (append), cached per caption."""
        missing = sorted({c for c in captions if c not in self._hidden_cache})
        if missing:
            tokens = self.prompt_tokens(missing, 0).to(self.text_encoder.token_embedding.weight.device)
            for caption, hidden in zip(missing, self.text_encoder.encode_text_tokens(tokens)):
                self._hidden_cache[caption] = hidden
        return torch.stack([self._hidden_cache[c] for c in captions])


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
