"""train.py's checkpoints: written with everything a resume needs, read back without trusting the file.

What this file holds, in reading order:
  save_checkpoint, rng_state       the trained weights, optimiser, EMA, step, config and every RNG, atomically
  load_stage, restore              a stage's last checkpoint: refused if it is of another network, else put back
  trained_keys, model_state_dict, load_weights   what of a model a checkpoint holds (not the networks that come
                                   from their own files: CLIP's, a Stable Diffusion file's)
  read_checkpoint, ...             a checkpoint read weights-only and checked field by field
  load_checkpoint                  the model a checkpoint describes, for sample.py and evaluate.py
A file is not trusted to be what it says: each field is checked before it is used, and the model its config
describes is built on the meta device and compared with its tensors before any memory is taken, so a small
forged file cannot make the loader build a big model.
"""
from pathlib import Path

import torch
import torch.distributed as dist

import clip
import files
import sd_backbone
from axf import CLIPS_SAVED_IN_CHECKPOINTS, AnomalyXFusion, build_clip, clip_width
from config import KEYS, architecture_changes, saved_value


def rng_state():
    """The global RNGs: the CPU's and the current GPU's (each process's own, alike in all of them)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_checkpoint(path, step, config, model, optimizer, ema=None, generator=None, **extra):
    """Everything a resume needs, written atomically: the trained weights, optimiser, EMA, step, config, RNGs.
    Only rank 0 writes: every process holds the same."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    files.save_atomic({"model": model_state_dict(model), "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict() if ema else None, "step": step, "config": config,
                     "rng": generator.get_state() if generator is not None else None, "torch_rng": rng_state(),
                     **extra}, path)


def load_stage(path, total, config, categories, depends_on=None):
    """The stage's last checkpoint, if any; says in one line whether it resumes or is complete. One of other
    networks or other categories is refused: loading it would drop or mismatch weights. depends_on: the
    config keys (name prefixes) the stage's network depends on; the others may differ, so that runs of other
    switches (Table 6's rows) can share a finished VAE and mask encoder."""
    files.refuse_special_file(path, "a checkpoint")
    if not path.exists():
        return None
    state = read_checkpoint(path)  # weights-only, every field checked; memory-mapped: a full UNet is not read twice
    changed = architecture_changes(state["config"], config, depends_on)
    if state.get("categories") != categories:
        changed.insert(0, f"categories {','.join(state.get('categories', ['?']))} -> {','.join(categories)}")
    if changed:
        raise ValueError(f"{path} was trained with another architecture ({'; '.join(changed)}); "
                         f"resume with the same settings or pass a new --out_dir")
    if "clip" in state:  # axf.pt: its CLIP, data folders and SD files' identities too
        checked_extras(state, config, path)
    print(f"resuming from {path} at step {state['step']}" if state["step"] < total
          else f"{path}: complete at step {state['step']}")
    return state


def restore(state, total, model, optimizer, ema=None, generator=None, where="checkpoint"):
    """Put a checkpoint (or None: a new stage) back and return its step: the weights, and for an unfinished
    stage the optimiser and EMA (on the device of the weights they belong to) and both RNGs."""
    if state is None:
        return 0
    load_weights(model, state["model"], where)
    if state["step"] < total:
        optimizer.load_state_dict(state["optimizer"])  # it casts its state to its parameters' device
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if generator is not None:
            generator.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"]["cpu"])
        if state["torch_rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["torch_rng"]["cuda"])
    return state["step"]


def trained_keys(model):
    """The state-dict keys a checkpoint holds: all but those of the networks rebuilt from their own files (CLIP,
    an SD file's), of which only the weights that train (an SD UNet's LoRA or conv_in) are kept."""
    from_files = ("mif.clip.",) if isinstance(model, AnomalyXFusion) else ()
    if getattr(model, "sd_adapter", None) is not None:
        from_files += ("vae.", "unet.", "sd_adapter.text_encoder.")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if not k.startswith(from_files) or k in trainable]


def model_state_dict(model):
    """The weights to save (trained_keys): a checkpoint on SD-1.5 weighs megabytes, not gigabytes."""
    state = model.state_dict()
    return {k: state[k] for k in trained_keys(model)}


