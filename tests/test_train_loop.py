"""The shared training loop: learning, exact resume, atomic checkpoints, frozen parts, EMA, accumulation."""
from __future__ import annotations

import json
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rslib import utils
from rslib.train import TrainConfig, batch_indices, load_trainable, loop, step_seed, train_loop
from rslib.utils import atomic_write_dir


def _data(n: int = 96, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A noisy linear-plus-sine regression problem: (x (4,), y (1,)) pairs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 1, generator=g)
    y = x @ w + torch.sin(2 * x[:, :1]) + 0.05 * torch.randn(n, 1, generator=g)
    return list(zip(x, y))


def _mlp(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))


def _mse(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _noisy_mse(model: nn.Module, batch, generator: torch.Generator) -> dict:
    """Input noise and a random per-sample weight, both drawn from the step's generator."""
    x, y = batch
    noise = torch.randn(x.shape, generator=generator)
    weight = torch.rand(x.shape[0], 1, generator=generator)
    loss = (weight * (model(x + 0.1 * noise) - y) ** 2).mean()
    return {"loss": loss, "weight": weight.mean()}


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=8, lr=1e-2, log_every=5)
    return TrainConfig(**{**base, **kw})


def _optimizer_tensors(folder) -> dict[str, torch.Tensor]:
    sd = torch.load(folder / "checkpoint" / "optimizer.pt", weights_only=True)
    return {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}


def test_loss_falls(tmp_path):
    res = train_loop(_mlp(), _mse, _data(), _cfg(steps=80, warmup_steps=5), tmp_path, progress=True)
    losses = [h["loss"] for h in res.history]
    assert res.steps == 80 and len(losses) == 80
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10
    assert res.history[0]["lr"] == pytest.approx(1e-2 / 6) and res.history[-1]["lr"] == pytest.approx(1e-2)
    assert json.loads((tmp_path / "history.json").read_text()) == res.history


def test_cosine_lr_decay(tmp_path):
    res = train_loop(_mlp(), _mse, _data(), _cfg(steps=20, warmup_steps=4, lr_decay="cosine"), tmp_path,
                     progress=False)
    lrs = [h["lr"] for h in res.history]  # the LR each optimizer step used
    assert lrs[:5] == pytest.approx([1e-2 * k / 5 for k in range(1, 5)] + [1e-2])  # warm-up, then the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then strictly falling
    assert 0 < lrs[-1] < 0.01 * 1e-2  # to nearly 0 at the last step
    assert loop.lr_multiplier(4, 20, "cosine")(20) == 0.0 and loop.lr_multiplier(4, 20)(19) == 1.0
    with pytest.raises(ValueError, match="lr_decay"):
        _cfg(lr_decay="linear")


def test_exact_resume(tmp_path):
    cfg = _cfg(ema_decay=0.8, checkpoint_every=5, weight_decay=0.01, warmup_steps=3, lr_decay="cosine")
    full = train_loop(_mlp(0.2), _noisy_mse, _data(), cfg, tmp_path / "full", progress=False)

    part = train_loop(_mlp(0.2), _noisy_mse, _data(), cfg, tmp_path / "part", stop_after=8, progress=False)
    assert part.steps == 8 and len(part.history) == 8
    assert json.loads((tmp_path / "part/checkpoint/state.json").read_text())["step"] == 8
    rest = train_loop(_mlp(0.2, seed=1), _noisy_mse, _data(), cfg, tmp_path / "part", progress=False)
    assert rest.steps == 20

    assert rest.history == full.history  # loss, lr and logged extras, step by step
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "full/checkpoint" / name)
        b = load_file(tmp_path / "part/checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = _optimizer_tensors(tmp_path / "full"), _optimizer_tensors(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    again = train_loop(_mlp(0.2), _noisy_mse, _data(), cfg, tmp_path / "part", progress=False)
    assert again.steps == 20 and again.history == full.history  # already done: nothing to train


def test_generator_draws_depend_only_on_step(tmp_path):
    draws: list[float] = []

    def recording(model, batch, generator):
        draws.append(float(torch.rand((), generator=generator)))
        return _mse(model, batch, generator)

    cfg = _cfg(steps=10, seed=3)
    train_loop(_mlp(), recording, _data(), cfg, tmp_path / "a", progress=False)
    uninterrupted, draws[:] = draws[:], []
    train_loop(_mlp(), recording, _data(), cfg, tmp_path / "b", stop_after=4, progress=False)
    train_loop(_mlp(), recording, _data(), cfg, tmp_path / "b", progress=False)
    assert draws == uninterrupted and len(set(draws)) == 10
    expected = [float(torch.rand((), generator=torch.Generator().manual_seed(step_seed(3, s, 0)))) for s in range(10)]
    assert draws == expected


def test_data_order_is_a_pure_function_of_the_step():
    n, b = 10, 4
    stream = [i for m in range(10) for i in batch_indices(n, b, m, seed=5)]
    for epoch in range(4):  # every epoch visits every sample once
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # reshuffled per epoch
    assert batch_indices(n, b, 7, seed=5) == stream[28:32]
    assert batch_indices(n, b, 0, seed=6) != batch_indices(n, b, 0, seed=5)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = _mlp()
    train_loop(model, _mse, _data(), _cfg(), tmp_path, stop_after=4, progress=False)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    for writer in ("_write_state", "_write_tensors"):
        def broken(*args, **kwargs):
            raise OSError("disk full")

        with monkeypatch.context() as mp:
            mp.setattr(loop, writer, broken)
            with pytest.raises(OSError, match="disk full"):
                train_loop(_mlp(), _mse, _data(), _cfg(), tmp_path, stop_after=8, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "history.json"]  # nothing partial
        assert json.loads((tmp_path / "checkpoint/state.json").read_text())["step"] == 4
        fresh = _mlp(seed=1)
        load_trainable(fresh, tmp_path)
        assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)

    res = train_loop(_mlp(), _mse, _data(), _cfg(), tmp_path, stop_after=8, progress=False)
    assert res.steps == 8 and len(res.history) == 8  # the old checkpoint resumed fine


