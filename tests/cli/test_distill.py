"""`leanformer distill` end to end on stories260K: a 3-layer student trained, evaluated on held-out text
(the evaluation text cut out of the training data), saved, reloaded, run; resumed to more steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from leanformer.cli.main import main
from leanformer.engine.generate import generate
from leanformer.loading import load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # ~30 s on a loaded 2-core machine; the resume itself is in tests/train (default run)
def test_distill_stories260k(shared, tmp_path, capsys):
    model = Path(shutil.copytree(shared / "models/stories260K", tmp_path / "stories"))
    data = shared / "data/tinystories/sample.txt"
    out, png = tmp_path / "student", tmp_path / "curve.png"
    eval_text = data.read_text()[:2000]
    (tmp_path / "eval.txt").write_text(eval_text)
    argv = ["distill", str(model), "--student", "layers=0,2,4", "--data", str(data), "--steps", "4",
            "--batch-size", "4", "--seq-len", "64", "--lr", "1e-3", "--eval-data", str(tmp_path / "eval.txt"),
            "--window", "128", "--eval-every", "2", "--checkpoint-every", "2", "-o", str(out), "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "perplexity teacher / student before / after" in printed
    history = json.loads((out / "distill.json").read_text())
    assert [e["step"] for e in history["evals"]] == [0, 2, 4] and len(history["losses"]) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student, tok = load(out)
    assert student.config["num_hidden_layers"] == 3
    assert isinstance(generate(student, tok, "Once upon a time", max_new_tokens=4), str)
    # the same run stopped right after its step-2 checkpoint (Ctrl-C: exit 130), then resumed: same curve
    import leanformer.train.checkpoint as ck

    real_save, out2 = ck.save_checkpoint, tmp_path / "again"

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    argv2 = [str(out2) if a == str(out) else a for a in argv if a not in ("--plot", str(png))]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ck, "save_checkpoint", save_then_stop)
        assert main(argv2) == 130
    assert not out2.exists() and Path(str(out2) + ".ckpt").is_file()
    assert main([*argv2, "--resume"]) == 0, capsys.readouterr().err
    again = json.loads((out2 / "distill.json").read_text())
    assert again["resumed_from"] == 2 and again["losses"] == history["losses"]
    assert [e["step"] for e in again["evals"]] == [0, 2, 4]
