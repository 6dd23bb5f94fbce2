"""A miniature CLIP, pretrained here on the toy world: the frozen encoder AnomalyXFusion's Eq. (1) and (3) assume.

CLIP (Radford et al. 2021) trains an image tower and a text tower together so that an image and its caption
land on one direction: in a batch of N (image, text) pairs, the N x N cosine similarities, times a learned
temperature, are classified both ways (each image among the texts, each text among the images) by
cross-entropy against the true pairs (the paper's Fig. 3 pseudocode). AnomalyXFusion takes the caption's
text feature (Eq. (1)) and the image feature of image * mask (Eq. (3)) from such a frozen, pretrained CLIP:
words and image regions share one space before it learns anything. This script makes one for the toy world,
the same way, with clip.py's own CLIP class at toy sizes:

    python toy_clip.py --out toy_clip.pt.gz           # the shipped file: 7 to 10 minutes on one busy core
    python toy_clip.py --measure toy_clip.pt.gz       # what it knows, on toy worlds it never saw
    python toy_clip.py --measure random               # the same figures for the random CLIP of axf.build_clip

  1. data    toy.ensure_toy for seeds 1..--seeds of every toy category (seed 0, train.py's, is never used;
             HELD_OUT_SEEDS are kept for --measure), read at the toy preset's 64 px like train.py does:
             normal images with a caption of their category ("a photo of a good bottle"), anomalies with their
             own caption, and each anomaly's image * mask (what Eq. (3) feeds CLIP) with the same caption
  2. loss    CLIP's symmetric cross-entropy, with "the true pair" widened to "a true caption" (clip_loss):
             the toy world's captions repeat, and an image must not be pushed away from its own caption
  3. train   AdamW with CLIP's betas and epsilon, warm-up then cosine decay, the logit scale clamped at 100
  4. file    the state dict in OpenAI's key layout (clip.build_model reads every size back), fp16, gzip-compressed
             in the repository; toy.ensure_toy_clip() decompresses it into data/ so that clip.load reads it

Deviations from CLIP's recipe, each commented where it is made: the multi-positive targets (2), texts encoded
once per batch (2), no image augmentation (1), the text context cut to the longest caption while training
(exact, 3), token embeddings of words never seen set to zero in the file (4). Depends on clip.py, data.py,
files.py and toy.py.
"""
import argparse
import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import clip
import data
import files
import toy

HERE = Path(__file__).parent
ROOT = HERE / "data" / "toy_clip"  # the toy worlds, their image caches and the decompressed file (ignored by git)
SHIPPED = toy.TOY_CLIP  # the pretrained file, in the repository
TOY_RENDER_SIZE = 128  # toy.ensure_toy's default: train.py reads these images at its image_size
IMAGE_SIZE = 64  # the toy preset's image_size: the images Eq. (3) hands CLIP
HELD_OUT_SEEDS = (100, 101)  # toy worlds for --measure, never trained on
NORMALS_PER_WORLD = 40  # per category: telling a good bottle from a good cable is easy; the anomalies are the lesson
NORMAL_TEMPLATES = ("a photo of a good {}", "a photo of a normal {}", "a {} without defects")
# clip.CLIP's arguments. embed_dim is the toy preset's context_dim. Widths of 64: clip.build_model gives every
# tower width // 64 heads, so 64 is the narrowest a file can have. 64 px, the size train.py hands Eq. (3), in
# 16 px patches: a 4 x 4 grid. The patch embedding still sees every pixel (a 3 px chip changes its patch's
# token), and a step costs a half to a quarter of what 8 px patches cost, which in ten minutes bought more than
# the finer grid did (docs/toy_clip.md).
SIZES = dict(embed_dim=256, image_resolution=IMAGE_SIZE, vision_layers=4, vision_width=64, vision_patch_size=16,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)

# ----------------------------------------------------------------------------------------------
# 1. data: many toy worlds, every image with a caption


