"""`leanformer bench --speculative` and `leanformer generate --speculative` on stories260K: the table
names every method with its acceptance and says the output matched plain decoding; bad values are
one-line errors before any model loads."""

from __future__ import annotations

import json

import pytest

from leanformer.cli.main import main
from leanformer.measure.bench import speculative as sb

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_speculative_reports_acceptance_and_identity(shared, tmp_path, capsys, monkeypatch):
    from leanformer.engine import speculative

    # the model drafting for itself costs a whole step per draft, so DraftPolicy would never run it
    # (a draft that cannot pay): priced as free here, it drafts, and every draft must be accepted
    monkeypatch.setattr(speculative, "draft_cost", lambda model, draft: 0.0)
    model = shared / "models" / "stories260K"
    passages = tmp_path / "p.txt"
    story = "Once upon a time there was a little girl named Lily who loved her red ball very much. " * 4
    passages.write_text(f"short line\r\n{story}\r\n", encoding="utf-8")  # CRLF, like wikitext's raw files
    out = tmp_path / "spec.json"
    args = ["bench", str(model), "--speculative", "prompt-lookup", f"draft:{model}", "--new-tokens", "40"]
    args += ["--repeats", "1", "--prompts", "1", "--passages", str(passages), "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "input-grounded" in printed and "open-ended" in printed and "acceptance" in printed
    rows = json.loads(out.read_text())["results"]
    assert {(r["workload"], r["method"]) for r in rows} == {
        (w, m)
        for w in ("input-grounded", "open-ended")
        for m in ("plain", "prompt-lookup", "draft stories260K")
    }
    assert all(r["identical"] for r in rows)  # greedy speculative output == plain output, every prompt
    grounded = {r["method"]: r for r in rows if r["workload"] == "input-grounded"}
    assert grounded["draft stories260K"]["acceptance"] == 1.0  # the model drafting for itself
    # tokens per step are not asserted: a draft as large as the target never pays, and the cost model
    # may rightly choose plain steps for it (timing-dependent)


def test_passages_reads_paragraphs_and_refuses_missing(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(" = Title = \r\n" + "A @-@ B , 1 @,@ 000 words. " * 20 + "\r\n", encoding="utf-8")
    (para,) = sb.passages(str(f), 1)
    assert "A-B" in para and "1,000" in para and "\r" not in para
    with pytest.raises(sb.LeanformerError):
        sb.passages(str(tmp_path / "missing.txt"), 1)


@pytest.mark.parametrize("value", ["lookup", "draft:"])
def test_bad_speculative_value_is_one_line_error(value, capsys):
    assert main(["generate", "/no/such/model", "--prompt", "hi", "--speculative", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "--speculative" in err and "\n" not in err


def test_generate_cli_speculative_equals_plain(shared, capsys):
    model = str(shared / "models" / "stories260K")
    common = ["generate", model, "--prompt", "Lily had a red ball. Lily had a", "--max-new-tokens", "40"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--speculative", "prompt-lookup"]) == 0
    assert capsys.readouterr().out == plain
