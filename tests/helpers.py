"""What several test files share: a training run killed after its step-2 checkpoint and resumed."""
import pytest
import torch

import axf
import train


def kill_after_two_steps_and_resume(args, out_dir, monkeypatch, capsys):
    """Run train.main(args), killed (KeyboardInterrupt) in its third AnomalyXFusion step, then run it again to the end.
    Asserts the kill left the step-2 checkpoint and the re-run said it resumed there; returns the final checkpoint."""
    calls = {"n": 0}
    real_loss = axf.AnomalyXFusion.loss

    def dying_loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(self, *a, **k)

    monkeypatch.setattr(axf.AnomalyXFusion, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    assert torch.load(out_dir / "axf.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(axf.AnomalyXFusion, "loss", real_loss)
    capsys.readouterr()
    train.main(args)
    assert f"resuming from {out_dir / 'axf.pt'} at step 2" in capsys.readouterr().out
    return torch.load(out_dir / "axf.pt", weights_only=True)