def load_world(seeds, root=ROOT, categories=toy.TOY_CATEGORIES, render_size=TOY_RENDER_SIZE):
    """The toy worlds `seeds` (consecutive) of `categories`, rendered at render_size and read at IMAGE_SIZE ->
    images uint8 [N, 3, S, S], masks bool [N, 1, S, S] (empty for a normal image), captions [N] ("" for a normal
    image), categories [N] (names); cached in root/."""
    seeds = list(seeds)
    if seeds != list(range(seeds[0], seeds[-1] + 1)):
        raise ValueError(f"load_world: seeds must be consecutive, got {seeds}")
    cache = root / f"world_{'_'.join(categories)}_{render_size}px_seeds{seeds[0]}-{seeds[-1]}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    images, masks, captions, names = [], [], [], []
    empty = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for seed in seeds:
        print(f"toy world {seed}: {', '.join(categories)}", flush=True)
        for name in categories:
            category = data.load_category(toy.ensure_toy(name, root / f"seed{seed}", render_size, seed))
            for path in category.train_good[:NORMALS_PER_WORLD]:
                images.append(data.read_image(path, IMAGE_SIZE)), masks.append(empty)
                captions.append(""), names.append(name)
            for a in category.anomalies:
                images.append(data.read_image(a.image, IMAGE_SIZE)), masks.append(data.read_mask(a, IMAGE_SIZE).bool())
                captions.append(a.caption), names.append(name)
    world = dict(images=(torch.stack(images) * 255).round().to(torch.uint8), masks=torch.stack(masks),
                 captions=captions, categories=names)
    files.save_atomic(world, cache)
    return world


def all_texts(world):
    """Every text the model is trained on: the anomalies' captions and the normal templates of each category."""
    normal = {t.format(c) for t in NORMAL_TEMPLATES for c in world["categories"]}
    return sorted({c for c in world["captions"] if c} | normal)


def make_batch(world, num_anomalies, num_normals, generator):
    """A batch of images [B, 3, S, S] (normalised as clip.preprocess does), their texts [B] and labels [B].

    Each drawn anomaly comes twice, whole and as image * mask (Eq. (3)'s input, exactly as
    axf.MultiModalInFusion.encode_texture makes it), both with its caption; a normal image comes with a template
    caption of its category. The label says which texts are true of an image: its caption, or "good <category>"
    for any of the normal templates. No augmentation (CLIP's was a random square crop): a flip or a crop would
    move the "top left" and "left half" the captions speak of."""
    is_anomaly = torch.tensor([bool(c) for c in world["captions"]])
    anomalies, normals = is_anomaly.nonzero()[:, 0], (~is_anomaly).nonzero()[:, 0]
    a = anomalies[torch.randint(len(anomalies), (num_anomalies,), generator=generator)]
    n = normals[torch.randint(len(normals), (num_normals,), generator=generator)]
    whole = world["images"][torch.cat([a, n])].float() / 255
    masked = world["images"][a].float() / 255 * world["masks"][a]
    images = clip.normalize_images(torch.cat([whole, masked]), SIZES["image_resolution"])  # [2A + N, 3, S, S]
    template = torch.randint(len(NORMAL_TEMPLATES), (num_normals,), generator=generator).tolist()
    names = [world["categories"][i] for i in n.tolist()]
    captions = [world["captions"][i] for i in a.tolist()]
    texts = captions + [NORMAL_TEMPLATES[t].format(c) for t, c in zip(template, names)] + captions
    labels = captions + [f"good {c}" for c in names] + captions
    return images, texts, labels

# ----------------------------------------------------------------------------------------------
# 2. the loss: CLIP's, with repeated captions


def clip_loss(image_features, text_features, positives, logit_scale):
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3) of image_features [N, d] against
    text_features [M, d]; positives bool [N, M] says which text is a true caption of which image.

    CLIP has M = N distinct captions and positives = the identity: each image's target is its own text, each
    text's target its own image. The toy world has some fifty captions, so a batch holds the same caption many
    times. Deviation: the texts are deduplicated (the caller encodes each once) and each row's target is spread
    evenly over its positives (soft targets): a text's target is every image it describes. Treating identical
    captions as negatives would push apart the images of one caption, which CLIP's data never asks (its
    captions are nearly all distinct). With the identity this is CLIP's loss exactly."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.t()  # [N, M]
    targets = positives.float()
    loss_images = F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))  # each image among the texts
    loss_texts = F.cross_entropy(logits.t(), (targets / targets.sum(0, keepdim=True)).t())  # each text among the images
    return (loss_images + loss_texts) / 2


def encode_texts(model, texts):
    """Text features [M, embed_dim] of M texts. The context is cut after the longest text's end token: the text
    tower is causal (a position sees only its left) and the feature sits at the end token, so the cut changes
    no feature and saves most of the tower's work (77 positions -> about 16)."""
    tokens = clip.tokenize(texts)
    return model.encode_text(tokens[:, :int(tokens.argmax(dim=-1).max()) + 1])


def batch_loss(model, world, args, generator):
    """One batch's clip_loss: each distinct text encoded once, positives by label."""
    images, texts, labels = make_batch(world, args.anomalies, args.normals, generator)
    label_of = dict(zip(texts, labels))
    distinct = sorted(label_of)  # sorted: the column order depends on nothing but the batch
    positives = torch.tensor([[label == label_of[t] for t in distinct] for label in labels])  # [B, M]
    return clip_loss(model.encode_image(images), encode_texts(model, distinct), positives, model.logit_scale)

