"""``bench/synthetic_gap.py``: where Genie-D's synthetic images differ from real training images, layer by layer, on
ResNet-20 and ResNet-32, and how the W3A3 gap on the validation split follows (issue 39 item 1)."""

from __future__ import annotations

from pathlib import Path

from .common import load_runs, shown_path

SHORT = {"cifar10_resnet20": "ResNet-20", "cifar10_resnet32": "ResNet-32"}
SET_ORDER = {"i100b0": 0, "i300b0": 1, "i100": 2, "i300": 3, "i600": 4, "real": 5}


def _set_label(r: dict) -> str:
    if r["set"] == "real":
        return "real B (256 other non-val train images)" if r["kind"] == "diag" else "real A (256 non-val train images)"
    part = f", batch {'+'.join(map(str, r['batches']))} only" if r.get("batches") else ""
    return (f"Genie-D {r['iters']} it{' (default)' if r['iters'] == 300 else ''}{part}, {r['n_images']} images "
            f"(`{(r.get('set_key') or '')[:18]}`)")


def _mean_blocks(r: dict) -> float:
    """Mean MMD^2 over the residual blocks."""
    return sum(r["mmd2"]) / len(r["mmd2"])


def _depth_corr(v: list[float]) -> float:
    """Spearman rank correlation of ``v`` with its position (depth); no scipy."""
    n = len(v)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: v[i]))}
    d2 = sum((rank[i] - i) ** 2 for i in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1))


