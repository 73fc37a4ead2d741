"""`zsq report OUT`: markdown + HTML + PNGs of a real quantized output."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import zsq
from zsq.record import record_of
from zsq.report import write_report


def _bench_record(recipe, w, a, top1):
    return {"run": {"model": "cifar10_resnet20", "recipe": recipe, "protocol": "ptq", "w": w, "a": a,
                    "budget": "default", "seed": 0, "calib": None, "extra": []},
            "zsq": {"metrics": {"top1": top1}}}


def test_report_writes_legible_figures(resnet20, tmp_path):
    q = zsq.quantize(resnet20, "zeroq", 4, 4, protocol="ptq", budget="smoke", progress=False)
    out = tmp_path / "out"
    zsq.save(q, out)
    bench = tmp_path / "runs"
    bench.mkdir()
    for i, (w, a, t) in enumerate([(8, 8, 81.0), (4, 8, 80.0), (4, 4, 77.0)]):
        (bench / f"r{i}.json").write_text(json.dumps(_bench_record("zeroq", w, a, t)))
    md = write_report(out, bench)
    d = out / "report"
    assert md == d / "report.md" and (d / "index.html").is_file()
    text = md.read_text()
    for png in ("synthetic.png", "loss.png", "sqnr.png", "accuracy.png"):
        assert f"]({png})" in text and png in (d / "index.html").read_text()
        with Image.open(d / png) as im:
            assert im.size[0] >= 400 and im.size[1] >= 250, (png, im.size)
            assert len(im.convert("L").getcolors(1 << 16) or []) > 20, png  # not a blank canvas
    # 8-bit first/last layers have far cleaner weights than the 4-bit ones (ptq protocol)
    rows = dict(re.findall(r"^\| (\S+) \| \d+ \| ([\d.]+) \| [\d.]+ \|$", text, re.M))
    assert float(rows["conv1"]) > float(rows["layer1.0.conv1"]) + 15
    assert re.search(r"^\| logits \| -?[\d.]+ \|$", text, re.M)
    assert not list(out.glob(".report-*")), "temporary report directory left behind"


def test_report_measures_learnt_weights_against_the_fp_model(resnet20, tmp_path):
    """SQuant stores weights that already lie on their grid: compared with themselves every layer was
    ``inf`` and the plot empty. Against the FP model (BN folded as the protocol does) every layer has a
    finite SQNR, SQuant's flipped roundings lose to round-to-nearest, and layers.csv holds the numbers."""
    import csv
    import math
    import warnings

    import numpy as np
    import torch
    from conftest import CIFAR_TEST

    from zsq.quant.modules import QUANT_LAYERS

    q = zsq.quantize(resnet20, "squant", 4, 4, progress=False)
    out = tmp_path / "sq"
    zsq.save(q, out, metrics={"top1": 79.1, "top5": 98.9, "n": 1000}, eval_path=str(CIFAR_TEST))
    bench = tmp_path / "runs"
    bench.mkdir()
    for i, (w, a, t) in enumerate([(8, 8, 91.0), (4, 8, 88.0), (4, 4, 85.0)]):
        rec = _bench_record("genie", w, a, t)
        rec["run"]["protocol"] = record_of(q).result["protocol"]
        (bench / f"r{i}.json").write_text(json.dumps(rec))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # matplotlib warned on the infinite bars
        md = write_report(out, bench)
    with open(out / "report" / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)]
    near = {r["layer"]: float(r["w_sqnr_nearest_db"]) for r in rows}
    saved = {r["layer"]: float(r["w_sqnr_saved_db"]) for r in rows}
    assert all(math.isfinite(v) for v in [*near.values(), *saved.values()]), rows
    assert {r["bits"] for r in rows} == {"4", "8"}
    for r in rows:  # 4-bit weights: roughly 6 dB per bit; the 8-bit first / last layers far cleaner
        assert (10 < saved[r["layer"]] < 30) if r["bits"] == "4" else saved[r["layer"]] > 40, r
    # nearest rounding is the closest point of the same grid: SQuant's flips can only cost SQNR, and do
    assert all(near[k] >= saved[k] - 1e-6 for k in near) and sum(near[k] > saved[k] + 0.1 for k in near) >= 10
    # the reference is the FP conv with its BN folded in, by hand here
    conv, bn = resnet20.conv1, resnet20.bn1
    w_fp = conv.weight.detach() * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    wq = q.conv1.qweight().detach()
    by_hand = 10 * math.log10(float(w_fp.double().pow(2).sum() / (w_fp - wq).double().pow(2).sum()))
    assert saved["conv1"] == pytest.approx(by_hand, abs=1e-3)
    text = md.read_text()
    assert re.search(rf"^\| layer1\.0\.conv1 \| 4 \| {near['layer1.0.conv1']:.2f} \| {saved['layer1.0.conv1']:.2f} \|$",
                     text, re.M)
    assert "layers.csv" in text and "layers.csv" in (out / "report" / "index.html").read_text()
    # the top-1 came from a 1,000-image --eval-limit subset of the 10,000 CIFAR-10 test images: said so
    assert "1,000 of the 10,000 images" in text and "--eval-limit" in text
    assert "--eval-limit" in (out / "report" / "index.html").read_text()
    # this run is marked on accuracy.png (a crimson star) and named in its caption
    assert re.search(r"\]\(accuracy\.png\)", text) and "the star is this run (W4A4, top-1 79.1" in text
    with Image.open(out / "report" / "accuracy.png") as im:
        px = torch.from_numpy(np.array(im.convert("RGB"))).int()
        r, g, b = px.unbind(-1)
        assert int(((r > 190) & (g < 60) & (b > 30) & (b < 100)).sum()) > 50  # the star
    # the same top-1 on the whole test set carries no subset note
    zsq.save(q, out, metrics={"top1": 79.1, "top5": 98.9, "n": 10000}, eval_path=str(CIFAR_TEST))
    text = write_report(out).read_text()
    assert "--eval-limit" not in text and "79.1 / 98.9 on 10,000 images" in text