def load_weights(model, state, where):
    """Load saved weights strictly, networks from files aside; a mismatch raises one clear line."""
    expected = set(trained_keys(model))
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model its config describes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    own = model.state_dict()
    for key in sorted(expected):
        if not isinstance(state[key], torch.Tensor) or state[key].shape != own[key].shape:
            shape = list(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise ValueError(f"{where}: weights do not match the model its config describes ({key} is {shape}, "
                             f"the model's {list(own[key].shape)})")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint back: a file is not trusted to be what it says. Each field is checked before it is used, and
# the model its config describes is built on the meta device and compared with its tensors before any memory is
# taken: a small forged file cannot make the loader build a big model.

NOT_TRAIN_PY = "a checkpoint of this project holds only tensors and plain values; this one was not written by train.py"
MAX_DIFFUSION_STEPS = 100_000  # T sizes the DDPM's buffers, which no file holds (DDPM and LDM use 1000)
MAX_IMAGE_SIZE = 4096  # sample.py reads and draws images of this size; MVTec's largest are 1024 px
MIN_BLOCK_TENSORS = 8  # a VAE or UNet residual block holds two norms and two convs, each a weight and a bias


def tensor_dict(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def category_dict(value):
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(d, str) for d in v) for k, v in value.items())


CHECKPOINT_FIELDS = {  # what train.py's save_checkpoint writes: key -> (check, what it must be)
    "model": (tensor_dict, "a dict of tensors"),
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of settings"),
    "step": (lambda v: type(v) is int and v >= 0, "a whole number"),
    "categories": (category_dict, "a dict of categories' defect-type lists"),
    "optimizer": (lambda v: isinstance(v, dict), "a dict"),
    "ema": (lambda v: v is None or tensor_dict(v), "a dict of tensors"),
    "rng": (lambda v: v is None or isinstance(v, torch.Tensor), "a tensor"),
    "torch_rng": (lambda v: isinstance(v, dict) and isinstance(v.get("cpu"), torch.Tensor), "a dict of tensors"),
}


def read_checkpoint(path):
    """Any checkpoint train.py writes (axf.pt, a stage's vae.pt or mask_ae.pt) -> its dict, read by files.read_torch
    (weights-only, nothing claimed that the file does not hold) and checked field by field."""
    checkpoint = files.read_torch(path, advice=NOT_TRAIN_PY)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint of train.py")
    for key, (check, what) in CHECKPOINT_FIELDS.items():
        if key not in checkpoint:
            raise ValueError(f"{path}: has no {key!r}; not a checkpoint written by train.py")
        if not check(checkpoint[key]):
            raise ValueError(f"{path}: its {key!r} is not {what}; not a checkpoint written by train.py")
    for key in ("model", "ema"):  # weights saved under the names of an older version of this code
        if checkpoint[key]:
            checkpoint[key] = {today_name(name): tensor for name, tensor in checkpoint[key].items()}
    return checkpoint


RENAMED = {"sd_context.": "sd_adapter."}  # a module's name then -> now (the prefix of its weights' keys)


def today_name(key):
    """A saved weight's key under today's module names."""
    for old, new in RENAMED.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def refuse_stage_checkpoint(checkpoint, path):
    """vae.pt and mask_ae.pt, train.py's first two stages, hold one network each, not the model."""
    if "clip" not in checkpoint:  # axf.pt keeps CLIP's weights or names CLIP's file; the stages do not
        vae = any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in checkpoint["model"])
        stage = "stage-1 checkpoint (the VAE alone, vae.pt)" if vae else \
            "stage-2 checkpoint (the mask autoencoder alone, mask_ae.pt)"
        raise ValueError(f"{path}: train.py's {stage}, not the model: pass axf.pt or the run folder")