def synthetic_gap_section(d: Path) -> list[str]:
    recs = load_runs(d)
    if not recs:
        return []
    diags = sorted((r for r in recs if r["kind"] == "diag"), key=lambda r: (r["model"], SET_ORDER.get(r["set"], 9)))
    quants = sorted((r for r in recs if r["kind"] == "quant"), key=lambda r: (r["model"], SET_ORDER.get(r["set"], 9)))
    loads = [r["load_avg"] for r in recs if "load_avg" in r]
    out = ["## Synthetic vs real data, layer by layer (`bench/synthetic_gap.py`, issue 39 item 1)", "",
           "Genie-D's synthetic sets (seed 0, 256 images in 2 batches of 128, or where marked batch 0 alone: its 128 "
           "images, the same tensor as the whole set's first batch; made and cached through "
           "`zsq.api.synthetic_data` exactly as `zsq quantize --recipe genie --protocol genie-native` makes them; "
           "300 iterations per batch is the `default` budget, 100 / 600 are the same budget with "
           "`--synth-set iters=N` and nothing else changed) against 256 real training images from outside the "
           "validation split (reference A; seed 0, 25-26 per class). Training images only; the test set is not read. "
           "**BNS term**: Genie's own BN-statistics loss (`BNStatsLoss.preset(\"genie\")`, `layer_losses()`: "
           "||batch mean - running mean||² / C + ||batch std - running std||² / C of the BN layer's input) per BN "
           "layer, on batches of 128 (the synthesis batch), averaged over the batches; it is measured in fp32 without "
           "the swing convolution the synthesis used. **MMD²**: unbiased squared "
           "MMD between the set's and reference A's FP features at each residual block output, global-average-"
           "pooled to one C-vector per image, Gaussian kernel with bandwidth = the median pairwise distance of A's "
           "pooled features at that layer (the same kernel for every set of one model; the last block's pooled "
           "output is the classifier's input). **Real B** is a second, disjoint 256 real non-validation images measured the same way: its "
           "MMD² is the estimator's floor at this sample size (about 0; the unbiased estimate can be negative), "
           "and its BNS terms what real images of one batch of 128 score. **Confidence**: the FP model's mean "
           "max-softmax; **class entropy**: entropy (nats) of the FP model's predicted-class histogram "
           "(ln 10 = 2.303 = balanced). **synth s**: the wall seconds of the set's batches as the cache recorded them, "
           "made at load 6-16 (partly by another agent's process that needed the same ResNet-20 set; a quiet "
           "ResNet-20 default set took 180-350 s in `bench/genie_validation.py`). Genie-D draws no labels, so there "
           "is no FP top-1 against intended labels "
           "for its sets (for real B the column is top-1 against the true labels). "
           f"Machine: 2-core AMD EPYC (AVX2) shared with other agents, 1 thread per process; load average "
           f"{min(loads):.1f}-{max(loads):.1f} when the experiments started." if loads else "", ""]
    out += ["| model | set | synth s | BNS sum | mean block MMD² | max block MMD² | confidence | class entropy | "
            "predicted-class counts | FP top-1 vs labels |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in diags:
        k = max(range(len(r["mmd2"])), key=lambda i: r["mmd2"][i])
        top1 = "—" if r.get("fp_top1_intended") is None else f"{r['fp_top1_intended']:.2f}"
        out.append(f"| {SHORT.get(r['model'], r['model'])} | {_set_label(r)} | {r['synth_wall_s']} | "
                   f"{r['bn']['sum']:.3f} | {_mean_blocks(r):.4f} | {r['mmd2'][k]:.4f} ({r['layers'][k]}) | "
                   f"{r['confidence']:.3f} | {r['class_entropy']:.3f} | {min(r['class_counts'])}-"
                   f"{max(r['class_counts'])} | {top1} |")
    refs = {r["model"]: r for r in diags if r["set"] == "real"}
    for m, r in refs.items():
        out.append(f"| {SHORT.get(m, m)} | real A (the reference) | 0 | {r['ref_bn']['sum']:.3f} | 0 | 0 | "
                   f"{r['ref_confidence']:.3f} | {r['ref_class_entropy']:.3f} | — | {r['ref_fp_top1']:.2f} |")
    out.append("")
    # per-layer tables, one per model: BN terms and MMD^2 of every set
    for m in sorted({r["model"] for r in diags}):
        rows = [r for r in diags if r["model"] == m]
        heads = [("real B" if r["set"] == "real" else f"{r['iters']} it" + (" b0" if r.get("batches") else ""))
                 for r in rows]
        names = rows[0]["bn"]["names"]
        out += [f"{SHORT.get(m, m)}, BNS term per BN layer (the synthetic / real B ratio for the default set in the "
                "last column):", "",
                "| BN layer | " + " | ".join(heads) + " | real A | default / real B |",
                "|---" * (len(heads) + 3) + "|"]
        syn = next((r for r in rows if r["set"] == "i300"), None) or next((r for r in rows if r["set"] == "i300b0"), None)
        real = refs.get(m)
        for i, n in enumerate(names):
            ratio = (f"{syn['bn']['total'][i] / real['bn']['total'][i]:.1f}x"
                     if syn and real and real["bn"]["total"][i] > 0 else "—")
            ref = f"{real['ref_bn']['total'][i]:.4f}" if real else "—"
            out.append(f"| {n} | " + " | ".join(f"{r['bn']['total'][i]:.4f}" for r in rows) + f" | {ref} | {ratio} |")
        out += ["", f"{SHORT.get(m, m)}, MMD² to reference A per block output:", "",
                "| block | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for i, n in enumerate(rows[0]["layers"]):
            out.append(f"| {n} | " + " | ".join(f"{r['mmd2'][i]:.4f}" for r in rows) + " |")
        out.append("")
    # computed findings for the default sets
    facts = []
    full = {r["model"] for r in diags if r["set"] == "i300"}
    for r in diags:
        if r["set"] != "i300" and not (r["set"] == "i300b0" and r["model"] not in full):
            continue
        bn, mm = r["bn"]["total"], r["mmd2"]
        real = refs.get(r["model"])
        kb = max(range(len(bn)), key=lambda i: bn[i])
        s = (f"{SHORT.get(r['model'])} ({r['n_images']} synthetic images): largest BNS term at `{r['bn']['names'][kb]}` ({bn[kb]:.3f}); largest block "
             f"MMD² at `{r['layers'][mm.index(max(mm))]}` ({max(mm):.4f}); rank correlation with depth: BNS terms "
             f"{_depth_corr(bn):+.2f}, block MMD² {_depth_corr(mm):+.2f}")
        if real:
            third = max(1, len(bn) // 3)
            lo = sum(bn[:third]) / sum(real["bn"]["total"][:third])
            hi = sum(bn[-third:]) / sum(real["bn"]["total"][-third:])
            s += f"; synthetic / real-B BNS in the first {third} BN layers {lo:.1f}x, in the last {third} {hi:.1f}x"
        facts.append(s)
    if facts:
        out += ["Computed from the rows above (the default budget's set, or its batch 0 where the whole set is not "
                "measured): " + ". ".join(facts) + ".", ""]
    if quants:
        out += ["W3A3 `genie-native`, `genie` recipe (Genie-M, default reconstruction: 3,000 steps per block, batch 8), "
                "seed 0, reconstructed on the default synthetic set or on real reference A; top-1 on the validation "
                "split (first 500 images per class of `cifar10-jpeg/train.tar`, 5,000 images) with agreement and "
                "KL to the FP model and top-1 on the 1,000 images the FP model is least sure of:", "",
                "| model | data | val top-1 | agree | KL(FP, q) | hard top-1 | hard agree | synth s | recon s | load |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in quants:
            out.append(f"| {SHORT.get(r['model'], r['model'])} | {_set_label(r)} | {r['val_top1']:.2f} | "
                       f"{r['val_agree']:.2f} | {r['val_kl']:.4f} | {r['hard_top1']:.2f} | {r['hard_agree']:.2f} | "
                       f"{r['synth_wall_s']} | {r['recon_wall_s']} | {r['load_avg']} |")
        gaps = []
        for m in sorted({r["model"] for r in quants}):
            by = {r["set"]: r for r in quants if r["model"] == m}
            if "real" in by and "i300" in by:
                gaps.append(f"{SHORT.get(m, m)} real - synthetic: val top-1 {by['real']['val_top1'] - by['i300']['val_top1']:+.2f}, "
                            f"agreement {by['real']['val_agree'] - by['i300']['val_agree']:+.2f}, hard top-1 "
                            f"{by['real']['hard_top1'] - by['i300']['hard_top1']:+.2f}")
        if gaps:
            out += ["", "Gap (one seed; the validation split's top-1 noise between seeds was ~0.5 in "
                    "`bench/genie_validation.py`): " + "; ".join(gaps) + "."]
        out.append("")
    have = {r["name"] for r in quants}
    missing = [f"quant__{m}__{k}__W3A3" for m in SHORT for k in ("i300", "real") if f"quant__{m}__{k}__W3A3" not in have]
    if missing:
        out += ["Not measured yet (each W3A3 reconstruction took more than the time left on the loaded machine): "
                + ", ".join(f"`{n}`" for n in missing) + "; `python bench/synthetic_gap.py NAME ...` runs them.", ""]
    png = d / "synthetic_gap.png"
    if png.exists():
        out += [f"Plot: `{shown_path(png)}` (per-layer BNS term and block MMD² against relative depth for both "
                "networks; BNS sum and mean block MMD² against synthesis iterations).", "",
                f"![synthetic-real gap]({Path('..') / shown_path(png)})", ""]
    out += NOTES
    return out


#: what the measurements show, written from the runs committed with it (the computed lines above carry the numbers)
NOTES: list[str] = [
    "What this shows (seed 0, one synthetic set per point; ResNet-32's rows are batch 0 alone, 128 images, because "
    "its second batch could not be made before the deadline on a machine at load 5-16; ResNet-20's whole default "
    "set gives the same per-block MMD² as its batch 0 within 0.006):",
    "",
    "* **The BN statistics are not where the synthetic images fall short.** At every BN layer of both networks the "
    "synthetic batches match the running statistics more closely than real training batches of the same size do "
    "(Genie's per-layer term 0.1-0.7x real B's; sums 0.40-0.48 against 1.37 / 1.92). Real batches of 128 sit "
    "further from the running statistics (batch noise, and the running averages were collected under training "
    "augmentation), so driving the BNS loss lower, or weighting the deep layers' BN terms more, pushes the "
    "images further from what real data look like in the statistics, not closer. More iterations (100 -> 300) "
    "lower the BNS sum by 30-33 % on both networks and the mean block MMD² only by 10-14 %.",
    "* **The FP features are far apart at every block** (MMD² 0.03-0.17 against a real-vs-real floor of about "
    "-0.001, i.e. the sets are separable everywhere), so the difference is in the joint distribution that two "
    "per-channel moments do not capture.",
    "* **Where it is largest, and depth.** The distance does not grow towards the output: it rises through the "
    "second stage to its maximum at that stage's last block (ResNet-20 `layer2.2`, ResNet-32 `layer2.4`), then "
    "falls through the third stage to its smallest at the last block (0.038 / 0.031), whose pooled output is what "
    "the classifier sees (rank correlation with depth about -0.5 on both). The deeper network's longer second "
    "stage is where it is larger than ResNet-20's: its stage-2 distance climbs from 0.12 to 0.15 against "
    "ResNet-20's 0.11-0.13, and its mean block MMD² is 0.107 against 0.097 (each model's kernel bandwidth is its "
    "own, so the cross-model comparison is indicative). This is the one measured place where the synthetic sets "
    "get worse with depth, matching the test-set gap that grows from ResNet-20 to ResNet-32.",
    "* **Tie to the quantized model: not measured here yet** (the four W3A3 reconstructions are listed above). "
    "A caution for when they are: on this validation split the earlier proxy runs of `bench/genie_validation.py` "
    "(section above, `p1000b8`, W3A3, seeds 0 / 1) put the default synthetic set level with or above 256 real "
    "images (82.18 / 81.64 against 82.04 / 80.94) while the test set has real ahead by 1.2 on ResNet-20, so one "
    "seed of validation top-1 may not resolve a gap of this size; agreement with the FP model and KL are "
    "recorded beside it for that reason.",
    "* The real reference here is drawn from outside the validation split; `bench/genie_validation.py`'s `real` "
    "rows (and the `calib-real-genie` runs) take 256 images of the whole `train.tar` with `load_images`, of which "
    "about a tenth are expected to be validation images, so those rows' validation top-1 is slightly favoured.",
    "* **Confidence and class balance.** The FP model is less sure of the synthetic images (mean max-softmax "
    "0.82-0.85 against 0.94-0.96 on real images) and their predicted classes are less balanced (entropy "
    "2.21-2.25 nats against 2.28-2.30; 15-40 images per class out of 256 on ResNet-20's set against 20-35 on "
    "real B). Neither moves much from 100 to 300 iterations. Genie-D has no labels to check the FP top-1 against.",
    "",
]
