"""What every section of docs/results.md shares: reading the runs' JSON, formatting a cell, the runs a target
counts (default budget, synthetic data, the whole eval set) and their top-1 per seed."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from zsq.bench.runner import run_wall_s

#: the checkout these scripts belong to: docs/results.md names its files relative to it
CHECKOUT = Path(__file__).resolve().parents[2]


def shown_path(p: Path) -> str:
    """``p`` as docs/results.md names it: relative to the checkout when inside it, else as given."""
    try:
        return p.resolve().relative_to(CHECKOUT).as_posix()
    except ValueError:
        return p.as_posix()


def load_runs(runs_dir: Path) -> list[dict]:
    """Every ``*.json`` directly in ``runs_dir`` (none when it does not exist), sorted by file name."""
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def wall_cell(rec: dict):
    """The wall-seconds cell of a run: zsq's own, or for a resumed run the total with the attempt count."""
    res = rec.get("resumed")
    if not res:
        return rec["zsq"].get("wall_s")
    return f"{run_wall_s(rec):.1f} (resumed, {res['attempts'] + 1} attempts)"


def fmt(vals: list[float]) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def fmt_seeds(vals: list[float]) -> str:
    """A target's statistic over its seeds: mean ± std, the count, min and max (one seed: its value)."""
    if len(vals) < 2:
        return fmt(vals)
    return (f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} "
            f"(n={len(vals)}, min {min(vals):.2f}, max {max(vals):.2f})")


def run_label(run: dict, long: bool = False) -> str:
    """Row label: the recipe (or calib-real), plus any extra CLI flags of the run (``--pre dfq``)."""
    label = f"calib-real ({run['recipe']} quantizer)" if run.get("calib") else run["recipe"]
    if run.get("calib") and long:
        label = f"calib-real ({run['recipe']} quantizer, {run['calib_n']} real train images)"
    if run.get("extra"):
        label += " " + " ".join(run["extra"])
    return label


#: images in the whole of each eval set: a target counts only runs evaluated on all of their set
FULL_EVAL = {"cifar10-jpeg/test.tar": 10_000, "imagenet-sample/val256.tar": 1_000}


def full_eval(rec: dict) -> bool:
    """Whether a run was evaluated on the whole of its eval set (``FULL_EVAL``; no ``--eval-limit``)."""
    run = rec["run"]
    want = FULL_EVAL.get(run.get("eval", "cifar10-jpeg/test.tar"))
    return not run.get("eval_limit") and want is not None and rec["zsq"].get("n_eval") == want


def target_runs(recs: list[dict], model: str | None, recipes: tuple | None, proto: str | None, bits: str | None,
                 extra: tuple = ()) -> list[dict]:
    """The runs a target counts: default budget, synthetic data (no real calibration), exactly the extra CLI
    flags ``extra`` (none by default), evaluated on the whole eval set (:func:`full_eval`). ``model`` ending
    in ``*`` is a name prefix; ``None`` for the model, recipes, protocol or bits: any."""
    def model_ok(name: str) -> bool:
        return model is None or name == model or (model.endswith("*") and name.startswith(model[:-1]))

    return [r for r in recs if (recipes is None or r["run"]["recipe"] in recipes)
            and (proto is None or r["run"]["protocol"] == proto)
            and not r["run"].get("calib") and list(r["run"].get("extra") or ()) == list(extra)
            and r["run"].get("budget") == "default" and full_eval(r) and model_ok(r["run"]["model"])
            and (bits is None or f"W{r['run']['w']}A{r['run']['a']}" == bits)]


def top1_by_seed(runs: list[dict]) -> dict[str, dict[int, float]]:
    """recipe -> seed -> top-1 of the runs that recorded one (a seed with several runs: their mean), so
    that a target counts distinct seeds, each once, and the same runs make its mean and its seed count."""
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        top1 = (r["zsq"].get("metrics") or {}).get("top1")
        if top1 is not None:
            by[r["run"]["recipe"]][r["run"]["seed"]].append(top1)
    return {k: {s: statistics.mean(v) for s, v in sorted(seeds.items())} for k, seeds in by.items()}


def scored(recs: list[dict], model: str, recipe: str, proto: str, bits: str) -> list[dict]:
    """:func:`target_runs` of one recipe that recorded a top-1."""
    return [x for x in target_runs(recs, model, (recipe,), proto, bits)
            if (x["zsq"].get("metrics") or {}).get("top1") is not None]