def checked_config(checkpoint, path):
    """The checkpoint's config, keys older checkpoints lack set as they were then, every value the model's
    build reads checked for its type and range: sizes no tensor holds (T, the image size, block counts) could
    otherwise make it allocate any amount."""
    config = checkpoint["config"]
    for name in KEYS:  # a key the saved config lacks is older than it: the value that run had
        config[name] = saved_value(config, name)

    def refuse(name, what):
        raise ValueError(f"{path}: its config's {name} is not {what}; {NOT_TRAIN_PY}")
    positive = lambda v: type(v) is int and v > 0
    for name in ("image_size", "vae_channels", "vae_num_res_blocks", "unet_channels", "unet_num_res_blocks",
                 "unet_num_heads", "num_tokens", "context_dim", "num_diffusion_steps", "mask_channels",
                 "mask_feature_channels", "lora_rank", "sample_steps"):
        if not positive(config[name]):
            refuse(name, "a whole number > 0")
    for name in ("vae_channel_mult", "unet_channel_mult", "unet_attention_levels"):
        if not isinstance(config[name], (list, tuple)) or not all(type(v) is int and v >= 0 for v in config[name]):
            refuse(name, "a list of whole numbers")
        if not config[name] and name != "unet_attention_levels":
            refuse(name, "a list of one level or more")
    for name in ("use_text", "use_mif", "use_ddf", "unet_mask_input", "gradient_checkpointing"):
        if type(config[name]) is not bool:
            refuse(name, "true or false")
    for name in ("clip", "vae_weights", "sd", "sd_vae", "sd_prompt"):
        if not isinstance(config[name], str):
            refuse(name, "a text")
    for name in ("cond_dropout", "outside_loss_weight", "guidance_scale", "eta"):
        if type(config[name]) not in (int, float):
            refuse(name, "a number")
    for name, key in KEYS.items():
        if key.choices and config[name] not in key.choices:
            refuse(name, f"one of {', '.join(key.choices)}")
    if config["num_diffusion_steps"] > MAX_DIFFUSION_STEPS:
        refuse("num_diffusion_steps", f"at most {MAX_DIFFUSION_STEPS:,}")
    if config["image_size"] > MAX_IMAGE_SIZE:
        refuse("image_size", f"at most {MAX_IMAGE_SIZE}")
    if not config["sd"]:  # the VAE and UNet are built from the config (with --sd, from the file)
        blocks = (config["vae_num_res_blocks"] * len(config["vae_channel_mult"])
                  + config["unet_num_res_blocks"] * len(config["unet_channel_mult"]))
        if MIN_BLOCK_TENSORS * blocks > len(checkpoint["model"]):
            raise ValueError(f"{path}: its config describes {blocks:,} residual blocks but it holds "
                             f"{len(checkpoint['model']):,} tensors; {NOT_TRAIN_PY}")
    return config


def file_identity(value):
    """sd_backbone.sd_file's record of a file: its path, size and sha256."""
    return (isinstance(value, dict) and isinstance(value.get("path"), str) and type(value.get("size")) is int
            and isinstance(value.get("sha256"), str))


def checked_extras(checkpoint, config, path):
    """The fields axf.pt has beyond every stage's: CLIP's weights (or its file's name), the data folders, the SD files'
    identities."""
    def refuse(key, what):
        raise ValueError(f"{path}: its {key!r} is not {what}; {NOT_TRAIN_PY}")
    named_file = config["clip"] not in CLIPS_SAVED_IN_CHECKPOINTS
    if not (tensor_dict(checkpoint["clip"]) or checkpoint["clip"] is None and named_file):
        refuse("clip", "a dict of tensors (nor does its config name a CLIP file)")
    folders = checkpoint.get("data_folders")
    if not isinstance(folders, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in folders.items()):
        refuse("data_folders", "a dict of folder names")
    for key, used in (("sd_file", config["sd"]), ("sd_vae_file", config["sd"] and config["sd_vae"])):
        if used and not file_identity(checkpoint.get(key)):
            refuse(key, "a file's path, size and sha256")
    if config["sd"] and config["train_unet"] == "lora":  # the adapters are built at lora_rank before they are loaded
        ranks = {v.shape[0] for k, v in checkpoint["model"].items() if ".lora." in k and k.endswith("down.weight")}
        if ranks != {config["lora_rank"]}:
            raise ValueError(f"{path}: its config's lora_rank is {config['lora_rank']} but its LoRA tensors have rank "
                             f"{sorted(ranks) or 'none'}; {NOT_TRAIN_PY}")