def test_report_keeps_the_umask_and_a_refused_write_is_one_line(resnet20, tmp_path, monkeypatch):
    """OUT/report gets the mode mkdir would give it (mkdtemp made it 0700); a write the file system
    refuses (here: a full disk while writing layers.csv) is one OutputError naming OUT/report, and no
    OUT/report or temporary directory is left."""
    import errno
    import os

    import zsq.report as report
    from zsq.errors import OutputError

    q = zsq.quantize(resnet20, "squant", 4, 4, progress=False)
    out = tmp_path / "sq"
    zsq.save(q, out)
    old = os.umask(0o022)
    try:
        write_report(out)
        assert (out / "report").stat().st_mode & 0o777 == 0o755
        os.umask(0o027)
        write_report(out)
        assert (out / "report").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)

    def full(rows, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "_layers_csv", full)
    import shutil

    shutil.rmtree(out / "report")
    with pytest.raises(OutputError, match="report") as e:
        write_report(out)
    assert "\n" not in str(e.value)
    assert not (out / "report").exists() and not list(out.glob(".report-*"))


def _pareto_doc():
    pts = [{"id": "W2", "mode": "uniform", "w": 2, "a": 8, "q_bytes": 80_000, "top1": 20.0, "top5": 60.0, "n_eval": 64},
           {"id": "W4", "mode": "uniform", "w": 4, "a": 8, "q_bytes": 150_000, "top1": 78.0, "top5": 98.0, "n_eval": 64},
           {"id": "Wavg3-kl", "mode": "mixed", "sensitivity": "kl", "w": 3, "a": 8, "q_bytes": 110_000, "top1": 75.5,
            "top5": 97.0, "n_eval": 64}]
    return {"format": "zsq-pareto-1", "points": pts,
            "settings": {"model": "cifar10_resnet20", "recipe": "squant", "protocol": "fixed", "a": 8, "seed": 0,
                         "eval_data": "test.tar"}}


def test_report_draws_the_pareto_frontier(tmp_path, capsys, one_thread):
    """zsq report embeds pareto.png when OUT holds a pareto.json (or --pareto DIR names one), drawn by
    zsq.pareto.plot; a pareto directory alone gets a frontier report; a bad --pareto is one line, exit 2."""
    from zsq.cli import main

    q = zsq.quantize("cifar10_resnet20", "squant", 4, 8, budget="smoke", progress=False)
    out = tmp_path / "out"
    zsq.save(q, out)
    pdir = tmp_path / "P"
    pdir.mkdir()
    (pdir / "pareto.json").write_text(json.dumps(_pareto_doc()))
    text = write_report(out, pareto=pdir).read_text()
    assert "](pareto.png)" in text and "| Wavg3-kl | mixed | 110,000 | 75.50 | 97.00 |" in text
    assert "pareto.png" in (out / "report" / "index.html").read_text()
    with Image.open(out / "report" / "pareto.png") as im:
        assert im.size[0] >= 400 and len(im.convert("L").getcolors(1 << 16) or []) > 20
    (out / "pareto.json").write_text(json.dumps(_pareto_doc()))  # OUT's own pareto.json: drawn without --pareto
    assert "](pareto.png)" in write_report(out).read_text()

    def zsq_cli(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        o = capsys.readouterr()
        return e.value.code, o.out + o.err

    rc, msg = zsq_cli("report", str(pdir))  # the pareto directory alone
    assert rc == 0, msg
    md = (pdir / "report" / "report.md").read_text()
    assert "](pareto.png)" in md and "| W2 | uniform | 80,000 | 20.00 | 60.00 |" in md
    assert (pdir / "report" / "pareto.png").stat().st_size > 0 and "pareto.png" in (pdir / "report" / "index.html").read_text()
    rc, msg = zsq_cli("report", str(out), "--pareto", str(tmp_path / "missing"))
    assert rc == 2 and "--pareto" in msg and "Traceback" not in msg and len(msg.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pareto.json").write_text("{}")
    rc, msg = zsq_cli("report", str(out), "--pareto", str(tmp_path / "bad"))
    assert rc == 2 and "not a zsq pareto.json" in msg and "Traceback" not in msg
