"""OpenAI-compatible CLIP, written from scratch: BPE tokenizer, ViT image tower, text transformer.

AnomalyXFusion (paper §4.1, MIF) takes two of its three conditions from a frozen CLIP:
the semantic embedding is CLIP's text embedding of the caption (Eq. (1)) and the textural
embedding is CLIP's image embedding of image·mask (Eq. (3)). This file is that CLIP.

It follows OpenAI's reference (github.com/openai/CLIP, `model.py` + `simple_tokenizer.py`) so
that OpenAI's released ViT checkpoints load strictly under their own key names and give the same
features: `load(path)` reads both the TorchScript archive OpenAI distributes and a plain state
dict, `build_model` reads every size from the tensors' shapes. Stable Diffusion 1.x's text encoder
is built as a text-only CLIP (sd.py renames transformers' CLIPTextModel names onto OpenAI's) whose
`encode_text_tokens` gives the per-token hidden states SD's UNet attends to (with `replace=`, textual
inversion's splice of learned vectors at a placeholder word). Only ViT towers are written; the
ResNet ("RN50") checkpoints are refused with a clear error. The 49,408-token BPE vocabulary is the
data file `bpe_simple_vocab_16e6.txt.gz` next to this file (MIT licence, from openai/CLIP);
nothing is downloaded. Depends on torch, torchvision, ftfy, regex, pillow.
"""
import gzip
import html
import os
import zipfile
from functools import lru_cache

import ftfy
import regex as re
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import functional as TF

import files

# CLIP's image statistics (OpenAI's `_transform`), used by `preprocess` and `normalize_images`
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")

# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE, as in OpenAI's simple_tokenizer.py


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character, so BPE never sees whitespace or
    control characters; printable bytes map to themselves, the rest to chr(256 + n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean_text(text):
    """What the tokenizer actually sees: ftfy-fixed, HTML-unescaped (twice, for "&amp;amp;"),
    whitespace runs collapsed to one space, stripped, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    def __init__(self, bpe_path=VOCAB_PATH):
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"{bpe_path}: CLIP BPE vocabulary not found (it ships with this repository)")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        # line 0 is a version header; the next 49152 - 256 - 2 lines are the merges CLIP was trained with
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        # vocabulary: 256 bytes, the same bytes ending a word, one token per merge, two specials = 49,408
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.decoder = {i: v for v, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}  # lower rank = merged earlier in training
        self.cache = {t: t for t in ["<|startoftext|>", "<|endoftext|>"]}
        # pre-tokenizer: specials, English contractions, letter runs, single digits, punctuation runs
        self.pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)

    def bpe(self, token):
        """Greedily apply the lowest-ranked merge until none applies; returns space-joined symbols."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)  # the last symbol carries the end-of-word mark
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):  # replace every occurrence of (first, second), left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        tokens = []
        for piece in re.findall(self.pat, clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return tokens

    def decode(self, tokens):
        text = "".join(self.decoder[t] for t in tokens)
        text = bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")


PLACEHOLDER_ID = 265  # the BPE token of a lone "*" ("*</w>"): textual inversion's placeholder word
_tokenizer = None  # built on first use: reading the 1.3 MB vocabulary takes a moment


START_ID, END_ID = 49406, 49407  # <|startoftext|>, <|endoftext|>


def bpe_tokens(text):
    """A text -> its BPE token ids, without the start and end tokens (tokenize adds them)."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    return _tokenizer.encode(text)


def tokenize(texts, context_length=77, truncate=False, pad_id=0):
    """A str or list of str -> LongTensor [N, context_length]: <start> tokens <end>, then pad_id.
    A text longer than the context raises, unless truncate=True (then the end token stays last).
    OpenAI pads with 0; Stable Diffusion 1.x pads with the end token, pad_id=49407 (its UNet attends
    to the padding positions too, so the choice changes its context)."""
    if isinstance(texts, str):
        texts = [texts]
    result = torch.full((len(texts), context_length), pad_id, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [START_ID] + bpe_tokens(text) + [END_ID]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = END_ID
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result

# -----------------------------------------------------------------------------
# Model: pre-LN transformer blocks shared by both towers


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so half-precision weights stay stable on GPU."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU CLIP was trained with (not nn.GELU: features would drift)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names (in_proj_weight,
    in_proj_bias, out_proj), so OpenAI's keys load as they are; computed batch-first with
    F.scaled_dot_product_attention (fused kernels) instead of the slower nn.MultiheadAttention."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, causal=False):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, h, L, D/h]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        # named children c_fc / gelu / c_proj give OpenAI's keys mlp.c_fc.* and mlp.c_proj.*
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d_model, 4 * d_model))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * d_model, d_model))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    """ViT image tower: patches -> class token + positions -> transformer -> ln_post(class token) @ proj."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)  # no bias, as OpenAI's
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid**2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, grid**2 + 1, width]
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 0, :]) @ self.proj  # [B, output_dim]


