"""`zsq report OUT`: markdown + HTML + PNGs of a real quantized output."""

from __future__ import annotations

import json
import re

from PIL import Image

import zsq
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
