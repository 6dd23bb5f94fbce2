"""The settings of a run: one table, each key defined once with its default, its help and whether a resume
may change it; two presets that override a few of them. train.py turns the table into `--key value` flags
(cli.py), prints the resolved dict once and saves it in every checkpoint, so sample.py needs no size flags.

    python train.py --help          # every key, its help and its default

The toy preset (the table's defaults) runs on a CPU in minutes; mvtec is one GPU at 256 px; sd is the rest of
a run whose sizes come from a Stable Diffusion file (train.py --sd). Depends on nothing.

A key's allowed values live in its row too (choices, range, multiple_of): resolve() checks them, and the sizes
the networks need of each other (size_problems), before a script writes anything; --help shows them.
"""
import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    default: object
    help: str
    fixed: bool = False        # it shapes a network: a resumed run must keep it (a new --out_dir may change it)
    choices: tuple = None
    range: str = None          # '>= 1', '> 0' or '0 <= x < 1': of each entry for a tuple (which may not be empty)
    multiple_of: int = None    # a width some GroupNorm splits into this many groups


KEYS = dict(
    seed=Key(0, "seeds the weights' initialisation, the batches and the sampler's noise",
             range="0 <= x <= 4294967295"),
    device=Key("auto", "auto picks cuda when present, else cpu"),
    bf16=Key(True, "bf16 autocast on CUDA and on CPUs that multiply bf16 natively (AMX, AVX512-BF16); False: fp32"),
    image_size=Key(64, "images are resized to this many px square; a power of two (the mask encoder halves it to "
                       "8x8 features)", fixed=True, range=">= 16"),
    # the KL autoencoder (vae.py): each level but the last halves the image, 64 px -> 16x16x4 latents
    vae_channels=Key(32, "VAE base width", fixed=True, range=">= 32", multiple_of=32),
    vae_channel_mult=Key((1, 2, 2), "VAE width per level; len - 1 halvings of the image", fixed=True,
                         range=">= 1"),
    vae_num_res_blocks=Key(1, "VAE ResBlocks per level", fixed=True, range=">= 1"),
    # the latent UNet (unet.py)
    unet_channels=Key(64, "UNet base width", fixed=True, range=">= 32", multiple_of=32),
    unet_channel_mult=Key((1, 2, 2), "UNet width per level; len - 1 halvings of the latent", fixed=True,
                          range=">= 1"),
    unet_num_res_blocks=Key(1, "UNet ResBlocks per level", fixed=True, range=">= 1"),
    # Deviation: Stable Diffusion's UNet attends at every level but its smallest; the toy's attends at level 1 (8x8)
    # and in the middle, not at 16x16 (level 0), as the mvtec preset skips its largest level: self-attention over
    # 256 tokens was the largest part of the step. The quick start's stage 3 is much faster, the toy checks not
    # distinguishable (docs/results.md, "The toy UNet's attention at one level"); --unet_attention_levels 0,1
    # runs the layout of before
    unet_attention_levels=Key((1,), "the levels with self- and cross-attention (each < len(unet_channel_mult))",
                              fixed=True),
    unet_num_heads=Key(4, "attention heads of the UNet; they split the width of each level with attention",
                       fixed=True, range=">= 1"),
    # the X-embedding (paper §4.2): k tokens per modality, each d wide; the frozen CLIP
    num_tokens=Key(4, "k, tokens per modality (Eq. (1)-(3))", fixed=True, range=">= 1"),
    context_dim=Key(256, "d, the token width; a --clip file sets it to its embedding width", fixed=True,
                    range=">= 1"),
    clip=Key("", "Eq. (1)'s caption feature and Eq. (3)'s image feature come from this frozen CLIP: a file of OpenAI "
                 "CLIP weights; toy, the CLIP pretrained on the toy world (toy_clip.py; the toy preset's); random or "
                 "empty, a small random one. With --sd it still gives both features", fixed=True),
    num_diffusion_steps=Key(1000, "T, the steps of the forward process", fixed=True, range="1 <= x <= 10000"),
    schedule=Key("scaled_linear", "the betas (ddpm.py): linear (DDPM), scaled_linear (LDM, Stable Diffusion), "
                                  "cosine (improved DDPM)", fixed=True, choices=("linear", "scaled_linear", "cosine")),
    mask_channels=Key(32, "mask encoder base width (Eq. (2))", fixed=True, range=">= 8", multiple_of=8),
    mask_feature_channels=Key(64, "channels of the mask encoder's 8x8 features (Eq. (2))", fixed=True,
                              range=">= 8", multiple_of=8),
    # the rows of the paper's Table 6
    use_text=Key(True, "Table 6: the semantic tokens of the caption (Eq. (1))", fixed=True),
    use_mif=Key(True, "Table 6: the whole MIF: location and texture tokens and the aggregator (Eq. (2)-(5))", fixed=True),
    use_ddf=Key(True, "Table 6: DDF, the timestep-dependent context (Eq. (14))", fixed=True),
    unet_mask_input=Key(False, "the latent mask as the UNet's extra input channel (a deviation, opt-in: it hands every "
                        "Table 6 row the mask's place and shape); False: the paper's UNet, which learns where the mask "
                        "is through MIF's location tokens and Eq. (16)'s blend", fixed=True),
    # stage 1 (VAE) and stage 2 (mask autoencoder)
    vae_weights=Key("train", "stage 1: train, a VAE trained on the categories of the run; or pretrained weights that skip "
                             "stage 1, frozen as the paper's autoencoder: toy, the VAE pretrained on the toy world "
                             "(toy_vae.py; the toy preset's), a .pt.gz toy_vae.py wrote, or a Stable Diffusion VAE "
                             "file or folder (vae-ft-mse-840000-ema-pruned.safetensors: the mvtec preset's sizes)",
                    fixed=True),
    vae_steps=Key(1000, "stage 1 steps per category; fewer and the VAE decodes a cut wire back to a whole one", range=">= 1"),
    vae_batch_size=Key(8, "stage 1 and 2 batch size (half normal images, half anomalies)", range=">= 2"),
    vae_lr=Key(1e-3, "stage 1 learning rate", range="> 0"),
    vae_defect_weight=Key(10.0, "extra L1 weight of few-shot defect pixels: the VAE must encode defects",
                          range=">= 0"),
    vae_colour_blobs=Key(0.5, "share of the VAE's normal images given a blob of a random colour",
                         range="0 <= x <= 1"),
    mask_steps=Key(300, "stage 2 steps per category", range=">= 1"),
    # stage 3 (AnomalyXFusion)
    steps=Key(900, "stage 3 steps per category", range=">= 1"),
    batch_size=Key(16, "stage 3 batch size", range=">= 1"),
    lr=Key(5e-4, "stage 3 learning rate of the conditioning (and of a from-scratch UNet)", range="> 0"),
    warmup_steps=Key(100, "steps of linear learning-rate warm-up; 0: none", range=">= 0"),
    ema_decay=Key(0.999, "decay of the weights' moving average that samples are drawn from", range="0 <= x < 1"),
    outside_loss_weight=Key(0.1, "Eq. (17) weight of an anomalous image's latent cells outside its mask",
                            range=">= 0"),
    center_text=Key(False, "Deviation, opt-in: subtract each category's mean caption feature before Eq. (1)'s L2 "
                    "norm (measured no better with the toy CLIP: docs/toy_clip.md)"),
    cond_dropout=Key(0.1, "share of conditions dropped to the null one: classifier-free guidance",
                     range="0 <= x <= 1"),
    checkpoint_every=Key(250, "steps between resumable checkpoints", range=">= 1"),
    preview_every=Key(450, "steps between preview grids", range=">= 1"),
    # sampling (Eq. (16))
    sampler=Key("ddim", "ddim, or ddpm (every one of the num_diffusion_steps)", choices=("ddim", "ddpm")),
    sample_steps=Key(50, "DDIM steps (at most num_diffusion_steps)", range=">= 1"),
    guidance_scale=Key(3.0, "classifier-free guidance; 1 is the conditional model alone", range=">= 0"),
    eta=Key(0.0, "DDIM eta: 0 deterministic, 1 like DDPM", range="0 <= x <= 1"),
    # a pretrained Stable Diffusion 1.x backbone (sd.py, sd_backbone.py)
    sd=Key("", "a Stable Diffusion 1.x single file (.safetensors or .ckpt) or diffusers folder: its VAE (stage 1 is "
               "skipped), UNet and text encoder replace the project's own; empty: everything trained from scratch"),
    sd_weights=Key("ema", "with --sd, the UNet of a file that holds two (v1-5-pruned.ckpt): ema (the weights' moving "
                          "average, what SD's emaonly files ship) or raw", fixed=True, choices=("ema", "raw")),
    sd_vae=Key("", "with --sd, a separate VAE file or folder (e.g. vae-ft-mse-840000-ema-pruned.safetensors) that "
                   "replaces the SD file's own"),
    train_unet=Key("none", "with --sd, what of the UNet trains: none (the authors' recipe: only the conditioning, "
                           "with the mask input channel's weights), "
                           "lora (rank-r adapters on its attention) or full (every weight)",
                   fixed=True, choices=("none", "lora", "full")),
    lora_rank=Key(32, "r of --train_unet lora", fixed=True, range=">= 1"),
    unet_lr=Key(5e-4, "with --sd, the learning rate of the UNet weights that train (LoRA ~1e-4, full ~1e-5)",
                range="> 0"),
    sd_context=Key("append", "with --sd, how e_t reaches the UNet: append (e_t's tokens after the prompt's 77 hidden "
                             "states) or splice (the authors' textual inversion: e_t replaces the * of sd_prompt at "
                             "the frozen text encoder's input)", fixed=True, choices=("append", "splice")),
    sd_prompt=Key("{caption} *", "with --sd, the text encoder's prompt; {caption} is the caption, * the place of "
                                 "e_t's tokens (the authors': 'a photo of a *')", fixed=True),
    gradient_checkpointing=Key(False, "recompute the UNet's activations in the backward pass: less memory, a "
                                      "slower step (measured: docs/speed.md)"),
)
CONFIG = {name: key.default for name, key in KEYS.items()}

