"""The UNet's training step with each CPU attention path forced: plain matmuls (every shape) against the fused
kernel, F.scaled_dot_product_attention (every shape), in bf16 autocast and in fp32, at the toy preset's UNet
attending at levels 0 and 1 (16x16 latents; the toy default until it attended at level 1 only) and at a UNet of 32x32 latents (channels 64, mult 1-2-4, 8 heads). unet.attention picks the
path per shape and dtype from these figures (unet.CPU_PLAIN_ATTENTION_MAX).

    OMP_NUM_THREADS=1 python docs/attention_paths.py     # median ms of 5 steps at batch 16, two rounds, alternating
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import training  # noqa: E402
import unet  # noqa: E402

SHAPES = {
    "toy UNet, levels 0 and 1, 16x16 latents": (dict(channels=64, channel_mult=(1, 2, 2), num_heads=4), 16),
    "32x32 latents": (dict(channels=64, channel_mult=(1, 2, 4), num_heads=8), 32),
}
PATHS = {"plain": float("inf"), "fused": 0}  # CPU_PLAIN_ATTENTION_MAX: plain for every shape, or for none


def step_ms(sizes, latent, bf16, path, batch=16, repeats=5):
    unet.CPU_PLAIN_ATTENTION_MAX = PATHS[path]
    torch.manual_seed(0)
    model = unet.UNet(4, 4, num_res_blocks=1, attention_levels=(0, 1), context_dim=256, **sizes)
    optimizer = training.adamw(model.parameters(), lr=1e-4)
    x, noise = torch.randn(batch, 4, latent, latent), torch.randn(batch, 4, latent, latent)
    t, context = torch.randint(0, 1000, (batch,)), torch.randn(batch, 12, 256)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = (model(x, t, context).float() - noise).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| UNet | dtype | plain matmuls (ms) | fused kernel (ms) |\n| --- | --- | --- | --- |")
    for name, (sizes, latent) in SHAPES.items():
        for bf16 in (True, False):
            times = {path: [] for path in PATHS}
            for _ in range(2):  # alternating, so that a change in the machine's load hits both
                for path in PATHS:
                    times[path].append(step_ms(sizes, latent, bf16, path))
            cells = [" / ".join(f"{t:.0f}" for t in times[path]) for path in PATHS]
            print(f"| {name} | {'bf16' if bf16 else 'fp32'} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
