"""``bench/genie_validation.py``: how the `genie` default budget was chosen on the validation split, and how the
validation split's ranking of the synthetic sets compares with the test set's."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from zsq.bench.suites import GENIE_AUG, GENIE_CE, GENIE_OUT_AFFINE

from .common import fmt, load_runs, run_label


def genie_val_section(d: Path, test: dict | None = None) -> list[str]:
    """Rows of ``bench/genie_validation.py``: how the `genie` default budget was chosen (validation split).
    ``test``: the ResNet-20 ``genie-native`` default-budget table (label -> bits -> test top-1 per seed)."""
    recs = load_runs(d)
    if not recs:
        return []
    fp = next((r for r in recs if "hard_fp_top1" in r), None)
    fp_note = f"; the FP model gets {fp['hard_fp_top1']:.2f} there, {fp['val_fp_top1']:.2f} on the whole split" if fp else ""
    out = ["## Genie default budget: chosen on a validation split (`bench/genie_validation.py`)", "",
           "ResNet-20, `genie` recipe (`genie-native`). Top-1 on the **validation split** (first 500 "
           "images per class of `cifar10-jpeg/train.tar`, 5,000 images; never the test set). Synthetic sets: "
           "Genie-D, 256 images in 2 batches of 128; `real` = 256 real training images (a reference, not "
           "zero-shot). `p1000b8` is a cheap proxy reconstruction (1,000 steps per block, batch 8). `rel1e3` / "
           "`rel3e3`: the default reconstruction with the weight step learnt as log(s / s_0) at Adam lr 1e-3 / 3e-3 "
           "(`w_scale_param=relative`) instead of Genie's absolute lr 1e-4 on s. `lr3e3`: the default with the rounding "
           "logits' Adam lr 3e-3 instead of 1e-3 (the paper's lr is sized for 20,000 steps; tried for the 3,000 here). "
           "`s300c512`: the default synthesis with 512 images instead of 256. Where a row names its set (the cache "
           "key), rows of the same set compare directly; the s300c rows without one that are not `r3000b8abs` / "
           "`rel` / `lr` rows used an older set of seed 0 (another cache key), so the `s0cur` experiments redo "
           "them on today's. `ce_weight` / `out_affine`: ablations of Genie-D's synthesis (cross-entropy to balanced "
           "target labels; a learnable scale / shift after the generator's last BN). Rows named `fid` record beside "
           "top-1 the agreement with the FP model (`agree`) and top-1 on the 1,000 validation images the FP model is "
           f"least sure of (`hard`{fp_note}): the split is training images, and its top-1 did not show the real "
           "images' test-set lead. "
           "Wall "
           "times include other work running on the machine at the time (the `load` column).", "",
           "| synthetic set | overrides | reconstruction | hparams | bits | seed | val top-1 | agree | hard top-1 | "
           "synth s | recon s | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["recon"], r["bits"], r["synth"], r["seed"], r["name"])):
        ov = ", ".join(f"{k}={v}" for k, v in (r["synth_overrides"] or {}).items()) or ("—" if r["synth_overrides"]
                                                                                       is not None else "real")
        hp = ", ".join(f"{k}={v}" for k, v in r["recon_hparams"].items())
        synth = f"{r['synth']} (`{r['synth_set'][:12]}`)" if r.get("synth_set") else r["synth"]
        fid = " | ".join(f"{r[k]:.2f}" if k in r else "—" for k in ("val_agree", "hard_top1"))
        out.append(f"| {synth} | {ov} | {r['recon']} | {hp} | {r['bits']} | {r['seed']} | {r['val_top1']:.2f} | "
                   f"{fid} | {r['synth_wall_s']} | {r['recon_wall_s']} | {r.get('load_avg')} |")
    return out + [""] + genie_step_param_summary(recs) + genie_fidelity_summary(recs, test)


def genie_fidelity_summary(recs: list[dict], test: dict | None = None) -> list[str]:
    """Per synthetic-set kind and bits, over the seeds it has with :func:`valsplit.fidelity`'s fields (the
    W3A3 proxy rows): mean val top-1, agreement with FP, KL(FP || q), agreement on the hard images; beside
    them the test-set top-1 at the same bits of the test-set row that corresponds to the set kind and proxy
    reconstruction (the default reconstruction, or its variant such as ``augment``), from ``test`` (label ->
    bits -> values; :data:`VAL_SET_TEST_LABEL`), where it was run: does the validation split rank the sets as
    the test set does?"""
    by: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for r in recs:
        if "val_agree" in r:
            by[(r["synth"], r["recon"], r["bits"])][r["seed"]] = r  # one row per seed (the later name wins)
    if not by:
        return []
    out = ["Agreement with the FP model on the validation split (means over the seeds listed; `hard` = the 1,000 "
           "images the FP model is least sure of):", "",
           "| synthetic set | reconstruction | bits | seeds | val top-1 | agree | KL(FP, q) | hard agree | "
           "test top-1 (default reconstruction) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (synth, recon, bits), rows in sorted(by.items()):
        v = list(rows.values())

        def mean(k, nd=2):
            return f"{sum(r[k] for r in v) / len(v):.{nd}f}"
        t = fmt(((test or {}).get(VAL_SET_TEST_LABEL.get((synth, recon), "")) or {}).get(bits, []))
        out.append(f"| {synth} | {recon} | {bits} | {', '.join(map(str, sorted(rows)))} | {mean('val_top1')} | "
                   f"{mean('val_agree')} | {mean('val_kl', 4)} | {mean('hard_agree')} | {t} |")
    return out + [""]


def genie_step_param_summary(recs: list[dict]) -> list[str]:
    """One line: each variant of the default reconstruction (``r3000b8<variant>``: relative weight step,
    rounding lr ...) minus the default itself (``r3000b8abs``, the same synthetic set and seed) at each bit
    setting both have. The plain ``r3000b8`` rows (an older set) are not compared."""
    def key(r):
        return r["synth"], r["bits"], r.get("seed", 0), r.get("synth_set")

    base = {key(r): r["val_top1"] for r in recs if r["recon"] == "r3000b8abs"}
    diffs: dict[str, list[str]] = defaultdict(list)
    for r in sorted(recs, key=lambda r: (r["recon"], r["bits"], r.get("seed", 0))):
        if r["recon"].startswith("r3000b8") and r["recon"] not in ("r3000b8", "r3000b8abs") and key(r) in base:
            seed = f" s{r['seed']}" if r.get("seed", 0) else ""
            diffs[r["recon"]].append(f"{r['bits']}{seed} {r['val_top1'] - base[key(r)]:+.2f}")
    if not diffs:
        return []
    return ["Each variant minus Genie's default reconstruction (`r3000b8abs`, same set and seed; seed 0 unless named): "
            + "; ".join(f"`{k}` {', '.join(v)}" for k, v in diffs.items()) + ".", ""]


#: the test-set row (label of the ResNet-20 ``genie-native`` default table) of each validation (set kind, proxy
#: reconstruction): the label :func:`run_label` gives the ``genie`` suite's run of the same kind. The proxy
#: ``p1000b8`` stands for the default reconstruction; ``p1000b8fs3`` for it on the augmented set (GENIE_AUG)
VAL_SET_TEST_LABEL = {
    ("real", "p1000b8"): run_label({"recipe": "genie", "calib": "cifar10-jpeg/train.tar", "calib_n": 256}, long=True),
    ("s300c", "p1000b8"): "genie",
    ("s300caff", "p1000b8"): run_label({"recipe": "genie", "extra": GENIE_OUT_AFFINE}),
    ("s300cce1", "p1000b8"): run_label({"recipe": "genie", "extra": GENIE_CE}),
    ("sadag", "p1000b8"): "sadag",
    ("s300c", "p1000b8fs3"): run_label({"recipe": "genie", "extra": GENIE_AUG})}
