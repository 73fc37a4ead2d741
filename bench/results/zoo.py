"""``bench/zoo_fp.py``: the full-precision top-1 / top-5 of the ImageNet zoo models on the ImageNet sample."""

from __future__ import annotations

from pathlib import Path

from .common import load_runs


def zoo_fp_section(d: Path) -> list[str]:
    recs = load_runs(d)
    if not recs:
        return []
    out = ["## Zoo models at full precision (`bench/zoo_fp.py`)", "",
           "`zsq eval MODEL` on `imagenet-sample/val256.tar` (1,000 ImageNet validation images, one per class: "
           "one image is 0.1 point), each model with its zoo preprocessing (TF EfficientNet's eval crop: the "
           "short side resized to resolution + 32 with bicubic, a centre crop of the resolution, pixels to "
           "[-1, 1]). The val256 images were stored with a 256 px short side, so Lite2's 292 px resize "
           "enlarges them. Wall time includes decoding (default loader workers: one on this 2-core machine); the "
           "machine was shared with other jobs (load: its 1-minute average at the start).", "",
           "| model | resize / crop | top-1 | top-5 | images | wall s | threads | CPU | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        pre = r["preprocess"]
        out.append(f"| {r['model']} | {pre['resize']} / {pre['crop']} {pre['interpolation']} | {r['top1']:.2f} | "
                   f"{r['top5']:.2f} | {r['n']} | {r['wall_s']} | {r['threads']} | {r['cpu']} ({r['cores']} cores) | "
                   f"{r['load_avg']} |")
    return out + [""]
