"""Run by tests/test_multiprocess.py under torchrun: a few training steps, then each rank saves its weights."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rslib.train import TrainConfig, train_loop


class TwoParts(nn.Module):
    """Two trainable parts (like an adapter and a resampler) and a frozen one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.adapter = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
        self.resampler = nn.Linear(4, 4)

    def forward(self, x):
        return self.adapter(self.resampler(x) + self.frozen(x))


def loss_fn(model, batch, generator):
    x, y = batch
    noise = 0.01 * torch.randn(x.shape, generator=generator)
    return ((model(x + noise) - y) ** 2).mean()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(64, 4, generator=g)
    data = [(x, x.sum(0, keepdim=True)) for x in xs]
    model = TwoParts()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, seed=0)
    train_loop(model, loss_fn, data, cfg, out / "run", progress=False)
    # each rank sees its own slice of every batch and its own noise: only synchronised gradients keep them equal
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    rank = torch.distributed.get_rank()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
