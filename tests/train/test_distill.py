"""Distillation on tiny random models: exact resume, loss goes down, students save → load, data never
touches the evaluation text, losses and data order behave."""

from __future__ import annotations

import copy

import pytest
import torch

from leanformer.errors import LeanformerError
from leanformer.loading import load, save
from leanformer.train import checkpoint as ck
from leanformer.train.data import batch_indices, read_sentences, token_windows
from leanformer.train.distill import DistillConfig, distill, lr_factor, native_bf16
from leanformer.train.losses import in_batch_contrastive, kl_logits, layer_mapping
from leanformer.train.student import check_pair, keep_layers_, make_student
from tests.conftest import tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher4")
    tiny_hf_model("llama", num_hidden_layers=4).save_pretrained(d)
    return d


@pytest.fixture
def teacher(teacher_dir):
    return load(teacher_dir, fast=False)[0]


def windows(n: int = 24, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


SETTINGS = dict(batch_size=4, seq_len=16, lr=3e-3, warmup=1, grad_accum=2, progress=False)


def test_resume_is_exact(teacher, tmp_path):
    """Stopped after step 3 (a checkpoint), resumed to 6: the same losses and weights as one run of 6."""
    data = windows()
    whole, _ = make_student(teacher, "layers=0,2")
    r_whole = distill(teacher, whole, None, data, 6, checkpoint=tmp_path / "a.ckpt", **SETTINGS)

    stopped, _ = make_student(teacher, "layers=0,2")

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, stopped, None, data, 6, checkpoint=tmp_path / "b.ckpt", checkpoint_every=3, callback=stop, **SETTINGS)  # fmt: skip
    resumed, _ = make_student(teacher, "layers=0,2")  # fresh weights: everything comes from the checkpoint
    r = distill(teacher, resumed, None, data, 6, checkpoint=tmp_path / "b.ckpt", resume=True, **SETTINGS)
    assert r.resumed_from == 3
    assert r.losses == r_whole.losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert r_whole.losses[-1] < r_whole.losses[0]


def test_resume_from_another_run_is_refused(teacher, tmp_path):
    student, _ = make_student(teacher, "layers=0,2")
    distill(teacher, student, None, windows(), 2, checkpoint=tmp_path / "c.ckpt", **SETTINGS)
    other, _ = make_student(teacher, "layers=1,3")  # another student
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(LeanformerError, match="another run"):
        distill(teacher, other, None, windows(), 2, checkpoint=tmp_path / "c.ckpt", resume=True, **SETTINGS)
    with pytest.raises(LeanformerError, match="another run"):  # same student, other learning rate
        distill(teacher, student, None, windows(), 2, checkpoint=tmp_path / "c.ckpt", resume=True, **{**SETTINGS, "lr": 1e-3})  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing trained


def test_distilled_student_saves_and_loads(teacher, tmp_path):
    student, mapping = make_student(teacher, "layers=1,3")
    assert mapping == [1, 3] and len(student.model.layers) == 2 and len(teacher.model.layers) == 4
    distill(teacher, student, None, windows(), 2, hidden=1.0, **{**SETTINGS, "progress": True})
    save(student, None, tmp_path / "s")
    again, _ = load(tmp_path / "s")
    ids = windows(2, 12)
    with torch.inference_mode():
        assert torch.allclose(again(ids), student(ids), atol=1e-4)
    assert again.config["num_hidden_layers"] == 2


def test_student_of_a_fast_loaded_teacher_runs_its_trained_weights(teacher_dir):
    """load()'s default fast Linears keep a packed weight copy: the trained student must not use a stale one."""
    fast_teacher = load(teacher_dir)[0]
    student, _ = make_student(fast_teacher, "layers=0,2")
    distill(fast_teacher, student, None, windows(), 2, **SETTINGS)
    ids = windows(2, 12)
    assert all(type(m) is torch.nn.Linear for m in student.modules() if isinstance(m, torch.nn.Linear))
    save(student, None, teacher_dir.parent / "fast-student")
    again = load(teacher_dir.parent / "fast-student")[
        0
    ]  # fast kernels again, packed from the trained weights
    with torch.inference_mode():
        assert torch.allclose(again(ids), student(ids), atol=1e-4)


def test_pruned_student_from_a_preset(teacher):
    student, mapping = make_student(teacher, "drop=1", calibration=windows(4, 16), progress=False)
    assert len(student.model.layers) == 3 and len(mapping) == 3 and len(set(mapping)) == 3
    r = distill(teacher, student, None, windows(), 2, **SETTINGS)
    assert len(r.losses) == 2 and "held_out_kl" in r.evals[-1]


