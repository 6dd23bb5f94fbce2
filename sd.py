"""Stable Diffusion 1.x single files: a safetensors reader and writer, load_sd and its inverse save_sd.

One SD-1.x single file (CompVis / RunwayML layout) holds three networks under three prefixes. Each module
file has the rule that renames its part (unet.from_sd, vae.from_sd, clip.from_hf_text); here the file is
read, every size is read off the tensor shapes (as clip.build_model does), and each module is filled
strictly, one shape check per tensor.

Then what train.py --sd needs to use such a file: load_backbone (the networks AnomalyXFusion takes from it)
and file_sizes (its sizes, for the config), adapt_sd_unet (the mask channel, what trains), sd_file /
check_sd_file (the file's identity in a checkpoint), and TextEncoderContext: how e_t reaches the pretrained
UNet, the one hook axf.AnomalyXFusion calls (its `sd_context`).
"""
import hashlib
import json
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import clip
from cli import atomic_write, save_atomic
import unet as unet_module
import vae as vae_module
from unet import UNet
from vae import VAE

SD_PREFIXES = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.", "text encoder": "cond_stage_model.transformer."}
SD_SCALE_FACTOR = 0.18215  # kl-f8's latent scale: SD keeps it in its yaml config, not in the file
SD_HEADS = 8  # SD-1.x's UNet has 8 heads at every width (SD-2 has 64-wide heads): not readable from shapes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, memory-mapped: tensors view the file's pages, nothing is copied.
    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
    "__metadata__": {...}}, then raw little-endian tensors; offsets count from the end of the header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start = f.read(1)
        if size < 10 or start != b"{" or n > 100_000_000:  # 100 MB: the reference reader's header cap
            raise ValueError(f"{path}: neither a safetensors file nor a PyTorch checkpoint")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (its header alone needs {8 + n} bytes; incomplete download?)")
        try:
            header = json.loads(start + f.read(n - 1))
            header.pop("__metadata__", None)
            entries = {name: (info["dtype"], [int(d) for d in info["shape"]], int(info["data_offsets"][0]),
                              int(info["data_offsets"][1])) for name, info in header.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: corrupted safetensors file (its header is not the expected JSON)") from None
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: a writable buffer for torch, the file stays read-only
    tensors = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype_name}, which this reader does not handle")
        if 8 + n + end > size:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, tensor {name} ends at {8 + n + end}; incomplete download?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: corrupted safetensors file (tensor {name}'s size does not match its shape)")
        if end == begin:  # frombuffer refuses zero bytes
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


class _LightningCallback:
    """Stands in for pytorch_lightning's ModelCheckpoint, which Lightning-era .ckpt files pickle beside the
    weights; allow-listing it keeps torch.load weights-only (a checkpoint is data, never code to run)."""


def read_checkpoint(path):
    """An SD file -> its flat state dict: .safetensors by read_safetensors, a torch file (.ckpt) by torch.load."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder (a diffusers pipeline?); a Stable Diffusion 1.x single file is expected, "
                         "e.g. v1-5-pruned-emaonly.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a Stable Diffusion 1.x checkpoint, "
                                "e.g. v1-5-pruned-emaonly.safetensors or sd-v1-5-inpainting.ckpt)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else should be safetensors
        return read_safetensors(path)
    if not zipfile.is_zipfile(path):  # the zip's central directory, at the very end, is missing
        raise ValueError(f"{path}: truncated PyTorch checkpoint (incomplete download?)")
    lightning = (_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    try:
        with torch.serialization.safe_globals([lightning]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second copy
    except Exception as e:
        raise ValueError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning wraps the weights
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict of a Stable Diffusion model")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def check_sd1(state_dict, name):
    """Say what a file is when it is not an SD-1.x single file, in one line."""
    expected = "Stable Diffusion 1.x single file expected (e.g. v1-5-pruned-emaonly.safetensors)"
    keys = list(state_dict)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"{name}: an SDXL checkpoint; {expected}")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or any(
            k.startswith(SD_PREFIXES["UNet"]) and k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()):
        raise ValueError(f"{name}: a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, linear proj_in); {expected}")
    if "cond_stage_model.transformer.token_emb.weight" in state_dict:
        raise ValueError(f"{name}: an LDM txt2img checkpoint (BERT text encoder, not CLIP): not supported (README, "
                         f"'Pretrained Stable Diffusion'); {expected}")
    if any(re.match(r"(unet\.|vae\.|text_encoder\.)?(down_blocks|time_embedding|text_model|encoder\.down_blocks)\.", k) for k in keys):
        raise ValueError(f"{name}: a diffusers-layout file (keys like down_blocks.0.resnets.0...); {expected}")
    for part, prefix in SD_PREFIXES.items():
        if not any(k.startswith(prefix) for k in keys):
            raise ValueError(f"{name}: holds no Stable Diffusion {part} (no {prefix}* tensors); {expected}")


def fill(module, tensors, name, part, device):
    """Copy tensors (in the module's own names) into a module built on the meta device: the same key set,
    one shape check per tensor; allocated on `device` (uninitialised: every tensor is then overwritten)."""
    own = module.to_empty(device=device).state_dict(keep_vars=True)
    own.pop("scale_factor", None)  # the VAE's: not in SD files
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{name}: its {part} does not have SD-1.x's layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, p in own.items():
            if tensors[key].shape != p.shape:
                raise ValueError(f"{name}: {part} tensor {key} has shape {list(tensors[key].shape)}, expected {list(p.shape)}")
            p.copy_(tensors[key])  # casts F16 / BF16 to the module's fp32
    return module.eval()


def build_sd(state_dict, name="state dict", device="cpu"):
    """An SD-1.x state dict (original layout) -> (vae, unet, text_encoder), every size read off the shapes.
    device="meta" checks a layout without any memory."""
    check_sd1(state_dict, name)
    part = {p: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)} for p, prefix in SD_PREFIXES.items()}
    u, v, t = unet_module.from_sd(part["UNet"]), vae_module.from_sd(part["VAE"]), clip.from_hf_text(part["text encoder"])
    try:
        ch, in_ch = u["conv_in.weight"].shape[:2]
        downs = sorted(int(k.split(".")[1]) for k in u if re.fullmatch(r"input_blocks\.\d+\.0\.conv\.weight", k))
        firsts = [level * (downs[0] + 1) for level in range(len(downs) + 1)]  # each level's first input block
        unet_sizes = dict(in_channels=in_ch, out_channels=u["conv_out.weight"].shape[0], channels=ch,
                          channel_mult=tuple(u[f"input_blocks.{i}.0.conv1.weight"].shape[0] // ch for i in firsts),
                          num_res_blocks=downs[0], attention_levels=tuple(
                              level for level, i in enumerate(firsts) if f"input_blocks.{i}.1.norm.weight" in u),
                          num_heads=SD_HEADS, context_dim=u["middle_block.1.block.attn2.to_k.weight"].shape[1])
        vch = v["encoder.conv_in.weight"].shape[0]
        levels = sum(1 for k in v if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
        vae_sizes = dict(in_channels=v["encoder.conv_in.weight"].shape[1], channels=vch,
                         channel_mult=tuple(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // vch for i in range(levels)),
                         num_res_blocks=sum(1 for k in v if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k)),
                         latent_channels=v["post_quant_conv.weight"].shape[0])
        width = t["ln_final.weight"].shape[0]
        text_sizes = dict(embed_dim=None, image_resolution=None, vision_layers=0, vision_width=None, vision_patch_size=None,
                          context_length=t["positional_embedding"].shape[0], vocab_size=t["token_embedding.weight"].shape[0],
                          transformer_width=width, transformer_heads=width // 64,  # CLIP's 64-wide heads
                          transformer_layers=sum(1 for k in t if k.endswith(".attn.in_proj_weight")))
    except (KeyError, IndexError) as e:
        raise ValueError(f"{name}: not a complete Stable Diffusion 1.x file (no tensor {e} after renaming)") from None
    with torch.device("meta"):  # no memory and no random init: every tensor comes from the file
        models = UNet(**unet_sizes), VAE(**vae_sizes), clip.CLIP(**text_sizes)
    unet, vae, text = (fill(m, tensors, name, p, device) for m, tensors, p in zip(models, (u, v, t), SD_PREFIXES))
    vae.scale_factor.fill_(SD_SCALE_FACTOR)
    for model, sizes in ((unet, unet_sizes), (vae, vae_sizes), (text, text_sizes)):
        model.sd_sizes = sizes  # what was read off the shapes; `python sd.py --sd FILE` prints it
    return vae, unet, text


def load_sd(path, device="cpu"):
    """A Stable Diffusion 1.x single file (.safetensors or .ckpt) -> (vae, unet, text_encoder), fp32, eval mode.
    unet(x, t, context) takes 4 channels (9 for SD-1.5-inpainting: x_t, mask, masked-image latent);
    vae.encode(x).mode() / vae.decode(z) with vae.scale_factor = 0.18215; text_encoder.encode_text_tokens(
    clip.tokenize(texts, pad_id=49407)) is the [B, 77, width] context SD's UNet attends to."""
    return build_sd(read_checkpoint(path), os.fspath(path), device)


def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file (the layout read_safetensors reads), written atomically (temp file
    + rename). Data starts 8-byte aligned, as the reference writer does; metadata is a {str: str} dict."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return os.fspath(path)


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
    """The networks AnomalyXFusion takes from config["sd"]: {vae, unet (adapted), sd_context}, the keyword
    arguments of axf.AnomalyXFusion. The file's own sizes are file_sizes(); the config is not changed here."""
    vae, unet, text = load_sd(config["sd"], device)
    f = 2 ** (len(vae.sd_sizes["channel_mult"]) - 1) * 2 ** (len(unet.sd_sizes["channel_mult"]) - 1)
    if config["image_size"] % f:
        raise ValueError(f"image_size {config['image_size']} must be a multiple of {f} for {config['sd']}")
    return dict(vae=vae, unet=adapt_sd_unet(unet, config["train_unet"], config["lora_rank"]),
                sd_context=TextEncoderContext(text, config).to(device))


def file_sizes(backbone):
    """The config keys an SD file decides, whatever the preset says: its VAE's and UNet's sizes."""
    sizes = {}
    for prefix, model in (("vae_", backbone["vae"]), ("unet_", backbone["unet"])):
        for key in ("channels", "channel_mult", "num_res_blocks", "attention_levels", "num_heads"):
            if key in model.sd_sizes:
                value = model.sd_sizes[key]
                sizes[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return sizes


def sd_file(path, chunk=1 << 24):
    """What names an SD file in a checkpoint: its path, size in bytes and sha256 (~3 s for SD-1.5's 4 GB)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def check_sd_file(path, saved):
    """Raise one clear line unless `path` is the very file a checkpoint was trained on (same size and hash)."""
    wanted = f"{saved['path']} ({saved['size']:,} bytes, sha256 {saved['sha256'][:16]}...)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; this checkpoint was trained on the Stable Diffusion file {wanted}: "
                                f"pass --sd with where that file is now")
    size = Path(path).stat().st_size
    if size != saved["size"] or sd_file(path)["sha256"] != saved["sha256"]:
        raise ValueError(f"{path} is not the Stable Diffusion file this checkpoint was trained on ({wanted}); "
                         f"its trained weights belong to that file")


def adapt_sd_unet(unet, train_unet, lora_rank):
    """A pretrained SD UNet made ready for AnomalyXFusion (paper §4 conditions a frozen LDM):
    - a 4-channel UNet gets the mask as a fifth input channel, zero-initialised: at step 0 it is the
      pretrained model; SD-1.5-inpainting keeps its 9 channels (x_t, mask, masked-image latent);
    - train_unet: none freezes it (only conv_in trains, if it was widened), lora adds rank-r adapters
      (unet.add_lora) and trains them, full trains every weight."""
    channels = unet.conv_in.in_channels
    latent = unet.conv_out.out_channels
    if channels not in (latent, 2 * latent + 1):
        raise ValueError(f"a UNet with {channels} input channels is neither text-to-image ({latent}) nor inpainting "
                         f"({2 * latent + 1})")
    unet.requires_grad_(train_unet == "full")
    unet.train()  # load_sd returns eval mode; UNet's gradient checkpointing acts in training mode only
    if channels == latent:
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
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "--sd":
        sys.exit("usage: python sd.py --sd FILE   (a Stable Diffusion 1.x .safetensors or .ckpt)")
    try:
        modules = dict(zip(("VAE", "UNet", "text encoder"), load_sd(sys.argv[2])))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    for part, model in modules.items():
        sizes = {k: v for k, v in model.sd_sizes.items() if v is not None}
        print(f"{part}: {sum(p.numel() for p in model.parameters()):,} parameters, {sizes}")
