"""Small helpers shared by every module: device choice, CPU bf16 support, atomic folders."""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch


def pick_device(name: str = "auto") -> torch.device:
    """Resolve "auto" to the best device present (cuda > mps > cpu); other names pass through."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any layout, e.g. (B, 3, H, W)) as uint8 0..255 on the CPU, same layout; uint8 images
    pass through. The one conversion every measure, instrument and figure uses."""
    import torch

    if images.dtype == torch.uint8:
        return images.cpu()
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """True where this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles).

    Elsewhere (AVX2-only x86 such as most laptops, and ARM here) PyTorch emulates bf16: on 2 AVX2 cores a
    convolution's forward and backward under bf16 autocast took 17-20x as long as in float32, a matrix product 65x.
    """
    import torch

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
    ``path`` stays whole until the new one is complete (:func:`_replace_dir`).
    With ``overwrite=False`` an existing ``path`` is kept and the new content
    dropped (first writer wins). On error the temporary folder is removed
    and ``path`` is untouched. What a killed writer of ``path`` left beside it
    is recovered first (:func:`recover_dir`). Folders are created with the
    permissions the umask gives, as ``mkdir`` does.
    """
    path = Path(path)
    recover_dir(path)
    tmp, lock = _new_part_dir(path)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            _replace_dir(tmp, path, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _unlock(lock)


# A writer of ``path`` works in ``.<name>.part-<token>`` (locked while it writes), renames an existing ``path`` to
# ``.<name>.prev-<token>`` while it renames its part in, then deletes that as ``.<name>.trash-<token>``. Folders
# ``.<name>.tmp-*`` and ``.<name>.old-*`` are the same leftovers as earlier versions named them (an old folder with
# no working folder beside it was superseded by a completed rename).
_LEFTOVER = re.compile(r"(?P<kind>part|prev|trash|tmp|old)-(?P<token>[A-Za-z0-9_]+)")


def _sibling(path: Path, kind: str, token: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{token}"


def _lock(folder: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``folder``; None if another process holds it (or where the
    file system has no locks, so that nothing is taken for abandoned)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _new_part_dir(path: Path) -> tuple[Path, int | None]:
    """A new empty working folder beside ``path`` (mode from the umask), locked by this process while it writes.

    It is made and locked under a name that :func:`recover_dir` never touches, then renamed to its working name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        token = secrets.token_hex(6)
        staging = path.parent / f".{path.name}.new-{token}"
        try:
            os.mkdir(staging)
        except FileExistsError:
            continue
        lock = _lock(staging)
        tmp = _sibling(path, "part", token)
        os.replace(staging, tmp)
        return tmp, lock


def _replace_dir(new: Path, path: Path, *, overwrite: bool = True) -> None:
    """Rename the folder ``new`` (made by :func:`atomic_write_dir`) onto ``path``, recoverably.

    An existing ``path`` is renamed aside, ``new`` renamed in, and only then is the old folder deleted: a process
    killed in between leaves both folders whole, and :func:`recover_dir` puts the old one back. With
    ``overwrite=False`` an existing ``path`` is kept and ``new`` deleted.
    """
    if not path.exists():
        try:
            os.replace(new, path)
            return
        except OSError:
            if not path.exists():
                raise
            # another writer created it meanwhile: fall through
    if not overwrite:
        shutil.rmtree(new, ignore_errors=True)
        return
    token = new.name.rsplit("-", 1)[-1]  # the one of its working folder, so that recover_dir pairs the two
    prev = _sibling(path, "prev", token)
    os.replace(path, prev)  # the complete old folder, renamed aside
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(prev, path)
        raise
    trash = _sibling(path, "trash", token)
    with contextlib.suppress(OSError):  # a recovering process may have deleted it already
        os.replace(prev, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Clean up what writers of ``path`` that were killed left beside it.

    A folder renamed aside for a replacement that never came in is put back when ``path`` is missing; unfinished
    working folders and superseded old folders are deleted. The working folder of a writer still running (it holds
    its lock) and its old folder are left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}."
    found: list[tuple[str, str, Path]] = []
    for p in path.parent.iterdir():
        m = _LEFTOVER.fullmatch(p.name[len(prefix):]) if p.name.startswith(prefix) else None
        if m is not None and p.is_dir() and not p.is_symlink():
            found.append((m["kind"], m["token"], p))
    order = {"prev": 0, "old": 1, "part": 2, "tmp": 3, "trash": 4}
    found.sort(key=lambda f: (order[f[0]], -_mtime(f[2])))
    for kind, token, p in found:
        with contextlib.suppress(OSError):  # another process recovering the same folder got there first
            _recover_one(path, kind, token, p)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _recover_one(path: Path, kind: str, token: str, leftover: Path) -> None:
    if kind in ("prev", "part"):
        part = _sibling(path, "part", token)
        lock = _lock(part) if part.exists() else None
        if part.exists() and lock is None:
            return  # its writer is still running
        try:
            if kind == "prev" and part.exists() and not path.exists():
                os.replace(leftover, path)  # killed between its two renames: the old folder goes back
            else:
                shutil.rmtree(leftover)
        finally:
            _unlock(lock)
    elif kind == "old" and not path.exists() and _legacy_parts(path):
        os.replace(leftover, path)  # an earlier version was killed between its two renames (its new folder is left)
    else:
        shutil.rmtree(leftover)


def _legacy_parts(path: Path) -> list[Path]:
    """Working folders that an earlier version's writers of ``path`` left (``.<name>.tmp-*``)."""
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*") if p.is_dir()]


def remove_dir(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` and the leftovers of its killed writers (so that no old copy is put back later)."""
    path = Path(path)
    recover_dir(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # other processes may be deleting it too
        if path.exists():
            shutil.rmtree(path)  # what could not be deleted, with its error


def new_file_mode(folder: str | os.PathLike) -> int:
    """The permission bits a new file gets in ``folder`` (the umask applied), found by creating one."""
    probe = Path(folder) / f".mode-probe-{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save a safetensors file with the permissions of any new file (safetensors itself makes it private, 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, new_file_mode(Path(path).parent))


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

    with atomic_write_dir(cache_dir) as tmp:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a bad command line in one line (no usage block) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers of at least ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


def finite_numbers(value: Any, n: int, name: str) -> list[float]:
    """``value`` (a sequence or tensor) as ``n`` finite floats, or a ValueError naming the setting ``name``."""
    try:
        vals = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(vals) != n:
        raise ValueError(f"{name} must be {n} numbers, got {len(vals)}: {value!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite numbers, got {value!r}")
    return vals
