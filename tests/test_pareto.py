"""``zsq pareto`` (issue 38 item 4): uniform and mixed points, pareto.json / pareto.png, resume, bad input."""

from __future__ import annotations

import json

import pytest

from conftest import CIFAR_TEST


def _zsq(capsys, *args) -> tuple[int, str]:
    from zsq.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


ARGS = ("pareto", "cifar10_resnet20", "--recipe", "squant", "--bits", "3,4", "--wbits-avg-list", "3",
        "--mp-bits", "2,3,4", "--mp-images", "16", "--eval-data", str(CIFAR_TEST), "--eval-limit", "64", "-q")


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs the JPEG-CIFAR-10 test set")
def test_pareto_points_plot_and_resume(tmp_path, capsys, one_thread):
    out = tmp_path / "P"
    rc, text = _zsq(capsys, *ARGS, "-o", str(out))
    assert rc == 0, text
    doc = json.loads((out / "pareto.json").read_text())
    pts = {p["id"]: p for p in doc["points"]}
    assert set(pts) == {"W3", "W4", "Wavg3-kl"}
    assert doc["settings"]["protocol"] == "fixed" and doc["settings"]["recipe"] == "squant"
    for p in pts.values():
        assert 0 <= p["top1"] <= p["top5"] <= 100 and p["n_eval"] == 60 and p["wall_s"] > 0
    mixed, w3, w4 = pts["Wavg3-kl"], pts["W3"], pts["W4"]
    assert mixed["mode"] == "mixed" and w3["mode"] == "uniform"
    # the budget: a mean of 3 weight bits never takes more memory than uniform W3 (same scales, same FP rest)
    assert mixed["q_bytes"] <= w3["q_bytes"] < w4["q_bytes"]
    assert mixed["wbits_avg_searched"] <= 3 and set(mixed["layer_bits"].values()) <= {2, 3, 4}
    assert (out / "pareto.png").stat().st_size > 1000
    # zsq report on the pareto directory: its frontier and every point
    rc, text = _zsq(capsys, "report", str(out))
    assert rc == 0, text
    md = (out / "report" / "report.md").read_text()
    assert "](pareto.png)" in md and all(f"| {pid} |" in md for pid in pts)
    # a rerun skips every finished point (nothing recomputed: the file is unchanged)
    before = (out / "pareto.json").read_text()
    rc, text = _zsq(capsys, *ARGS, "-o", str(out))
    assert rc == 0, text
    assert text.count("skip") == 3 and "done " not in text
    assert (out / "pareto.json").read_text() == before
    # other settings in the same folder: refused, not mixed into the old points
    rc, text = _zsq(capsys, *ARGS, "--seed", "1", "-o", str(out))
    assert rc == 2 and "other settings (seed)" in text and "Traceback" not in text


@pytest.mark.parametrize("extra, words", [
    (("--bits", "3"), "--eval-data PATH"),  # no eval data
    (("--bits", "9", "--eval-data", "X"), "--bits"),
    (("--bits", "3,x", "--eval-data", "X"), "comma-separated"),
    (("--bits", "none", "--wbits-avg-list", "none", "--eval-data", "X"), "no points"),
    (("--wbits-avg-list", "1.5", "--eval-data", "X"), "smallest candidate"),
    (("--bits", "3", "--eval-data", "/nonexistent/set"), "does not exist"),
    (("--bits", "3", "--eval-data", str(CIFAR_TEST), "--recipe", "nope"), "nope"),
])
def test_pareto_bad_input(tmp_path, capsys, extra, words):
    args = ["pareto", "cifar10_resnet20", "--recipe", "squant", "-o", str(tmp_path / "P"), *extra]
    rc, text = _zsq(capsys, *args)
    assert rc == 2, text
    assert words in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "P" / "pareto.json").exists()