class CLIP(nn.Module):
    """Both towers; vision_layers=0 builds the text tower alone (Stable Diffusion's text encoder, which
    has no image tower, projection or temperature: it offers encode_text_tokens only)."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        if isinstance(vision_layers, (tuple, list)):
            raise ValueError("vision_layers is a tuple (a ResNet image tower): only ViT CLIP models are supported")
        self.context_length = context_length
        self.text_only = vision_layers == 0
        if not self.text_only:  # OpenAI fixes the head width of the image tower at 64
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        if not self.text_only:
            self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
            self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())  # CLIP's initial temperature 0.07
        self.initialize_parameters()

    def initialize_parameters(self):
        """Random initialisation of both towers, after OpenAI's scheme for the text tower (GPT-2 style:
        residual output projections scaled down by sqrt(2 * layers)), applied to the image tower too.
        It matters only for random models (toy preset, tests, benchmarks); checkpoints overwrite it."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer,) + (() if self.text_only else (self.visual.transformer,)):
            proj_std = tower.width ** -0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tower.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if not self.text_only:
            nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self):
        return self.token_embedding.weight.dtype

    def encode_image(self, images):
        """images [B, 3, R, R], normalised with MEAN/STD -> [B, embed_dim] (not L2-normalised)."""
        return self.visual(images.to(self.dtype))

    def encode_text_tokens(self, tokens, replace=None):
        """tokens [B, n_ctx] -> the final-layer-norm hidden state of every token, [B, n_ctx, width]:
        what Stable Diffusion's UNet attends to (all 77 tokens, padding included, unprojected).

        replace=(token_id, vectors [B, n, width]): textual inversion's splice. Every row must hold token_id
        exactly n times (e.g. "a photo of a * * * *", PLACEHOLDER_ID = "*"); the i-th occurrence's embedding
        becomes vectors[:, i], after the token lookup and before the positional embedding, so the spliced
        vectors get positions and pass the transformer like words (AnomalyDiffusion's EmbeddingManager, which
        the paper's authors build on). Gradients reach `vectors`; freezing the encoder is the caller's
        `requires_grad_(False)`."""
        n_ctx = tokens.shape[-1]
        x = self.token_embedding(tokens).to(self.dtype)  # [B, n_ctx, width]
        if replace is not None:
            token_id, vectors = replace
            where = tokens == token_id  # [B, n_ctx]
            counts = where.sum(dim=1)
            wrong_counts = not x.is_meta and bool((counts != vectors.shape[1]).any())  # meta (bench.py): no values
            if vectors.ndim != 3 or vectors.shape[0] != x.shape[0] or wrong_counts:
                raise ValueError(f"encode_text_tokens: replace needs vectors [B, n, width] and each row holding token "
                                 f"{token_id} n times; got vectors {tuple(vectors.shape)}, counts {counts.tolist()}")
            # row-major fill: row b's i-th placeholder <- vectors[b, i]; out of place, so autograd reaches vectors
            x = x.masked_scatter(where[..., None], vectors.to(x.dtype))
        x = x + self.positional_embedding[:n_ctx].to(self.dtype)
        return self.ln_final(self.transformer(x, causal=True))  # causal: each token sees only its left

    def encode_text(self, tokens):
        """tokens [B, n_ctx] from tokenize() -> [B, embed_dim] (not L2-normalised)."""
        x = self.encode_text_tokens(tokens)
        # the sentence feature sits at the end token, which has the largest id (49407) in each row;
        # argmax returns the first one, so end-token padding (SD-1.x's) still picks the real end
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [B, width]
        return x @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # [B_img, B_txt]
        return logits_per_image, logits_per_image.t()

# -----------------------------------------------------------------------------
# Loading OpenAI checkpoints


def model_sizes(sd):
    """CLIP's arguments, read off a state dict's tensor shapes and key counts."""
    vision_width, _, _, vision_patch_size = sd["visual.conv1.weight"].shape
    grid_size = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)  # positions = grid**2 + class token
    transformer_width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=vision_patch_size * grid_size,
        vision_layers=len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
        vision_width=vision_width, vision_patch_size=vision_patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,  # as OpenAI: the head width is always 64
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