PRESETS = {
    "toy": dict(clip="toy", vae_weights="toy"),
    "mvtec": dict(
        image_size=256,
        vae_channels=128, vae_channel_mult=(1, 2, 4, 4), vae_num_res_blocks=2,  # the kl-f8 layout of SD 1.x
        unet_channels=192, unet_channel_mult=(1, 2, 4), unet_num_res_blocks=2, unet_num_heads=8,
        unet_attention_levels=(1, 2),  # 16x16 and 8x8 of the 32x32 latent
        context_dim=768,  # CLIP ViT-L/14's embedding width
        vae_steps=20000, vae_lr=1e-4, mask_steps=2000, steps=30000, batch_size=8, lr=1e-4, warmup_steps=1000,
        ema_decay=0.9999, checkpoint_every=1000, preview_every=5000),
    # with --sd FILE the file's sizes replace the networks' keys; these are the rest
    "sd": dict(
        image_size=256,  # the paper's and AnomalyDiffusion's size (SD's own is 512)
        context_dim=768, mask_steps=2000, steps=5000, batch_size=8, lr=1e-4, unet_lr=1e-5, warmup_steps=500,
        ema_decay=0.9999, checkpoint_every=500, preview_every=1000),
}


# how a sample is drawn: sample.py records these in its folder's manifest, toy_checks.py draws control with them
SAMPLER_KEYS = ("sampler", "sample_steps", "guidance_scale", "eta")

