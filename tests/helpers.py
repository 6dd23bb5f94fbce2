"""What several test files share: a training run killed after its step-2 checkpoint and resumed, and processes
started as torchrun starts them."""
import os
import socket

import pytest
import torch
import torch.multiprocessing

import axf
import train


class Killed(Exception):
    """A kill between two checkpoints, raised from inside a training step."""


def die_in_step(n):
    """Make AnomalyXFusion.loss raise Killed at its n-th call; returns a function that undoes it."""
    calls, real_loss = {"n": 0}, axf.AnomalyXFusion.loss

    def dying_loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return real_loss(self, *a, **k)

    axf.AnomalyXFusion.loss = dying_loss
    return lambda: setattr(axf.AnomalyXFusion, "loss", real_loss)


def kill_after_two_steps_and_resume(args, out_dir, monkeypatch, capsys):
    """Run train.main(args), killed in its third AnomalyXFusion step, then run it again to the end.
    Asserts the kill left the step-2 checkpoint and the re-run said it resumed there; returns the final checkpoint."""
    undo = die_in_step(3)
    try:
        with pytest.raises(Killed):
            train.main(args)
    finally:
        undo()
    assert torch.load(out_dir / "axf.pt", weights_only=True)["step"] == 2
    capsys.readouterr()
    train.main(args)
    assert f"resuming from {out_dir / 'axf.pt'} at step 2" in capsys.readouterr().out
    return torch.load(out_dir / "axf.pt", weights_only=True)


def torchrun(nprocs, fn, *args):
    """fn(*args) in nprocs processes that see what `torchrun --standalone --nproc_per_node nprocs` gives its
    workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). They are forked from this one, so they
    start in milliseconds, not in the seconds a new Python takes to import torch. An exception in one of them
    is raised here as torch.multiprocessing.ProcessRaisedException, with its traceback."""
    with socket.socket() as s:  # a free port for rank 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_worker, (nprocs, port, fn, args), nprocs=nprocs, start_method="fork")


def _worker(rank, nprocs, port, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    fn(*args)