def build_model(state_dict):
    """A CLIP whose every size is read from the checkpoint's tensor shapes, loaded strictly, in eval mode. It is
    built on the meta device first: a state dict whose sizes describe a bigger model than its tensors (a missing,
    extra or misshapen tensor) is refused before any memory is taken."""
    sd = dict(state_dict)
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1") for k in sd):
            raise ValueError("this is a ResNet (ModifiedResNet) CLIP checkpoint: only ViT checkpoints are supported")
        raise ValueError("not a CLIP checkpoint: no 'visual.proj' tensor among its keys")
    for key in ["input_resolution", "context_length", "vocab_size"]:  # extra entries of the TorchScript archives
        sd.pop(key, None)
    try:
        sizes = model_sizes(sd)
    except (IndexError, TypeError, ValueError):  # a tensor with too few dimensions, a grid without positions, ...
        raise ValueError("not a CLIP state dict of one model (its tensors' shapes give no sizes)") from None
    layers = sizes["vision_layers"], sizes["transformer_layers"]
    with torch.device("meta"):  # shapes without memory
        per_block = len(ResidualAttentionBlock(64, 1).state_dict())
        if per_block * sum(layers) > len(sd):  # layer counts are key counts: each key could make a layer
            raise ValueError(f"not a CLIP state dict of one model ({layers[0]} + {layers[1]} layers of {per_block} "
                             f"tensors, but {len(sd)} tensors)")
        try:
            expected = {k: v.shape for k, v in CLIP(**sizes).state_dict().items()}
        except Exception as e:  # sizes no CLIP has (a width of 0, a patch of 0, ...)
            raise ValueError(f"not a CLIP state dict of one model (its sizes {sizes} build none: "
                             f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')[:200]})") from None
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    misshapen = [k for k in expected.keys() & sd.keys() if sd[k].shape != expected[k]]
    if missing or unexpected or misshapen:
        raise ValueError(f"not a CLIP state dict of one model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"misshapen {sorted(misshapen)[:3]})")
    model = CLIP(**sizes)
    model.load_state_dict(sd, strict=True)  # copies fp16 tensors into the fp32 parameters
    return model.eval()



def _read_state_dict(path):
    """The state dict of an OpenAI TorchScript archive or of a plain torch.save'd state dict, read by files.py's
    readers: weights-only, and refused in one line if it claims more memory than the file holds."""
    files.refuse_special_file(path, "a CLIP checkpoint")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: CLIP checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # both formats are zip archives
        if not zipfile.is_zipfile(path):  # the central directory at the end is missing
            raise ValueError(f"{path}: truncated or corrupted checkpoint (incomplete download?)")
        with zipfile.ZipFile(path) as archive:
            torchscript = any(name.endswith("/constants.pkl") for name in archive.namelist())
        if torchscript:  # OpenAI's released files
            return files.read_torchscript(path)
    elif head[:1] != b"\x80":  # a pickle starts with its protocol; before torch 1.6, torch.save wrote a bare one
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a TorchScript archive nor a torch.save file)")
    return files.read_torch(path, advice="a CLIP checkpoint holds only tensors: save its state_dict() with torch.save")


def load(path, device="cpu"):
    """OpenAI CLIP checkpoint file -> (model in eval mode on `device`, preprocess for PIL images).
    fp16 weights become fp32 on the CPU and stay half precision on a GPU, as in OpenAI's load()."""
    path = os.fspath(path)
    sd = _read_state_dict(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a CLIP checkpoint (expected a state dict of tensors, got {type(sd).__name__})")
    try:
        model = build_model(sd)
    except KeyError as e:  # a ViT-looking checkpoint that lacks a tensor build_model reads
        raise ValueError(f"{path}: not a CLIP checkpoint (no {e} tensor)") from None
    except (ValueError, RuntimeError) as e:  # ResNet tower, or strict loading's list of key / shape mismatches
        raise ValueError(f"{path}: {' '.join(str(e).split())[:500]}") from None
    half = sd["visual.conv1.weight"].dtype == torch.float16
    if half and torch.device(device).type != "cpu":
        model = model.half()  # LayerNorm still computes in fp32
    return model.to(device), make_preprocess(model.visual.input_resolution)


def _convert_to_rgb(image):
    return image.convert("RGB")  # a named function, not a lambda, so DataLoader workers can pickle it


def make_preprocess(resolution):
    """OpenAI's image transform for a PIL image: bicubic resize of the short side, centre crop, RGB, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        _convert_to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def normalize_images(images, resolution=224):
    """Tensor twin of `preprocess` for in-memory batches (e.g. image·mask for Eq. (3)):
    float [B, 3, H, W] in [0, 1] -> [B, 3, resolution, resolution], resized, cropped, normalised."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_images: expected a float batch [B, 3, H, W], got shape {tuple(images.shape)}")
    x = TF.resize(images, resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, resolution).clamp(0, 1)  # bicubic overshoots; PIL clamps to the pixel range too
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