def test_bad_specs_and_settings(teacher):
    for spec, msg in (("layers=0,9", "out of range"), ("layers=2,1", "increasing"), ("layers=0,1,2,3", "all 4"),
                      ("layers=a", "integers"), ("nonsense", "unknown student spec"), ("drop=x", "integer")):  # fmt: skip
        with pytest.raises(LeanformerError, match=msg):
            make_student(teacher, spec)
    student, _ = make_student(teacher, "layers=0")
    for bad in (
        dict(batch_size=0),
        dict(lr=float("nan")),
        dict(lr=2.0),
        dict(grad_accum=-1),
        dict(clip=float("inf")),
    ):
        with pytest.raises(LeanformerError):
            distill(teacher, student, None, windows(), 2, progress=False, **bad)
    with pytest.raises(LeanformerError, match="at least 2"):
        distill(teacher, student, None, windows(1), 2, progress=False)


def test_vocabulary_mismatch_is_refused(teacher, tmp_path):
    tiny_hf_model("llama", vocab_size=96).save_pretrained(tmp_path / "v96")
    other = load(tmp_path / "v96", fast=False)[0]
    with pytest.raises(LeanformerError, match="vocabulary"):
        check_pair(teacher, other)
    with pytest.raises(LeanformerError, match="vocabulary"):
        distill(teacher, other, None, windows(), 2, progress=False)


class CharTok:
    """One token per character (llama2.c-style encode signature)."""

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) % 128 for c in text]


def test_windows_never_contain_the_evaluation_text():
    ev = "EVALUATION" * 3
    text = "a" * 50 + ev + "b" * 70
    w = token_windows(CharTok(), text, 8, exclude=ev)
    all_ids = torch.cat([w.train.flatten(), w.held_out.flatten()]).tolist()
    assert set(all_ids) <= {ord("a"), ord("b")}  # no window spans the cut either
    assert len(w.train) + len(w.held_out) == 50 // 8 + 70 // 8
    with pytest.raises(LeanformerError, match="too short"):
        token_windows(CharTok(), "a" * 10 + ev, 8, exclude=ev)


def test_sentences_from_tsv_and_lines(tmp_path):
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood film \t1\nbad film\t0\ngood film\t1\n")
    assert read_sentences(tmp_path / "t.tsv") == ["good film", "bad film"]
    (tmp_path / "l.txt").write_text("one\n\n two \n = Heading = \n")
    assert read_sentences(tmp_path / "l.txt") == ["one", "two"]
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(LeanformerError, match="empty"):
        read_sentences(tmp_path / "e.txt")


def test_data_order_is_a_function_of_seed_and_step():
    first_epoch = [i for s in range(5) for i in batch_indices(10, 2, s, seed=3)]
    assert sorted(first_epoch) == list(range(10))  # each example once per epoch
    assert batch_indices(10, 4, 7, 3) == batch_indices(10, 4, 7, 3)
    assert batch_indices(10, 4, 0, 3) != batch_indices(10, 4, 0, 4)


def test_losses_and_schedule():
    x = torch.randn(3, 5, 11)
    assert kl_logits(x, x, 2.0).abs() < 1e-6 and kl_logits(x, x + torch.randn_like(x), 2.0) > 0
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert in_batch_contrastive(e, e, 20.0) < in_batch_contrastive(e, e.roll(1, 0), 20.0)
    assert layer_mapping(3, 6) == [1, 3, 5] and layer_mapping(2, 2) == [0, 1]
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0  # linear warm-up over 2 steps
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and factors[-1] > 0.1  # cosine down to 0.1
    assert isinstance(native_bf16(torch.device("cpu")), bool)
    with pytest.raises(LeanformerError):
        DistillConfig(steps=0).validate()


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = ck.save_checkpoint(tmp_path / "x.ckpt", {"run": "r", "step": 1})
    assert ck.load_checkpoint(path, "r")["step"] == 1

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, {"run": "r", "step": 2})
    monkeypatch.undo()
    assert ck.load_checkpoint(path, "r")["step"] == 1  # the old one intact, no temp files left
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(LeanformerError, match="not a readable"):
        ck.load_checkpoint(tmp_path / "junk.ckpt", "r")


def test_encoder_student(tmp_path):
    from tests.encoders.helpers import tiny_encoder_dir

    folder = tiny_encoder_dir(
        tmp_path / "enc", "BertModel", pooling=["mean"], normalize=True, num_hidden_layers=4
    )
    teacher, tok = load(folder, fast=False)
    student, mapping = make_student(teacher, "layers=0,3")
    assert mapping == [0, 3]
    sentences = [
        f"the {w} movie was {v}"
        for w in ("good", "bad", "fun", "dull")
        for v in ("great", "awful", "not fun")
    ]
    r = distill(
        teacher, student, tok, sentences, 3, batch_size=4, seq_len=16, lr=1e-3, hidden=1.0, progress=False
    )
    assert "held_out_cosine" in r.evals[-1] and all(torch.isfinite(torch.tensor(r.losses)))
    keep_layers_(copy.deepcopy(teacher), [1])
    save(student, tok, tmp_path / "s")
    again, _ = load(tmp_path / "s")
    ids = tok(["the good movie"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(again.embed(ids), student.embed(ids), atol=1e-5)
    with pytest.raises(LeanformerError, match="encoder use layers"):
        make_student(teacher, "ffn-25")