# ----------------------------------------------------------------------------------------------
# 3. training


def build_model(seed):
    torch.manual_seed(seed)
    return clip.CLIP(**SIZES)  # clip.py's initialisation: OpenAI's scheme, temperature 0.07


def random_clip():
    """The random CLIP the toy preset uses without this file (axf.build_clip with seed 0), for comparison."""
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=256, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2).eval()


def make_optimizer(model, lr, weight_decay):
    """AdamW with CLIP's betas (0.9, 0.98) and epsilon 1e-6; weight decay on matrices only (CLIP exempts gains
    and biases; as open_clip, the 1-D class embedding and the temperature too)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step, args):
    """Linear warm-up, then cosine decay to zero (CLIP's schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, world, args, log_every=50):
    """args.steps of CLIP training on the world's batches; returns the losses."""
    generator = torch.Generator().manual_seed(args.seed)  # every batch, so a run is repeatable
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    model.train()
    losses, start = [], time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = batch_loss(model, world, args, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP clips the logit scale at 100, "to prevent training instability"
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            recent = losses[-log_every:]
            print(f"step {step + 1}/{args.steps}: loss {sum(recent) / len(recent):.3f}, "
                  f"temperature 1/{model.logit_scale.exp().item():.1f}, {time.time() - start:.0f} s", flush=True)
    model.eval()
    return losses

# ----------------------------------------------------------------------------------------------
# 4. the file: OpenAI's plain state dict, fp16, gzip-compressed


def save_toy_clip(model, path, texts):
    """Write the model as an OpenAI state dict in fp16 (as OpenAI ships theirs), gzip-compressed.

    Deviation: the rows of the 49,408-word token embedding that no text in `texts` uses are set to zero. They
    were never trained (no gradient reaches an unused word), and zero rows compress to nothing: a 6.3 MB table
    becomes a few kilobytes. An unseen word then adds only its position, not random noise."""
    state = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    used = torch.zeros(SIZES["vocab_size"], dtype=torch.bool)
    used[[clip.START_ID, clip.END_ID] + [t for text in texts for t in clip.bpe_tokens(text)]] = True
    state["token_embedding.weight"][~used] = 0
    return files.save_gzipped(state, path)


def load_toy_clip(path=SHIPPED, device="cpu"):
    """The toy CLIP in eval mode, through clip.load like any OpenAI file."""
    return clip.load(toy.ensure_toy_clip(path, ROOT), device=device)[0]

# ----------------------------------------------------------------------------------------------
# 5. what it knows, on toy worlds it never saw


def differing_words(a, b):
    """The (word of a, word of b) pairs where two captions of as many words differ; None if lengths differ."""
    a, b = a.lower().split(), b.lower().split()
    return [(x, y) for x, y in zip(a, b) if x != y] if len(a) == len(b) else None


def colour_pairs(captions):
    """Pairs of distinct captions that differ only in colour words: (swapped pairs, one-word pairs).
    Swapped: two colour words trade places ("The green cable is replaced by a repeated gray cable" and
    "The gray cable is replaced by a repeated green cable"); one-word: one colour word differs."""
    swapped, one_word = [], []
    for a, b in itertools.combinations(sorted(set(captions)), 2):
        diff = differing_words(a, b)
        if not diff or not all(x in toy.TOY_COLOURS and y in toy.TOY_COLOURS for x, y in diff):
            continue
        if len(diff) == 1:
            one_word.append((a, b))
        elif len(diff) == 2 and diff[0] == diff[1][::-1]:
            swapped.append((a, b))
    return swapped, one_word


@torch.no_grad()
def measure(model, world):
    """Per category of the world (load_world; its anomalies), on a model in eval mode -> dict of figures:
      text_to_image   a distinct caption's nearest image carries that caption (top-1, mean over captions)
      image_to_text   an anomaly's nearest caption among its category's is its own (top-1)
      masked_to_text  the same for image * mask, Eq. (3)'s feature (top-1)
      swapped, one_word   mean cosine of captions differing in colour words (colour_pairs), raw and after
                      subtracting the category's caption mean (axf's center_captions, the default)
      chance          about the top-1 of a random ranking: 1 / the category's number of distinct captions"""
    resolution = model.visual.input_resolution
    figures = {}
    for name in sorted(set(world["categories"])):
        idx = [i for i, (c, k) in enumerate(zip(world["captions"], world["categories"])) if c and k == name]
        captions = [world["captions"][i] for i in idx]
        distinct = sorted(set(captions))
        images = world["images"][idx].float() / 255
        masked = images * world["masks"][idx]
        image_f = F.normalize(model.encode_image(clip.normalize_images(images, resolution)), dim=-1)  # [n, d]
        masked_f = F.normalize(model.encode_image(clip.normalize_images(masked, resolution)), dim=-1)
        text_f = model.encode_text(clip.tokenize(distinct))  # [m, d], unnormalised as Eq. (1) receives it
        text_n = F.normalize(text_f, dim=-1)
        own = torch.tensor([distinct.index(c) for c in captions])  # [n]
        nearest_image = (text_n @ image_f.t()).argmax(dim=1)  # [m]

        def cosine(features, pairs):  # the mean over caption pairs; nan when the category has none
            values = [F.cosine_similarity(features[distinct.index(a)], features[distinct.index(b)], dim=0).item()
                      for a, b in pairs]
            return sum(values) / len(values) if values else float("nan")

        swapped, one_word = colour_pairs(distinct)
        centred = text_f - text_f.mean(0)
        figures[name] = dict(
            text_to_image=(own[nearest_image] == torch.arange(len(distinct))).float().mean().item(),
            image_to_text=((image_f @ text_n.t()).argmax(1) == own).float().mean().item(),
            masked_to_text=((masked_f @ text_n.t()).argmax(1) == own).float().mean().item(),
            swapped=cosine(text_f, swapped), swapped_centred=cosine(centred, swapped),
            one_word=cosine(text_f, one_word), one_word_centred=cosine(centred, one_word),
            chance=1 / len(distinct), captions=len(distinct), images=len(idx))
    return figures


COLUMNS = (("text->img", "text_to_image", 2), ("img->text", "image_to_text", 2), ("img*mask", "masked_to_text", 2),
           ("chance", "chance", 2), ("swap cos", "swapped", 3), ("centred", "swapped_centred", 3),
           ("1-word", "one_word", 3), ("centred", "one_word_centred", 3))  # (header, figure, digits)


def print_figures(figures, title):
    """A table, one line per category; "-" where a category has no such caption pair."""
    cell = lambda x, digits: f"{'-':>10}" if math.isnan(x) else f"{x:>10.{digits}f}"
    print(title)
    print(f"{'':8}{'captions':>9}" + "".join(f"{header:>10}" for header, _, _ in COLUMNS))
    for name, f in figures.items():
        print(f"{name:8}{f['captions']:>9}" + "".join(cell(f[key], digits) for _, key, digits in COLUMNS))

# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED), help="the gzip-compressed CLIP file to write")
    parser.add_argument("--measure", default="", help="only measure this file (.pt.gz or OpenAI .pt), or 'random'")
    parser.add_argument("--seeds", type=int, default=16, help="train on toy worlds 1..N of every category")
    parser.add_argument("--steps", type=int, default=1800, help="training steps")
    parser.add_argument("--anomalies", type=int, default=48, help="anomalies a batch, each whole and as image * mask")
    parser.add_argument("--normals", type=int, default=16, help="normal images a batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight_decay", type=float, default=0.2, help="AdamW weight decay on matrices (CLIP's 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the same --seed and --threads write the same file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out = f"on toy worlds {HELD_OUT_SEEDS} (never trained on):"
    if args.measure:
        model = random_clip() if args.measure == "random" else (
            load_toy_clip(args.measure) if args.measure.endswith(".gz") else clip.load(args.measure)[0])
        print_figures(measure(model, load_world(HELD_OUT_SEEDS)), f"{args.measure}, {held_out}")
        return
    if args.seeds >= min(HELD_OUT_SEEDS):
        raise SystemExit(f"error: --seeds {args.seeds} would train on the held-out worlds {HELD_OUT_SEEDS}")
    print("toy_clip:", vars(args))
    world = load_world(range(1, args.seeds + 1))
    print(f"{len(world['captions'])} images, {sum(map(bool, world['captions']))} anomalies, "
          f"{len(all_texts(world))} distinct texts")
    model = build_model(args.seed)
    start = time.time()
    losses = train(model, world, args)
    minutes = (time.time() - start) / 60
    path = save_toy_clip(model, args.out, all_texts(world))
    n = max(1, min(50, len(losses) // 2))
    print(f"trained in {minutes:.1f} min (loss {sum(losses[:n]) / n:.3f} over the first {n} steps, "
          f"{sum(losses[-n:]) / n:.3f} over the last); wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print_figures(measure(load_toy_clip(path), load_world(HELD_OUT_SEEDS)), f"{path}, {held_out}")


if __name__ == "__main__":
    main()
