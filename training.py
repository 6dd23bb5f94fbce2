"""What a training loop needs besides its model and its data, for train.py's three stages, toy_sd.py's two and
bench.py's timed steps:

    adamw        AdamW as one fused kernel over all the weights
    warm_up      the learning rate's linear warm-up
    EMA          the exponential moving average of the weights, which samples are drawn from
    peak_memory  the most memory the run held

Checkpoints (what a resume needs) are checkpoint.py's. Depends on torch only.
"""
import torch


def adamw(params, lr, weight_decay=0.01):
    """AdamW as one fused kernel over all the weights, not a loop over the tensors (docs/speed.md)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def warm_up(optimizer, step, warmup_steps):
    """Linear warm-up: each parameter group's learning rate rises from base_lr / warmup_steps to its base_lr over
    the first warmup_steps steps (0: none), so that Adam's first, noisy moment estimates take small steps."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * min(1.0, (step + 1) / max(1, warmup_steps))


class EMA:
    """An exponential moving average of the trainable weights; the samples come from it."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step):
        # warm-up (LDM's): early on the average would mostly remember the random initialisation
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        # shadow += (1 - decay) * (weight - shadow) for every tensor at once: one call, not a Python loop
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow], 1 - decay)

    def swap(self, model):
        """Exchange the model's weights with the averaged ones (call twice to swap back)."""
        params = dict(model.named_parameters())
        for n, shadow in self.shadow.items():
            current = params[n].detach().clone()
            params[n].data.copy_(shadow)
            shadow.copy_(current)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, shadow):
        """Saved averages, moved onto the device of the weights they average (a checkpoint is read on the CPU)."""
        if shadow.keys() != self.shadow.keys():
            raise ValueError("the saved EMA averages other weights than this model's")
        self.shadow = {n: v.to(self.shadow[n].device, self.shadow[n].dtype) for n, v in shadow.items()}


def peak_memory(device):
    """The most memory this run held: CUDA's max allocated, else the process's max resident set (Linux)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (CUDA max allocated)"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process max resident set)"
