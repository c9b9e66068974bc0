"""Where leanformer writes: checks made before any long work, and folder replacement that loses nothing.

A folder output (lf.save, `compress -o`, `prune-heads --output`, `train-probe --output`, `export OUT`)
may be absent, empty, or an earlier output of the same kind (`ours`: a leanformer save, an ONNX export),
which is replaced atomically. Any other non-empty folder needs overwrite=True / --overwrite. Never, even
with overwrite: a path that is a file (or anything but a folder), a symlink, the filesystem root, the home
or current folder or any folder above them, the input model's folder or any folder above it. These are
checked first, and the nearest existing parent must let us create entries (tried, not guessed: root may
pass os.access where /proc still refuses), so a bad path fails in a second, not after a long compression.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from leanformer.errors import LeanformerError

OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python) to replace it"


def is_leanformer_save(path: str | os.PathLike) -> bool:
    """A folder `lf.save` wrote: config.json with a "leanformer" key, model.safetensors by producer=leanformer."""
    from leanformer.formats.safetensors_io import read_safetensors_metadata

    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        meta = read_safetensors_metadata(p / "model.safetensors")
    except (OSError, ValueError):  # absent, unreadable, not JSON, not safetensors (all ValueErrors)
        return False
    return isinstance(config, dict) and "leanformer" in config and meta.get("producer") == "leanformer"


def _is_empty_dir(p: Path) -> bool:
    try:
        with os.scandir(p) as entries:
            return next(entries, None) is None
    except OSError as e:
        raise LeanformerError(f"cannot read output folder {p} ({e.strerror})") from None


def _refuse_protected(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Replacing `out` must never take the cwd, home, root or an input model with it."""
    real = out.resolve()
    if real.parent == real:
        raise LeanformerError(f"refusing to write over the filesystem root ({out})")
    for name, folder in (("current folder", Path.cwd()), ("home folder", Path.home())):
        folder = folder.resolve()
        if folder == real or folder.is_relative_to(real):
            raise LeanformerError(f"refusing to write over {out}: it is (or contains) the {name}")
    for given in inputs:
        p = Path(given).expanduser().resolve()
        folder = p if p.is_dir() else p.parent
        if folder == real or folder.is_relative_to(real):
            raise LeanformerError(
                f"refusing to write over {out}: it is (or contains) the input model's folder {folder}"
            )


def _check_can_create_in(out: Path) -> None:
    """The nearest existing folder above `out` must let us create entries: try it."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LeanformerError(f"cannot write {out}: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".leanformer-probe-", dir=parent))
    except OSError as e:
        raise LeanformerError(
            f"cannot write {out}: cannot create anything in {parent} ({e.strerror})"
        ) from None


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    ours: Callable[[Path], bool] = is_leanformer_save,
    kind: str = "leanformer save",
) -> Path:
    """The folder to write, after the rules in the module docstring; raises a one-line LeanformerError."""
    out = Path(path).expanduser()
    if out.is_symlink():
        raise LeanformerError(f"output {out} is a symbolic link; give the real folder it points to")
    if out.exists() and not out.is_dir():
        raise LeanformerError(f"output {out} exists and is not a folder; give a folder path")
    _refuse_protected(out, inputs)
    if out.exists() and not overwrite and not _is_empty_dir(out) and not ours(out):
        raise LeanformerError(f"output folder {out} is not empty and is not a {kind}; {OVERWRITE_HINT}")
    _check_can_create_in(out)
    return out


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """A file we are about to write (reports, embeddings): its folder exists and takes new files; an
    existing file is replaced, unless it is an input model's file (or a file inside its folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise LeanformerError(f"output {p} is a folder; give a file path")
    if p.exists():  # a file, or a device such as /dev/stdout
        real = p.resolve()
        for given in inputs:
            i = Path(given).expanduser().resolve()
            if real == i or real.is_relative_to(i):
                raise LeanformerError(f"refusing to overwrite {p}: it is part of the input model {i}")
        if not os.access(p, os.W_OK):
            raise LeanformerError(f"cannot write {p}: permission denied")
        return p
    if not p.parent.is_dir():
        raise LeanformerError(f"cannot write {p}: {p.parent} is not an existing folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".leanformer-probe-", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LeanformerError(f"cannot write {p}: cannot create files in {p.parent} ({e.strerror})") from None
    return p


def write_file_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes the given temp path) to `path` through a
    temp file in the same folder and a rename: a reader never sees half a file, a failure leaves the
    old one."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_file():  # /dev/stdout and the like: nothing to rename over
        if callable(data):
            data(p)
        else:
            p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if callable(data):
            data(Path(tmp))
        else:
            Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without the set-and-restore race of os.umask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp_dir(out: Path) -> Path:
    """An empty hidden folder beside `out`: the same filesystem, so the final rename is atomic. It is
    0700 (mkdtemp) until replace_dir gives it the umask's modes, so no one sees it half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def umask_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir / open would: some writers (mkdtemp,
    safetensors' save_file) create 0700 / 0600, which would leave a saved model readable by us alone."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out` (its modes set from the umask first). An existing `out` is
    renamed aside first and renamed back if `new` cannot be moved in, so a complete version is always
    there (apart from the instant between the two renames); only then is the old one removed."""
    umask_permissions(new)
    if not out.exists():
        new.rename(out)
        return
    aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    out.rename(aside)
    try:
        new.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        warnings.warn(f"could not fully remove the previous version, left at {aside}", stacklevel=2)