def checkpoint_clip(checkpoint, config, path, device):
    """The CLIP a checkpoint was trained with: its own weights (a random CLIP) or config["clip"]'s file, whose width
    must be the config's context_dim (checked before anything is built at that width)."""
    if checkpoint["clip"] is None:
        clip_model = build_clip(config, device)
    else:
        try:
            clip_model = clip.build_model(checkpoint["clip"])
        except KeyError as e:
            raise ValueError(f"{path}: its CLIP weights have no {e} tensor; {NOT_TRAIN_PY}") from None
        except ValueError as e:
            raise ValueError(f"{path}: its CLIP weights: {e}") from None
    if clip_width(clip_model) != config["context_dim"]:
        raise ValueError(f"{path}: its config's context_dim {config['context_dim']} is not the CLIP's width "
                         f"{clip_width(clip_model)}; {NOT_TRAIN_PY}")
    return clip_model


def refuse_misfit_weights(checkpoint, path, config, clip_model, categories, networks):
    """Build the model the config describes on the meta device (shapes, no memory) and refuse the checkpoint unless
    it holds every trained tensor of it with exactly its shape, and EMA weights only of its parameters."""
    try:
        with torch.device("meta"):
            model = AnomalyXFusion(config, clip_model, categories, **networks)
    except Exception as e:  # e.g. an image_size the mask encoder cannot halve down to 8x8, a width GroupNorm cannot split
        reason = next(iter(str(e).splitlines()), "")[:200]
        raise ValueError(f"{path}: its config describes no model this code builds ({type(e).__name__}: {reason}); "
                         f"{NOT_TRAIN_PY}") from None
    own, state = model.state_dict(), checkpoint["model"]
    expected = set(trained_keys(model))
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model its config describes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    parameters = dict(model.named_parameters())
    for field, tensors, shapes in (("model", state, own), ("ema", checkpoint["ema"] or {}, parameters)):
        for key, tensor in tensors.items():
            if key not in shapes:
                raise ValueError(f"{path}: its {field} tensor {files.shown(key)} is no parameter of the model its "
                                 f"config describes")
            if tensor.shape != shapes[key].shape:
                raise ValueError(f"{path}: its {field} tensor {files.shown(key)} is {list(tensor.shape)}, the model its "
                                 f"config describes has {list(shapes[key].shape)}")


def load_checkpoint(path, device="cpu", use_ema=True, sd_path=None):
    """An AnomalyXFusion checkpoint written by train.py -> (model in eval mode, checkpoint dict).

    A checkpoint is data, never code: it is read weights-only (files.read_torch), and anything that is not what
    train.py writes is refused in one line before a network is built from it. One trained on a Stable Diffusion
    file reads that file again (or sd_path, where it has moved to), and refuses any other."""
    path = Path(path)
    files.refuse_special_file(path, "a checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; train one with train.py first")
    checkpoint = read_checkpoint(path)
    refuse_stage_checkpoint(checkpoint, path)
    config, categories = checked_config(checkpoint, path), checkpoint["categories"]
    checked_extras(checkpoint, config, path)
    clip_model = checkpoint_clip(checkpoint, config, path, device)
    networks = {}
    if sd_path and not config["sd"]:
        raise ValueError(f"{path} was trained without a Stable Diffusion file: --sd {sd_path} has nothing to do")
    if config["sd"]:  # the path as given at training, else as resolved then, unless the user says where it is now
        saved = checkpoint["sd_file"]
        config["sd"] = str(sd_path or (config["sd"] if Path(config["sd"]).exists() else saved["path"]))
        sd_backbone.check_sd_file(config["sd"], saved)
        if config["sd_vae"]:  # a separate VAE, likewise
            saved = checkpoint["sd_vae_file"]
            config["sd_vae"] = config["sd_vae"] if Path(config["sd_vae"]).exists() else saved["path"]
            sd_backbone.check_sd_file(config["sd_vae"], saved, ("VAE",))
        networks = sd_backbone.load_backbone(config)
        sd_backbone.upgrade_checkpoint(checkpoint, networks["unet"])  # older checkpoints' layouts
    refuse_misfit_weights(checkpoint, path, config, clip_model, categories, networks)
    model = AnomalyXFusion(config, clip_model, categories, **networks)
    load_weights(model, checkpoint["model"], path)
    if use_ema and checkpoint["ema"]:
        params = dict(model.named_parameters())
        for name, value in checkpoint["ema"].items():
            params[name].data.copy_(value)
    return model.to(device).eval(), checkpoint
