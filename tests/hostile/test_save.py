"""lf.save never destroys what it did not write (issue #10): what it refuses, what overwrite=True
replaces, atomic replacement of an earlier save (and the old one back when that fails), umask modes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import leanformer as lf
from leanformer.outputs import check_output_dir, is_leanformer_save
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama").save_pretrained(d)
    return lf.load(d, fast=False)[0]


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def _unrelated(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_refuses_a_non_empty_folder_that_is_not_a_save(model, tmp_path):
    out = _unrelated(tmp_path / "mine")
    with pytest.raises(lf.LeanformerError) as e:
        lf.save(model, None, out)
    assert "--overwrite" in _one_line(e) and "overwrite=True" in str(e.value)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left behind


def test_hf_folder_and_half_saves_are_not_leanformer_saves(model, tmp_path):
    hf = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(hf)
    assert not is_leanformer_save(hf)
    with pytest.raises(lf.LeanformerError, match="not a leanformer save"):
        lf.save(model, None, hf)
    fake = lf.save(model, None, tmp_path / "fake")
    (fake / "model.safetensors").write_bytes(b"not safetensors")  # config.json alone does not count
    assert not is_leanformer_save(fake)
    config = json.loads((fake / "config.json").read_text())
    config.pop("leanformer")
    real = lf.save(model, None, tmp_path / "real")
    (real / "config.json").write_text(json.dumps(config))  # producer metadata alone does not count
    assert not is_leanformer_save(real)


def test_overwrite_replaces_an_unrelated_folder(model, tmp_path):
    out = _unrelated(tmp_path / "mine")
    lf.save(model, None, out, overwrite=True)
    assert not (out / "thesis.tex").exists() and is_leanformer_save(out)


def test_empty_or_absent_folder_is_fine(model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert is_leanformer_save(lf.save(model, None, tmp_path / "empty"))
    assert is_leanformer_save(lf.save(model, None, tmp_path / "a" / "b" / "c"))


def test_an_earlier_save_is_replaced_atomically(model, tmp_path):
    out = lf.save(model, None, tmp_path / "s")
    (out / "stale.txt").write_text("from the first save")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.norm.weight.fill_(3.0)
    lf.save(changed, None, out)  # no overwrite needed: it is our own earlier save
    assert not (out / "stale.txt").exists()
    assert torch.equal(lf.load(out, fast=False)[0].model.norm.weight, changed.model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # old copy and temp folder removed


def test_failed_rename_puts_the_old_save_back(model, tmp_path, monkeypatch):
    out = lf.save(model, None, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and ".old-" not in self.name:  # the new folder moving in
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(lf.LeanformerError, match="cannot save") as e:
        lf.save(model, None, out)
    _one_line(e)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failure_while_writing_keeps_the_old_save(model, tmp_path, monkeypatch):
    out = lf.save(model, None, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("leanformer.formats.safetensors_io.write_safetensors", broken)
    with pytest.raises(lf.LeanformerError, match="cannot save"):
        lf.save(model, None, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_file_or_symlink_is_refused_even_with_overwrite(model, tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(lf.LeanformerError, match="not a folder"):
        lf.save(model, None, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "data"
    target = _unrelated(tmp_path / "target")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(lf.LeanformerError, match="symbolic link"):
        lf.save(model, None, tmp_path / "link", overwrite=True)
    assert (target / "thesis.tex").exists()


def test_cwd_its_parents_home_and_root_are_refused_even_with_overwrite(model, tmp_path, monkeypatch):
    work = _unrelated(tmp_path / "parent" / "work")
    monkeypatch.chdir(work)
    for out in (".", work, "..", tmp_path / "parent"):
        with pytest.raises(lf.LeanformerError, match="current folder"):
            lf.save(model, None, out, overwrite=True)
    home = _unrelated(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(lf.LeanformerError, match="home folder"):
        lf.save(model, None, "~", overwrite=True)
    with pytest.raises(lf.LeanformerError, match="root"):
        lf.save(model, None, "/", overwrite=True)
    assert (work / "thesis.tex").exists() and (home / "thesis.tex").exists()


def test_never_over_the_folder_the_model_was_loaded_from(model, tmp_path):
    saved = lf.save(model, None, tmp_path / "models" / "s")
    again = lf.load(saved, fast=False)[0]
    for out in (saved, tmp_path / "models"):
        with pytest.raises(lf.LeanformerError, match="input model's folder"):
            lf.save(again, None, out, overwrite=True)
    assert is_leanformer_save(saved)
    lf.save(again, None, tmp_path / "models" / "copy")  # beside it is fine


def test_input_model_folder_and_its_parents_are_refused(tmp_path):
    model_dir = _unrelated(tmp_path / "models" / "m")
    for out in (model_dir, tmp_path / "models"):
        with pytest.raises(lf.LeanformerError, match="input model's folder"):
            check_output_dir(out, overwrite=True, inputs=[model_dir / "thesis.tex"])
    check_output_dir(tmp_path / "models" / "other", inputs=[model_dir])  # a sibling is fine


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("where", ["/proc/leanformer-x", "/dev/null/x"])
def test_unwritable_places_fail_before_anything_is_written(model, where):
    with pytest.raises(lf.LeanformerError, match="cannot write") as e:
        lf.save(model, None, where)
    _one_line(e)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_modes_follow_the_umask(model, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = lf.save(model, None, tmp_path / "s")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name


@pytest.mark.parametrize("split", ["tp", "pp"])
def test_a_model_split_across_processes_is_refused(model, tmp_path, monkeypatch, split):
    """After parallelize_ / pipeline_ a process holds one shard: saving it would write a broken model."""
    monkeypatch.setattr(model, split, (0, 2), raising=False)
    with pytest.raises(lf.LeanformerError, match="split across processes"):
        lf.save(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
