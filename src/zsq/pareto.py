"""The accuracy-size frontier of one recipe (``zsq pareto``, issue 38): uniform ``--w b`` points and mixed
``--wbits-avg b`` points, each quantized by :func:`zsq.api.quantize` and evaluated by :func:`zsq.api.evaluate`.

``DIR/pareto.json`` holds the settings and one entry per finished point (mode, bits or budget, weight bytes,
top-1, top-5, wall seconds); it is rewritten atomically after every point, so an interrupted run resumes with
the same command (finished points are skipped; a ``DIR`` holding a run with other settings is refused).
``DIR/pareto.png`` draws both series, x the quantized model's weight memory, y top-1
(:func:`zsq.report.plot_accuracy_size`). The points share the recipe's cached synthetic set (``ZSQ_CACHE``)
and the mixed points share the cached sensitivities, so only the first point pays for the synthesis.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from torch import nn

from .errors import BadValueError, OutputExistsError
from .paths import write_json_atomic
from .report import PARETO_FORMAT as FORMAT


def parse_list(text: str, flag: str, cast=float) -> list:
    """``2,3,4`` -> numbers (``none`` or empty: no points); a bad item is a one-line error."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        vals = [cast(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BadValueError(f"{flag} takes comma-separated numbers, got '{text}'") from None
    return sorted(set(vals))


def point_id(mode: str, b: float) -> str:
    return f"W{b:g}" if mode == "uniform" else f"Wavg{b:g}-{mode}"


def _load(path: Path, settings: dict) -> list[dict]:
    """The finished points of an earlier run with the same settings (none when there is no file)."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise OutputExistsError(f"{path} exists but is not a pareto.json: choose another -o") from None
    if doc.get("format") != FORMAT or doc.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(doc.get("settings") or {})
                      if (doc.get("settings") or {}).get(k) != settings.get(k))
        raise OutputExistsError(f"{path} holds a pareto run with other settings ({', '.join(diff) or 'format'}): "
                                "choose another -o or repeat that run's settings to resume it")
    return list(doc.get("points", []))


def trace(model: nn.Module, recipe: str, out: Path, *, uniform: list[int], mixed: list[float], a_bits: int,
          eval_path: str, eval_limit: int | None = None, protocol: str | None = None, budget: str = "default",
          seed: int = 0, candidates=(2, 3, 4, 6, 8), sensitivity: str = "kl", mp_images: int = 128,
          settings: dict | None = None, progress: bool = True, device="auto", log=print) -> dict:
    """Run the points not yet in ``out/pareto.json``; returns the document (also written) and draws
    ``out/pareto.png``. ``model`` is copied for each point. ``settings``: what identifies the run
    (model, recipe, protocol, ...), compared with an existing file's before anything runs."""
    from . import api
    from .quant.mixed import MixedConfig

    out = Path(out)
    path = out / "pareto.json"
    settings = dict(settings or {})
    points = _load(path, settings)
    done = {p["id"] for p in points}
    todo = [("uniform", b) for b in uniform] + [(sensitivity, b) for b in mixed]
    cfgs = {b: MixedConfig(wbits_avg=b, candidates=tuple(candidates), sensitivity=sensitivity,
                           n_images=mp_images) for b in mixed}
    for mode, b in todo:
        pid = point_id(mode, b)
        if pid in done:
            log(f"skip {pid} (done)")
            continue
        t0 = time.perf_counter()
        q = api.quantize(copy.deepcopy(model), recipe, int(b) if mode == "uniform" else 4, a_bits,
                         protocol=protocol, budget=budget, seed=seed, progress=progress,
                         mixed=cfgs[b] if mode != "uniform" else None, device=device)
        r = api.evaluate(q, eval_path, limit=eval_limit, progress=progress)
        from .record import record_of

        res = record_of(q).result
        entry = {"id": pid, "mode": "uniform" if mode == "uniform" else "mixed", "w": b if mode != "uniform" else int(b),
                 "a": a_bits, "q_bytes": res["size"]["q_bytes"], "fp_bytes": res["size"]["fp_bytes"],
                 "top1": r["top1"], "top5": r["top5"], "n_eval": r["n"],
                 "wall_s": round(time.perf_counter() - t0, 2), "quantize_wall_s": res["wall_s"]}
        if mode != "uniform":
            m = res["mixed"]
            entry.update(sensitivity=mode, wbits_avg_searched=m["wbits_avg"], layer_bits=m["bits"],
                         search_s=m["search_s"])
        points.append(entry)
        write_json_atomic(path, {"format": FORMAT, "settings": settings, "points": points})
        log(f"done {pid}: {entry['q_bytes']} bytes, top1 {entry['top1']:.2f} ({entry['wall_s']:.1f} s)")
    doc = {"format": FORMAT, "settings": settings, "points": points}
    write_json_atomic(path, doc)
    plot(doc, out / "pareto.png")
    return doc


def plot(doc: dict, png: Path) -> Path:
    """``pareto.png``: the uniform and the mixed points of ``doc`` on one plot (:func:`zsq.report.plot_pareto`,
    which ``zsq report`` draws too)."""
    from .report import plot_pareto

    return plot_pareto(doc, png)