def default_preset(toy, sd_file=""):
    """The preset a run gets unless --preset names one: toy on the toy world, sd on a Stable Diffusion file (--sd),
    mvtec otherwise."""
    return "toy" if toy else "sd" if sd_file else "mvtec"


def resolve(preset, overrides=None):
    """The table's defaults, then the preset's values, then the user's overrides; checked (check)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = dict(CONFIG, **PRESETS[preset], preset=preset)
    for name, value in (overrides or {}).items():
        if name not in config:
            raise ValueError(f"unknown config key {name!r}; see --help for the list")
        config[name] = value
    config["clip"] = clip_name(config["clip"])
    check(config)
    return config


def check(config):
    """Refuse a config, in one line listing every problem: a value its row of the table does not allow, sizes
    the networks cannot work with (size_problems), an --sd switch without --sd."""
    problems = [problem for name in KEYS if (problem := value_problem(name, config[name]))]
    if not problems:  # the sizes' relations are only worth checking once each size is itself allowed
        problems = size_problems(config)
    if config["sd_vae"] and not config["sd"]:
        problems.append("sd_vae replaces the VAE of an --sd file; without --sd the VAE is trained (stage 1)")
    if config["sd_prompt"].count("*") != 1:
        problems.append(f"sd_prompt needs exactly one * (where e_t's tokens go), got {config['sd_prompt']!r}")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Checking a value against its row of the table

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def within(value, allowed):
    """Whether a number satisfies a range written as in the table: '>= 1', '> 0' or '0 <= x < 1'.
    NaN satisfies none (every comparison with it is False)."""
    words = allowed.split()
    if words[0] in OPERATORS:  # '>= 1' is short for 'x >= 1'
        words = ["x"] + words
    number = lambda word: value if word == "x" else float(word)
    # every (left, comparison, right) in a row: 'a <= x < b' is 'a <= x' and 'x < b'
    return all(OPERATORS[op](number(left), number(right))
               for left, op, right in zip(words[0::2], words[1::2], words[2::2]))


def allowed_text(name):
    """What the table allows of a key, in words, or '' for anything ('>= 32, a multiple of 32'); for --help."""
    key = KEYS[name]
    parts = [", ".join(key.choices)] if key.choices else []
    if key.range:
        parts.append(f"one or more, each {key.range}" if isinstance(key.default, tuple) else key.range)
    if key.multiple_of:
        parts.append(f"a multiple of {key.multiple_of}")
    return ", ".join(parts)


def shown(value):
    """A value as the user types it on the command line: a tuple as 1,2,2."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def value_problem(name, value):
    """'--key VALUE must be ...' if the table's row of `name` does not allow `value`, else None."""
    key = KEYS[name]
    if key.choices and value not in key.choices:
        return f"--{name} must be one of {', '.join(key.choices)}, not {value!r}"
    values = value if isinstance(value, tuple) else (value,)
    in_range = not key.range or (values and all(within(v, key.range) for v in values))
    multiple = not key.multiple_of or all(v % key.multiple_of == 0 for v in values)
    if not (in_range and multiple):
        return f"--{name} must be {allowed_text(name)}, not {shown(value) or '(empty)'}"
    return None


