"""The one training loop every stage uses: accelerate, atomic checkpoints, exact resume.

A stage hands :func:`train_loop` one ``nn.Module`` holding every trainable
part, a ``loss_fn(model, batch, generator)`` and a dataset. Everything that
varies from step to step is a pure function of the step number:

* the batch of step ``s`` comes from a seeded permutation of the data set
  per epoch, so no iterator state needs saving;
* ``generator`` (and the global torch RNG, for ``nn.Dropout``) is seeded
  from ``(seed, step, process index)``, so noise, timesteps and condition
  dropout drawn inside a step repeat exactly after a resume.

A checkpoint therefore only needs the trainable weights, the optimizer and
LR-scheduler state, the EMA weights and the loss history; resuming from it
gives bitwise the same weights as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, send_to_device
from safetensors.torch import load_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from rslib import utils
from rslib.progress import StepReporter
from rslib.utils import atomic_write_dir, pick_device, recover_dir, remove_dir, save_tensors

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
LR_DECAYS = ("constant", "cosine")
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
STATE_NAME = "state.json"
HISTORY_NAME = "history.json"

LossFn = Callable[[nn.Module, Any, torch.Generator], "torch.Tensor | Mapping[str, Any]"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (every stage uses the same fields)."""

    steps: int  # optimizer steps
    batch_size: int  # samples per micro-batch, summed over all processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then lr_decay
    lr_decay: str = "constant"  # after warm-up: "constant" | "cosine" (to 0 at the last step)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    checkpoint_every: int = 0  # 0 = only at the end
    log_every: int = 10  # progress-bar refresh, in steps
    seed: int = 0
    ema_decay: float | None = None
    num_workers: int = 0
    find_unused_parameters: bool = False  # for DDP when some trainable part may be skipped in a step
    # convolution weights in channels-last layout on CPU: at the cpu preset on 2 cores a CRS-Diff step is 8-13% faster
    # and a segmenter step 10-25%; stage one's loop runs as fast either way (233 ms a step), CC-Diff's
    # (attention-bound) and the bf16 autoencoder's gain nothing. On 2 AVX2-only cores: segmenter 299 -> 249 ms,
    # CRS-Diff 860 -> 878 ms, stage one 577 -> 597-624 ms (3-8% slower)
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"need steps >= 0, batch_size >= 1, grad_accum >= 1; got {self}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), not {self.ema_decay}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, not {self.lr_decay!r}")


@dataclass
class TrainResult:
    """What a run returns: where it saved, the loss history, its wall time and final step."""

    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of the latest checkpoint (``out_dir/checkpoint``)."""
        return self.out_dir / CHECKPOINT_DIR


# ---------------------------------------------------------------------------
# Pure functions of the step: data order and random seeds


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay after optimizer step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

    The warm-up lets the average follow the weights early on; a fixed 0.999 over a few hundred steps would keep
    most of the random initialisation (0.999^600 = 0.55).
    """
    return min(decay, (1 + step) / (10 + step))


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from a step's ``generator`` (for draws that must happen on the CPU), reproducibly."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def step_seed(seed: int, step: int, process_index: int = 0, stream: str = "generator") -> int:
    """A 63-bit seed that depends only on (seed, step, process index, stream name)."""
    key = f"{seed}:{step}:{process_index}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


@lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` data-set indices in one epoch (seeded by seed and epoch)."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 0, "data"))
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Data-set indices of one global micro-batch; a pure function of ``micro_step``.

    The sample stream is the concatenation of the epoch permutations, and
    micro-batch ``m`` is its slice ``[m * batch_size, (m + 1) * batch_size)``.
    """
    if n == 0:
        raise ValueError("the training data set is empty")
    start = micro_step * batch_size
    out: list[int] = []
    perm_epoch, perm = -1, None
    for pos in range(start, start + batch_size):
        epoch = pos // n
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, epoch_permutation(n, seed, epoch)
        out.append(int(perm[pos % n]))
    return out


class _StepBatchSampler:
    """Yields this process's share of every micro-batch from ``start_step`` to ``end_step``."""

    def __init__(self, n: int, cfg: TrainConfig, start_step: int, end_step: int, rank: int, world: int):
        self.n, self.cfg, self.start, self.end, self.rank, self.world = n, cfg, start_step, end_step, rank, world

    def __len__(self) -> int:
        return (self.end - self.start) * self.cfg.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.cfg.batch_size // self.world
        for step in range(self.start, self.end):
            for micro in range(self.cfg.grad_accum):
                idx = batch_indices(self.n, self.cfg.batch_size, step * self.cfg.grad_accum + micro, self.cfg.seed)
                yield idx[self.rank * per_rank : (self.rank + 1) * per_rank]


# ---------------------------------------------------------------------------
# Checkpoints


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with ``requires_grad`` (names as in ``model.named_parameters()``), on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: str | Path, *, ema: bool = False, strict: bool = True) -> list[str]:
    """Load ``model.safetensors`` (or ``ema.safetensors``) into ``model``; returns the names loaded.

    ``path`` is a checkpoint or stage folder, or the ``.safetensors`` file itself.
    Every tensor in the file must name a parameter or buffer of ``model`` with the
    same shape; with ``strict=True`` every trainable parameter of ``model``
    must also be in the file.
    """
    path = Path(path)
    if path.is_dir():
        name = EMA_NAME if ema else WEIGHTS_NAME
        path = path / name if (path / name).exists() else path / CHECKPOINT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}: train the stage first, or pass its output folder")
    tensors = load_file(str(path))
    own = model.state_dict()
    unexpected = sorted(k for k in tensors if k not in own)
    wrong = sorted(k for k in tensors if k in own and own[k].shape != tensors[k].shape)
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in tensors) if strict else []
    if unexpected or wrong or missing:
        raise KeyError(
            f"{path} does not fit {type(model).__name__}: unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}, missing {missing[:5]} "
            f"({len(unexpected)}/{len(wrong)}/{len(missing)} in all)"
        )
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file."""
    save_tensors(tensors, path)


def _write_state(state: dict[str, Any], path: Path) -> None:
    """Write the JSON state (step, history, config) last: its presence marks a complete checkpoint."""
    path.write_text(json.dumps(state, indent=1))


def _save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint`` atomically (main process only)."""
    target = out_dir / CHECKPOINT_DIR
    with atomic_write_dir(target) as tmp:
        _write_tensors(trainable_state_dict(model), tmp / WEIGHTS_NAME)
        if ema is not None:
            _write_tensors({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / EMA_NAME)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
        _write_state(state, tmp / STATE_NAME)
    return target


def _find_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint folder ``out_dir/checkpoint``, or None.

    Only that folder counts: a checkpoint renamed aside while a newer one was written is either put back by
    :func:`~rslib.utils.recover_dir` (the newer one never came in) or superseded, and never resumed from.
    """
    main = out_dir / CHECKPOINT_DIR
    return main if (main / STATE_NAME).is_file() else None


def checkpoint_progress(out_dir: str | Path) -> tuple[int, int] | None:
    """``(step, steps)`` of the checkpoint a run in ``out_dir`` would resume from (None without one), after
    recovering what a killed checkpoint writer left."""
    out_dir = Path(out_dir)
    recover_dir(out_dir / CHECKPOINT_DIR)
    found = _find_checkpoint(out_dir)
    if found is None:
        return None
    state = json.loads((found / STATE_NAME).read_text())
    return int(state["step"]), int(state.get("config", {}).get("steps", state["step"]))


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, ema: dict | None) -> dict:
    """Load weights, optimizer, scheduler and EMA state from a checkpoint folder; returns state.json."""
    load_trainable(model, folder / WEIGHTS_NAME)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
    # moments saved from a run in another memory layout (channels_last on CPU, not on GPU) take their parameter's:
    # the fused AdamW kernel walks a parameter and its moments in memory order
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, map_location="cpu", weights_only=True))
    if ema is not None:
        if not (folder / EMA_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {EMA_NAME} but ema_decay is set: resume with the same config")
        for k, v in load_file(str(folder / EMA_NAME)).items():
            ema[k].copy_(v)
    return json.loads((folder / STATE_NAME).read_text())


# ---------------------------------------------------------------------------
# The loop


class _LossModule(nn.Module):
    """Wraps ``model`` so that the whole ``loss_fn`` runs inside one forward.

    Under DDP the gradients of every trainable parameter touched by
    ``loss_fn`` are then synchronised, whichever submodules it calls, and
    mixed-precision autocast covers all of it.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, generator: torch.Generator) -> Any:
        """The loss (or dict of losses) of one micro-batch."""
        return self.loss_fn(self.model, batch, generator)


def _frozen_parts_to_eval(model: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen in eval mode (no dropout, no BN updates)."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def precision_for_this_machine(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, switched to float32 when it asks for bf16 on a CPU without bf16 units (with a warning).

    bf16 autocast pays on CPUs that compute bf16 in hardware; where it is emulated it runs many times slower than
    float32 (``rslib.utils.cpu_has_bf16_units``), so such a machine trains the same model in float32 instead.
    """
    if cfg.mixed_precision != "bf16" or pick_device("auto").type != "cpu" or utils.cpu_has_bf16_units():
        return cfg
    warnings.warn("this CPU has no bf16 units (AVX512-BF16 or AMX), so bf16 autocast would be emulated and run "
                  "many times slower: this run trains in float32 instead", stacklevel=3)
    return replace(cfg, mixed_precision="no")


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for ``cfg``; in a single process a stale state from another precision is reset."""
    kwargs = dict(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the world size
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise
        # e.g. a notebook kernel that already trained with another mixed_precision
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


@contextmanager
def cpu_bf16_kernels(model: nn.Module) -> Iterator[None]:
    """Keep CPU bf16 autocast off the two kernels it slows down, while the block runs.

    On CPU, autocast runs group norms in bf16 when their input is bf16, and
    the fused attention kernel in bf16; both are far slower than in float32
    (on 2 cores, a stage-one UNet step: group norms 4x, attention backward
    15x, the whole step 214 -> 268 ms instead of faster). Inside this block
    every ``nn.GroupNorm`` of ``model`` computes in float32 and
    ``scaled_dot_product_attention`` uses its matmul ("math") kernel, which
    autocast runs on bf16 matrix units; convolutions and linear layers stay
    in bf16 (a stage-one UNet forward and backward alone: 224 -> 172 ms; the
    whole training step, text encoder and loss included: 219 -> 194 ms).
    """
    upcast = lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args)  # noqa: E731
    hooks = [m.register_forward_pre_hook(upcast) for m in model.modules() if isinstance(m, nn.GroupNorm)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn`` output -> (loss, extra scalars to log)."""
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, Mapping) and "loss" in out:
        extras = {k: torch.as_tensor(v).detach().float().mean() for k, v in out.items() if k != "loss"}
        return out["loss"], extras
    raise TypeError(f"loss_fn must return a tensor or a dict with key 'loss', not {type(out).__name__}")


def lr_multiplier(warmup_steps: int, steps: int, decay: str = "constant") -> Callable[[int], float]:
    """LR multiplier of optimizer step ``step``: linear from 1/(w+1) to 1 over the first w steps, then 1
    ("constant") or a half cosine from 1 down to 0 at step ``steps`` ("cosine")."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def run_label(out_dir: str | Path) -> str:
    """How progress names a run: its folder, or the stage folder above a ``training/`` work folder."""
    out_dir = Path(out_dir)
    return (out_dir.parent.name if out_dir.name == "training" else out_dir.name) or "train"


def train_loop(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset | Sequence,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    collate_fn: Callable[[list], Any] | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` with AdamW for ``cfg.steps`` steps.

    ``loss_fn(model, batch, generator)`` returns a scalar loss or a dict with
    key ``"loss"`` plus scalars to log; take every random draw from
    ``generator`` (seeded per step) so resuming is exact. ``model`` is the
    plain module (not the DDP wrapper): call any of its submodules. Frozen
    submodules (no trainable parameter) run in eval mode. bf16 on a CPU
    without bf16 units runs in float32 (:func:`precision_for_this_machine`).
    Checkpoints go to ``out_dir/checkpoint`` every ``cfg.checkpoint_every``
    steps and at the end; ``on_checkpoint(step, folder)`` then runs on the
    main process. ``stop_after=k`` stops (with a checkpoint) after step k.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = precision_for_this_machine(cfg)
    accelerator = _make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    model.to(accelerator.device)
    # the model goes back to the default layout at the end, the one the saved files and the pipelines use
    channels_last = cfg.channels_last and accelerator.device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # the fused kernel does the same update in one pass over all parameters (about 7% of a small UNet's step on
    # 2 CPU cores); other devices keep the default implementation
    fused = True if accelerator.device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.warmup_steps, cfg.steps, cfg.lr_decay))
    loss_module = _LossModule(model, loss_fn)
    wrapped, optimizer, scheduler = accelerator.prepare(loss_module, optimizer, scheduler)

    # fp32 EMA of the trainable parameters, same names as model.safetensors
    ema = (
        {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        if cfg.ema_decay is not None
        else None
    )

    start, history = 0, []
    if accelerator.is_main_process:
        recover_dir(out_dir / CHECKPOINT_DIR)  # what a killed checkpoint writer left
    accelerator.wait_for_everyone()
    found = _find_checkpoint(out_dir) if resume else None
    if found is not None:
        state = _load_checkpoint(found, model, optimizer, scheduler, ema)
        start, history = int(state["step"]), list(state["history"])
        old = state.get("config", {})
        changed = [k for k in ("batch_size", "grad_accum", "seed", "lr") if k in old and old[k] != getattr(cfg, k)]
        if changed:
            warnings.warn(f"resuming {out_dir} with changed {changed}: the run will not match an uninterrupted one")
    elif not resume and (out_dir / CHECKPOINT_DIR).exists() and accelerator.is_main_process:
        remove_dir(out_dir / CHECKPOINT_DIR)  # a fresh start must not leave a stale checkpoint behind
    accelerator.wait_for_everyone()

    end = max(start, cfg.steps if stop_after is None else min(cfg.steps, stop_after))
    collate = collate_fn or default_collate
    loader = DataLoader(
        dataset,
        batch_sampler=_StepBatchSampler(len(dataset), cfg, start, end, rank, world),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches = iter(loader)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def save(step: int) -> None:
        """Checkpoint and history after ``step`` (main process writes, all wait)."""
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            state = {"step": step, "history": history, "config": asdict(cfg), "num_processes": world}
            folder = _save_checkpoint(out_dir, model, optimizer, scheduler, ema, state)
            (out_dir / HISTORY_NAME).write_text(json.dumps(history, indent=1))
            if on_checkpoint is not None:
                on_checkpoint(step, folder)
        accelerator.wait_for_everyone()

    label = run_label(out_dir)
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=label,
        disable=not progress or not accelerator.is_local_main_process,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,  # a notebook keeps every refresh as an output line
    )
    # a line every few seconds where the run streams its progress (make reproduce); silent otherwise
    reporter = StepReporter(label, cfg.steps, start) if accelerator.is_main_process else None
    wrapped.train()
    _frozen_parts_to_eval(loss_module)
    # CPU bf16 autocast without its slow group-norm and attention kernels (the hooks go even if the loop raises)
    cpu_bf16 = accelerator.device.type == "cpu" and cfg.mixed_precision == "bf16"
    with cpu_bf16_kernels(model) if cpu_bf16 else nullcontext():
        for step in range(start, end):
            generator = torch.Generator(device=accelerator.device).manual_seed(step_seed(cfg.seed, step, rank))
            torch.manual_seed(step_seed(cfg.seed, step, rank, "global"))  # nn.Dropout and friends
            lr = scheduler.get_last_lr()[0]
            losses, extras_sum = [], {}
            for _ in range(cfg.grad_accum):
                batch = send_to_device(next(batches), accelerator.device)
                with accelerator.accumulate(wrapped):
                    loss, extras = _split_loss(wrapped(batch, generator))
                    if not torch.isfinite(loss.detach()).all():
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {step + 1}; lower lr or check the data")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                for k, v in extras.items():
                    extras_sum[k] = extras_sum.get(k, 0.0) + v / cfg.grad_accum
            scheduler.step()
            if ema is not None:
                decay = ema_decay_at(cfg.ema_decay, step)
                with torch.no_grad():
                    for name, p in named:
                        ema[name].lerp_(p.detach().float(), 1.0 - decay)

            logged = {"loss": torch.stack(losses).mean(), **extras_sum}
            if world > 1:
                logged = {k: accelerator.reduce(v.to(accelerator.device), "mean") for k, v in logged.items()}
            history.append({"step": step + 1, "lr": lr, **{k: float(v) for k, v in logged.items()}})
            bar.update(1)
            window = history[-max(1, cfg.log_every) :]
            mean_loss = sum(h["loss"] for h in window) / len(window)
            if (step + 1) % max(1, cfg.log_every) == 0 or step + 1 == end:
                bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            if reporter is not None:
                reporter.update(step + 1, loss=mean_loss)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 != end:
                save(step + 1)
        bar.close()
        if reporter is not None and end > start:
            reporter.close(end, loss=mean_loss)
    if end > start or not (out_dir / CHECKPOINT_DIR).exists():
        save(end)
    del batches, loader
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    if accelerator.device.type != "cpu":
        accelerator.free_memory()  # hand cached accelerator memory back before the next stage
    return TrainResult(out_dir=out_dir, history=history, seconds=time.perf_counter() - t0, steps=end)


# ---------------------------------------------------------------------------
# What the stages read of a run


def mean_tail(history: list[dict[str, float]], n: int = 20) -> float | None:
    """The mean loss of the last ``n`` logged steps (None for an empty history)."""
    tail = [h["loss"] for h in history[-n:]]
    return round(sum(tail) / len(tail), 5) if tail else None