def test_atomic_write_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_write_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_write_dir(target) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError
    assert (target / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_write_dir(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


class _HalfFrozen(nn.Module):
    """A frozen feature layer (with BatchNorm) under a trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.features.requires_grad_(False)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_frozen_parameters_untouched_and_not_saved(tmp_path):
    model = _HalfFrozen()
    frozen = {k: v.clone() for k, v in model.features.state_dict().items()}
    head = model.head.weight.detach().clone()
    train_loop(model, _mse, _data(), _cfg(steps=10, weight_decay=0.1), tmp_path, progress=False)
    assert all(torch.equal(model.features.state_dict()[k], v) for k, v in frozen.items())  # BN stats too
    assert not torch.equal(model.head.weight, head)
    assert set(load_file(tmp_path / "checkpoint/model.safetensors")) == {"head.weight", "head.bias"}


def test_ema_differs_and_loads_back(tmp_path):
    model = _mlp()
    train_loop(model, _mse, _data(), _cfg(steps=15, ema_decay=0.9), tmp_path, progress=False)
    raw = load_file(tmp_path / "checkpoint/model.safetensors")
    ema = load_file(tmp_path / "checkpoint/ema.safetensors")
    assert raw.keys() == ema.keys() and all(v.dtype == torch.float32 for v in ema.values())
    assert all(not torch.allclose(raw[k], ema[k]) for k in raw)

    fresh = _mlp(seed=1)
    assert load_trainable(fresh, tmp_path / "checkpoint", ema=True) == sorted(ema)
    assert all(torch.equal(fresh.state_dict()[k], ema[k]) for k in ema)
    load_trainable(fresh, tmp_path / "checkpoint/model.safetensors")
    assert all(torch.equal(fresh.state_dict()[k], raw[k]) for k in raw)
    with pytest.raises(KeyError, match="missing"):
        load_trainable(nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(), nn.Linear(32, 1), nn.Linear(1, 1)),
                       tmp_path)
    with pytest.raises(KeyError, match="unexpected"):
        load_trainable(nn.Sequential(nn.Linear(4, 32)), tmp_path, strict=False)


def test_ema_warms_up_and_follows_the_weights(tmp_path):
    """With a high decay over a short run the average must still leave the random initialisation behind."""
    from rslib.train.loop import ema_decay_at

    assert ema_decay_at(0.999, 0) == 0.1 and ema_decay_at(0.999, 10**6) == 0.999
    model = _mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train_loop(model, _mse, _data(), _cfg(steps=30, lr=1e-2, ema_decay=0.999), tmp_path, progress=False)
    raw = load_file(tmp_path / "checkpoint/model.safetensors")
    ema = load_file(tmp_path / "checkpoint/ema.safetensors")
    for k in raw:
        assert (ema[k] - raw[k]).norm() < (ema[k] - init[k]).norm(), k


def test_gradient_accumulation_matches_bigger_batch(tmp_path):
    common = dict(steps=3, lr=1e-2, max_grad_norm=None)
    accum = _mlp()
    train_loop(accum, _mse, _data(), _cfg(batch_size=4, grad_accum=2, **common), tmp_path / "a", progress=False)
    big = _mlp()
    train_loop(big, _mse, _data(), _cfg(batch_size=8, grad_accum=1, **common), tmp_path / "b", progress=False)
    for k, v in big.state_dict().items():
        torch.testing.assert_close(accum.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # Adam's update hides a gradient scale; its first moment does not
    a, b = _optimizer_tensors(tmp_path / "a"), _optimizer_tensors(tmp_path / "b")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_worker_processes_give_the_same_run(tmp_path):
    cfg = _cfg(steps=6)
    plain = train_loop(_mlp(), _mse, _data(), cfg, tmp_path / "a", progress=False)
    workers = train_loop(_mlp(), _mse, _data(), replace(cfg, num_workers=1), tmp_path / "b", progress=False)
    assert workers.history == plain.history


def _conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))


def _conv_data(n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 8, 8, generator=g)
    return list(zip(x, x[:, :1] * x[:, 1:]))


def test_channels_last_trains_the_same_and_hands_back_the_default_layout(tmp_path):
    """channels_last changes only the memory layout of the convolution weights during the run: the loss history
    and the weights match the default layout's to float rounding, the checkpoint resumes in either layout, and the
    model comes back in the default layout (what safetensors and the pipelines expect)."""
    cfg = _cfg(steps=12, checkpoint_every=6)
    plain = train_loop(_conv_net(), _mse, _conv_data(), cfg, tmp_path / "plain", progress=False)
    net = _conv_net()
    last = train_loop(net, _mse, _conv_data(), replace(cfg, channels_last=True), tmp_path / "last", progress=False)
    assert [h["loss"] for h in last.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)
    a, b = load_file(tmp_path / "plain/checkpoint/model.safetensors"), load_file(tmp_path / "last/checkpoint/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert all(p.is_contiguous() for p in net.parameters())
    # stopped in one layout, resumed in the other: the same run
    train_loop(_conv_net(), _mse, _conv_data(), replace(cfg, channels_last=True), tmp_path / "mixed", stop_after=6,
               progress=False)
    mixed = train_loop(_conv_net(), _mse, _conv_data(), cfg, tmp_path / "mixed", progress=False)
    assert [h["loss"] for h in mixed.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)


class _NormAttention(nn.Module):
    """A conv, a group norm and self-attention: the kernels cpu_bf16_kernels reroutes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.out = nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 1, 1)
        self.skip = nn.Conv2d(2, 1, 3, padding=1)
        self.seen: list[str] = []

    def forward(self, x):
        h = self.norm(self.conv(x))
        self.seen.append(str(h.dtype))
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        tokens = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return self.out(tokens.transpose(1, 2).reshape(b, c, hh, ww)) + self.skip(x)


def test_cpu_bf16_kernels_keep_group_norms_in_float32_and_only_inside_the_block():
    net, x = _NormAttention(), torch.randn(2, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        with loop.cpu_bf16_kernels(net):
            y = net(x)
        net(x)
    assert net.seen == ["torch.bfloat16", "torch.float32", "torch.bfloat16"]
    assert y.dtype == torch.bfloat16  # the convolutions still run in bf16
    assert not net.norm._forward_pre_hooks


def test_bf16_training_on_cpu_learns_and_leaves_no_hooks(tmp_path, monkeypatch):
    """Under bf16 on CPU the loop trains with float32 group norms (the loss falls like float32's) and takes its
    hooks off the model at the end, also when the loss function raises."""
    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: True)  # bf16 even where it is emulated (slow, but tiny)
    cfg = _cfg(steps=30)
    net = _NormAttention()
    data = [(x, x[:1] - 0.5 * x[1:]) for x, _ in _conv_data()]
    bf16 = train_loop(net, _mse, data, replace(cfg, mixed_precision="bf16"), tmp_path / "bf16", progress=False)
    fp32 = train_loop(_NormAttention(), _mse, data, cfg, tmp_path / "fp32", progress=False)
    assert "torch.float32" in net.seen and not net.norm._forward_pre_hooks
    first, last = bf16.history[0]["loss"], sum(h["loss"] for h in bf16.history[-5:]) / 5
    assert last < 0.7 * first
    assert last == pytest.approx(sum(h["loss"] for h in fp32.history[-5:]) / 5, rel=0.1)

    def broken(model, batch, generator):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        train_loop(net, broken, data, replace(cfg, mixed_precision="bf16"), tmp_path / "broken", progress=False)
    assert not net.norm._forward_pre_hooks


def test_bf16_on_a_cpu_without_bf16_units_trains_in_float32(tmp_path, monkeypatch):
    """Emulated bf16 runs many times slower than float32, so such a CPU trains the float32 run, and says so."""
    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: False)
    cfg = _cfg(steps=6)
    data = [(x, x[:1] - 0.5 * x[1:]) for x, _ in _conv_data()]
    with pytest.warns(UserWarning, match="no bf16 units"):
        asked = train_loop(_NormAttention(), _mse, data, replace(cfg, mixed_precision="bf16"), tmp_path / "bf16",
                           progress=False)
    fp32 = train_loop(_NormAttention(), _mse, data, cfg, tmp_path / "fp32", progress=False)
    assert [h["loss"] for h in asked.history] == [h["loss"] for h in fp32.history]
    assert loop.precision_for_this_machine(cfg) is cfg  # float32 runs are left as they are
