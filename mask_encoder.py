"""The spatial mask encoder and the location tokens of AnomalyXFusion (paper §4.2, Eq. (2)).

    e_loc = E_CNN(E_ISTR(Y_loc))                                   Eq. (2)

E_ISTR is a mask encoder pre-trained to compress masks (the paper borrows ISTR's mask encoder,
refs [38, 39]); here it is a small conv stack, pre-trained as a mask autoencoder on dataset masks
and sampled masks (`MaskAutoencoder`), then fine-tuned with the rest of the model. E_CNN is "a
one-layer CNN" for the channels plus "fully connected layers to modulate the dimensions"
(`LocationTokens`): a 1x1 conv turns the feature channels into k maps, and a linear layer turns
each flattened map into one d-wide token.

Depends on torch only.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

FEATURE_SIZE = 8  # the encoder halves the mask until it is 8x8, whatever the image size


def num_downsamplings(image_size):
    """How many stride-2 convs take an image_size mask down to FEATURE_SIZE."""
    levels = math.log2(image_size / FEATURE_SIZE)
    if levels < 1 or levels != int(levels):
        raise ValueError(f"image_size {image_size} must be {FEATURE_SIZE} times a power of two (>= {2 * FEATURE_SIZE})")
    return int(levels)


class MaskEncoder(nn.Module):
    """E_ISTR: binary mask [B, 1, S, S] -> features [B, C, 8, 8], a stride-2 conv per halving."""

    def __init__(self, image_size, channels=32, feature_channels=64):
        super().__init__()
        layers, width = [], 1
        for i in range(num_downsamplings(image_size)):
            out = min(channels * 2**i, feature_channels)
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        layers.append(nn.Conv2d(width, feature_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, mask):
        # masks are {0, 1}; centring them keeps the first conv's input zero-mean
        return self.net(mask * 2 - 1)


class MaskDecoder(nn.Module):
    """The mirror of MaskEncoder, used only to pre-train it: features -> mask logits [B, 1, S, S]."""

    def __init__(self, image_size, channels=32, feature_channels=64):
        super().__init__()
        layers, width = [], feature_channels
        for i in reversed(range(num_downsamplings(image_size))):
            out = min(channels * 2**i, feature_channels)
            layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features):
        return self.net(features)


class MaskAutoencoder(nn.Module):
    """Pre-training of the mask encoder: reconstruct the mask through the 8x8 bottleneck."""

    def __init__(self, image_size, channels=32, feature_channels=64):
        super().__init__()
        self.encoder = MaskEncoder(image_size, channels, feature_channels)
        self.decoder = MaskDecoder(image_size, channels, feature_channels)

    def loss(self, mask):
        """Binary cross-entropy of the reconstruction, and its intersection-over-union for logs."""
        logits = self.decoder(self.encoder(mask))
        loss = F.binary_cross_entropy_with_logits(logits, mask)
        predicted = (logits > 0).float()
        union = ((predicted + mask) > 0).float().sum()
        iou = (predicted * mask).sum() / union.clamp(min=1)
        return loss, {"mask_bce": loss.item(), "mask_iou": iou.item()}

    def forward(self, mask):
        """The loss: DDP, which train.py wraps the autoencoder in under torchrun, averages the gradients of what
        forward() computes."""
        return self.loss(mask)


class LocationTokens(nn.Module):
    """E_CNN of Eq. (2): features [B, C, 8, 8] -> k location tokens [B, k, d]."""

    def __init__(self, feature_channels, num_tokens, dim):
        super().__init__()
        # one conv layer adjusts the channels: one feature map per token
        self.conv = nn.Conv2d(feature_channels, num_tokens, kernel_size=1)
        # a fully connected layer maps each flattened 8x8 map to the token width
        self.fc = nn.Linear(FEATURE_SIZE * FEATURE_SIZE, dim)

    def forward(self, features):
        maps = self.conv(features).flatten(2)  # [B, k, 64]
        return self.fc(maps)  # [B, k, d]
