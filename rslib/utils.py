"""Small helpers shared by every module: device choice, CPU bf16 support, atomic folders."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """Resolve "auto" to the best device present (cuda > mps > cpu); other names pass through."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """True where this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles).

    Elsewhere (AVX2-only x86 such as most laptops, and ARM here) PyTorch emulates bf16: on 2 AVX2 cores a
    convolution's forward and backward under bf16 autocast took 17-20x as long as in float32, a matrix product 65x.
    """
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # private probes: absent in some builds
        check = getattr(torch.cpu, name, None)
        with contextlib.suppress(RuntimeError):
            if check is not None and check():
                return True
    return False


@contextlib.contextmanager
def atomic_write_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only if the block succeeds.

    On success the temporary folder is renamed onto ``path``; an existing
    ``path`` stays whole until the new one is complete (it is moved aside,
    the new folder renamed in, then the old one deleted). With
    ``overwrite=False`` an existing ``path`` is kept and the new content
    dropped (first writer wins). On error the temporary folder is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        try:
            os.replace(tmp, path)
            return
        except OSError:
            if not path.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # another writer created it meanwhile: fall through
    if not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.replace(path, old)  # the complete old folder, renamed aside
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_tensor_cache(cache_dir: str | os.PathLike, stamp: dict) -> dict[str, torch.Tensor] | None:
    """The tensors :func:`write_tensor_cache` saved in ``cache_dir`` if they were saved with ``stamp``, else None."""
    import json

    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    stamp_file, data_file = cache_dir / "stamp.json", cache_dir / "tensors.safetensors"
    if not (stamp_file.is_file() and data_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        return None
    return load_file(str(data_file))


def write_tensor_cache(cache_dir: str | os.PathLike, stamp: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` with ``stamp`` in ``cache_dir``, atomically (a reader never sees half a cache)."""
    import json

    from safetensors.torch import save_file

    with atomic_write_dir(cache_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))