def size_problems(config):
    """The sizes the networks need of each other, one sentence per problem. Without --sd: the VAE halves the
    image len(vae_channel_mult) - 1 times, the UNet the latent len(unet_channel_mult) - 1 times, and each
    attention level's width splits into unet_num_heads heads. Always: the mask encoder halves the image to
    8x8 features (a power of two), and DDIM takes at most the forward process's steps. (With --sd the file
    decides the VAE's and UNet's sizes; sd_backbone.load_backbone checks the image size against them.)"""
    size, problems = config["image_size"], []
    if size & (size - 1):
        problems.append(f"--image_size must be a power of two (the mask encoder halves it to 8x8 features), "
                        f"not {size}")
    if config["sample_steps"] > config["num_diffusion_steps"]:
        problems.append(f"--sample_steps {config['sample_steps']} must be at most --num_diffusion_steps "
                        f"{config['num_diffusion_steps']}")
    if config["sd"] or problems:
        return problems
    vae_halvings, unet_halvings = len(config["vae_channel_mult"]) - 1, len(config["unet_channel_mult"]) - 1
    if size < 2 ** (vae_halvings + unet_halvings):
        problems.append(f"--image_size {size} is too small: --vae_channel_mult {shown(config['vae_channel_mult'])} "
                        f"halves it {vae_halvings} times and --unet_channel_mult "
                        f"{shown(config['unet_channel_mult'])} {unet_halvings} times more; give at least "
                        f"{2 ** (vae_halvings + unet_halvings)}, or fewer levels")
    levels = len(config["unet_channel_mult"])
    if any(not 0 <= level < levels for level in config["unet_attention_levels"]):
        problems.append(f"--unet_attention_levels {shown(config['unet_attention_levels'])} must each be a level of "
                        f"--unet_channel_mult {shown(config['unet_channel_mult'])}: 0 to {levels - 1}")
    # the deepest level always has attention (the UNet's middle block)
    widths = {config["unet_channels"] * config["unet_channel_mult"][level]
              for level in {*config["unet_attention_levels"], levels - 1} if 0 <= level < levels}
    if any(width % config["unet_num_heads"] for width in widths):
        problems.append(f"--unet_num_heads {config['unet_num_heads']} must divide the width of every level with "
                        f"attention: {', '.join(map(str, sorted(widths)))}")
    return problems


def architecture_changes(saved, current, depends_on=None):
    """What a resume may not change, as 'key saved -> current': the fixed keys (only those whose names start
    with one of `depends_on`, if given: the keys one stage's network depends on), and whether the run is on a
    Stable Diffusion file (--sd) and a separate VAE (--sd_vae) at all (which files they are,
    sd_backbone.check_sd_file checks by hash)."""
    changes = [f"{name} {saved_value(saved, name)!r} -> {current[name]!r}" for name, key in KEYS.items()
               if key.fixed and (depends_on is None or name.startswith(depends_on))
               and saved_value(saved, name) != current[name]]
    for name in ("sd_vae", "sd"):
        if bool(saved.get(name)) != bool(current[name]):
            changes.insert(0, f"--{name} {saved.get(name) or '(none)'} -> {current[name] or '(none)'}")
    return changes


# What a run had before a key existed, where that is not the key's default today: a checkpoint it saved lacks the
# key and must read as the run it was (its UNet read the mask)
OLDER_VALUES = {"unet_mask_input": True}  # (vae_weights: its default, train, is what older runs did)


def clip_name(name):
    """The small random CLIP has two names, "random" and ""; a config keeps one (""), whatever a run saved then."""
    return "" if name == "random" else name


def saved_value(saved, name):
    """A saved config's value of a key; for a config saved before the key existed, what that run had."""
    if name in saved:
        return clip_name(saved[name]) if name == "clip" else saved[name]
    if name == "sd_weights" and saved.get("sd"):
        return "raw"  # before the key, a Stable Diffusion file's UNet was read as its raw weights
    return OLDER_VALUES.get(name, KEYS[name].default)
