"""The benchmark harness: a real run through `python -m zsq quantize` becomes one JSON, a second
call resumes (skips it), and docs/results.md-style reports are generated from the JSON alone."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench_results, load_bench_script

from zsq.bench.runner import Run, RunBusy, run_one, run_wall_s, work_dir
from zsq.bench.suites import SUITES

render = load_bench_script("report").render
genie_step_param_summary = load_bench_results("genie").genie_step_param_summary


def test_run_one_writes_json_then_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    run = Run("cifar10_resnet20", "minmax-noise", "ptq", 8, 8, budget="smoke", eval_limit=200)
    rec = run_one(run, tmp_path, threads=1)
    f = tmp_path / f"{run.run_id}.json"
    assert f.is_file() and json.loads(f.read_text()) == json.loads(json.dumps(rec))
    z = rec["zsq"]
    assert z["protocol"] == "ptq" and z["bits"] == {"w": 8, "a": 8} and z["n_eval"] == 200
    assert 60.0 <= z["metrics"]["top1"] <= 100.0 and z["wall_s"] > 0 and z["peak_rss_mb"] > 0
    assert "OUT" in rec["command"] and "--eval-limit 200" in rec["command"]
    mtime = f.stat().st_mtime_ns
    again = run_one(run, tmp_path, threads=1)
    assert again["date"] == rec["date"] and f.stat().st_mtime_ns == mtime  # resumed: not re-run

    md = render(tmp_path)
    assert "## Targets" in md and "open (no runs)" in md
    assert f"| minmax-noise | {z['metrics']['top1']:.2f} |" in md  # summary table cell
    assert "| cifar10_resnet20 | minmax-noise | ptq | W8A8 | smoke | 0 |" in md  # every-run table


def test_suites_have_unique_run_ids():
    for name, suite in SUITES.items():
        ids = [r.run_id for r in suite()]
        assert len(ids) == len(set(ids)), name


def _vit_rec(recipe: str, top1: float, extra: tuple = (), calib: str | None = None, a: int = 4) -> dict:
    run = Run("cifar10_vit_tiny", recipe, "vit-ptq", 4, a, calib=calib, extra=extra)
    return {"run": {**run.__dict__, "extra": list(extra)}, "run_id": run.run_id,
            "zsq": {"metrics": {"top1": top1}, "n_eval": 10000}}


def test_vit_data_rows_compare_each_recipe_with_noise():
    from zsq.bench.suites import VIT_RECIPES, VIT_RECON_SET

    vit_data_rows = load_bench_results("vit").vit_data_rows

    recs = [_vit_rec("minmax-noise", 67.8), _vit_rec("psaq-vit", 99.0, calib="real.tar")]
    # the recipes' min-max rows name the observer (their default budget searches ranges by MSE)
    recs += [_vit_rec(r, 67.5 + i, ("--set", "a_observer=minmax")) for i, r in enumerate(VIT_RECIPES)]
    recs += [_vit_rec("brecq", 69.5, ("--synth", "gaussian", *VIT_RECON_SET))]
    recs += [_vit_rec("brecq", 72.0 + i, ("--synth", r, *VIT_RECON_SET)) for i, r in enumerate(VIT_RECIPES[:3])]
    rows = vit_data_rows(recs)
    assert len(rows) == 2  # no MSE-range runs yet: no row for them
    # calibration: the weakest (psaq-vit 67.50) is below noise; the real-data run (99.0) is not a recipe row
    assert "min-max calibration" in rows[0] and "weakest psaq-vit 67.50 (-0.30) | no |" in rows[0]
    # reconstruction: 3 of 4 synthesizers on record
    assert "brecq reconstruction" in rows[1] and "noise 69.50" in rows[1] and "open (3 of 4 recipes)" in rows[1]
    recs.append(_vit_rec("brecq", 75.0, ("--synth", VIT_RECIPES[3], *VIT_RECON_SET)))
    assert "weakest psaq-vit 72.00 (+2.50) | yes |" in vit_data_rows(recs)[1]
    assert vit_data_rows(recs[:1]) == []
    mse = ("--set", "a_observer=mse")
    recs += [_vit_rec("minmax-noise", 70.0, mse)] + [_vit_rec(r, 71.5, mse) for r in VIT_RECIPES]
    rows = vit_data_rows(recs)
    assert len(rows) == 3 and "MSE activation ranges" in rows[1] and "(+1.50) | yes |" in rows[1]
    # reconstruction at W4A8: its own row, compared with noise at W4A8 only
    recs += [_vit_rec("brecq", 78.5, ("--synth", "gaussian", *VIT_RECON_SET), a=8)]
    recs += [_vit_rec("brecq", 78.6, ("--synth", r, *VIT_RECON_SET), a=8) for r in VIT_RECIPES]
    rows = vit_data_rows(recs)
    assert len(rows) == 4 and "W4A8, brecq" in rows[3] and "noise 78.50" in rows[3] and "(+0.10) | no |" in rows[3]
    assert "W4A4, brecq" in rows[2] and "(+2.50) | yes |" in rows[2]


def test_ddp_section_renders_rows_and_speedups(tmp_path):
    ddp_section = load_bench_results("ddp").ddp_section

    f = tmp_path / "ddp" / "ddp_throughput.json"
    assert ddp_section(f) == []
    row = lambda t, p, th, ips: {"task": t, "procs": p, "threads_per_proc": th, "images_per_s": ips,  # noqa: E731
                                 "loadavg_before": [0.5, 0, 0]}
    doc = {"settings": {"model": "cifar10_resnet20", "synth_batch": 256, "synth_batches": 4, "synth_iters": 120,
                        "qat_batch": 256, "qat_steps": 20},
           "machine": {"cpu": "test cpu", "cores": 2},
           "rows": [row("synth", 1, 2, 40.0), row("synth", 2, 1, 50.0)],
           "speedup": {"synth": {"1x2": {"vs_1proc_same_cores": 1.0, "vs_1x1": None},
                                 "2x1": {"vs_1proc_same_cores": 1.25, "vs_1x1": None}}}}
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(doc))
    text = "\n".join(ddp_section(f))
    assert "## torch.distributed: 1 vs 2 processes" in text and "test cpu (2 cores)" in text
    assert "| synth | 2x1 | 50.00 | 1.25x | — | 0.50 |" in text


def test_vit_val_section_lists_weight_and_activation_ranges(tmp_path):
    vit_val_section = load_bench_results("vit").vit_val_section

    d = tmp_path / "vit-val"
    assert vit_val_section(d) == []
    d.mkdir()
    base = {"recipe": "smi", "w_observer": "minmax", "bits": "W4A4", "seed": 0, "val_top1": 80.0, "wall_s": 1.0}
    (d / "a.json").write_text(json.dumps(base))  # written before the activation range was recorded: min-max
    (d / "b.json").write_text(json.dumps({**base, "a_observer": "mse", "val_top1": 82.5}))
    text = "\n".join(vit_val_section(d))
    assert "| smi | minmax | minmax | W4A4 | 80.00 | 1.0 |" in text
    assert "| smi | minmax | mse | W4A4 | 82.50 | 1.0 |" in text


def test_bench_run_exit_status_counts_failed_runs(tmp_path, monkeypatch, capsys):
    """A run that fails (here: an unknown recipe, the CLI's exit 2) is reported, the suite goes on, and
    `zsq bench run` exits 1."""
    import pytest

    from zsq.bench import suites
    from zsq.cli import main

    monkeypatch.setitem(suites.SUITES, "broken", lambda: [Run("cifar10_resnet20", "no-such-recipe", "ptq", 8, 8)])
    with pytest.raises(SystemExit) as e:
        main(["bench", "run", "broken", "--runs-dir", str(tmp_path)])
    assert e.value.code == 1
    assert "1 of 1 runs failed" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_sadag_target_rows_compare_means_of_three_seeds():
    from zsq.bench.suites import GENIE_MATCHED_TIME

    sadag_target_rows = load_bench_results("sadag").sadag_target_rows

    def rec(recipe, seed, top1, bits=(3, 3), extra=()):
        run = Run("cifar10_resnet20", recipe, "genie-native", *bits, seed=seed, extra=extra)
        return {"run": {**run.__dict__, "extra": list(extra)}, "run_id": run.run_id,
                "zsq": {"metrics": {"top1": top1}, "n_eval": 10000}}

    recs = [rec("genie", s, 77.0 + 0.1 * s) for s in range(3)]
    assert sadag_target_rows(recs) == []  # no sadag run yet: no row
    recs += [rec("sadag", s, 77.5) for s in range(2)]
    (row,) = sadag_target_rows(recs)
    assert "open (sadag 2, genie 3 of 3 seeds)" in row
    recs.append(rec("sadag", 2, 77.5))
    (row,) = sadag_target_rows(recs)
    assert "(+0.40) | met |" in row and "cifar10_resnet20, genie-native, W3A3" in row
    recs += [rec("genie", s, 70.0, (2, 4)) for s in range(3)] + [rec("sadag", s, 70.1, (2, 4)) for s in range(3)]
    assert "(+0.10) | **not met** |" in sadag_target_rows(recs)[1]
    # genie given sadag's synthesis time: shown beside the row (its own difference), never counted as genie
    recs += [rec("genie", s, 77.2, extra=GENIE_MATCHED_TIME) for s in range(3)]
    row = sadag_target_rows(recs)[0]
    assert ("(+0.40); genie at sadag's synthesis time 77.20 ± 0.00 (n=3, min 77.20, max 77.20) (+0.30) | met |"
            in row)


def test_sadag_cells_difference_standard_error_and_tally():
    sadag_cells_section = load_bench_results("sadag").sadag_cells_section
    sadag_cells = load_bench_results("sadag").sadag_cells

    def rec(recipe, seed, top1, bits=(3, 3), proto="genie-native"):
        run = Run("cifar10_resnet32", recipe, proto, *bits, seed=seed)
        return {"run": {**run.__dict__, "extra": []}, "run_id": run.run_id,
                "zsq": {"metrics": {"top1": top1}, "n_eval": 10000, "synthetic": {"n_images": 256}}}

    recs = [rec("genie", s, v) for s, v in enumerate((77.0, 77.2, 77.4))]
    recs += [rec("sadag", s, v) for s, v in enumerate((77.5, 77.5, 77.8))]
    recs += [rec("genie", s, 70.0, (2, 4)) for s in range(3)] + [rec("sadag", s, 69.0, (2, 4)) for s in range(2)]
    (c,) = sadag_cells(recs)  # W2A4 has 2 sadag seeds: no cell
    assert (c["bits"], c["images"]) == ("W3A3", [256])
    assert c["diff"] == pytest.approx(0.4)
    assert c["se"] == pytest.approx((0.04 / 3 + 0.03 / 3) ** 0.5)  # sample variances 0.04 and 0.03
    recs.append(rec("sadag", 2, 69.0, (2, 4)))
    text = "\n".join(sadag_cells_section(recs))
    assert "| W2A4 | 69.00 ± 0.00 (n=3) | 70.00 ± 0.00 (n=3) | -1.00 | 0.00 | — |" in text
    assert "Over the 2 cells: mean diff -0.30" in text and "ahead by >= 0.3 in 1, behind by >= 0.3 in 1" in text
    assert "|diff| > 2 se in 2 of 2" in text and "Synthetic images per set: 256" in text
    assert sadag_cells_section([r for r in recs if r["run"]["recipe"] == "genie"]) == []


def test_qat_suite_native_protocols_and_baseline_margin_row():
    """The qat suite runs each recipe under its native protocol (DSG / KW / MixMix as their papers evaluate);
    the baseline row compares the best QAT recipe's W3A3 mean with qat-zeroq's and needs 3 seeds of the best."""
    from zsq.bench.suites import qat

    qat_baseline_rows = load_bench_results("qat").qat_baseline_rows

    runs = qat()
    assert Run("cifar10_resnet20", "kw", "ptq", 3, 3) in runs and Run("cifar10_resnet20", "mixmix", "ptq", 4, 4) in runs
    assert Run("cifar10_resnet20", "intraq", "qat", 3, 3) in runs and Run("cifar10_resnet20", "dsg", "qat", 3, 3) in runs

    def rec(recipe, seed, top1, bits=(3, 3), proto="qat"):
        run = Run("cifar10_resnet20", recipe, proto, *bits, seed=seed)
        return {"run": {**run.__dict__, "extra": []}, "run_id": run.run_id, "zsq": {"metrics": {"top1": top1}, "n_eval": 10000}}

    assert "open (no runs)" in qat_baseline_rows([rec("qat-zeroq", 0, 65.9)])[0]
    recs = [rec("qat-zeroq", 0, 65.9), rec("intraq", 0, 67.4), rec("hast", 0, 66.0),
            rec("intraq", 0, 90.0, bits=(4, 4)), rec("kw", 0, 99.0, proto="ptq")]  # other bits / protocol: ignored
    (row,) = qat_baseline_rows(recs)
    assert "intraq 67.40 vs qat-zeroq 65.90: +1.50 | open (1 of 3 seeds) |" in row
    recs += [rec("intraq", 1, 66.4), rec("intraq", 2, 66.4)]  # mean 66.73: +0.83
    assert "+0.83 | **not met** |" in qat_baseline_rows(recs)[0]
    recs += [rec("hast", s, 67.2) for s in (1, 2)]  # hast mean 66.80 is now the best: +0.90
    assert qat_baseline_rows(recs)[0].startswith("| best QAT recipe beats qat-zeroq by >= 1.0 at W3A3 (qat) | hast ")


def test_run_one_resumes_an_interrupted_run_and_locks_it(tmp_path, monkeypatch):
    """An interrupted run (its OUT with a checkpoint in ZSQ_CACHE/bench-work/RUN_ID) is continued with
    --resume and its JSON records the earlier attempt's wall; a checkpoint of other settings makes the
    runner start over; a live lock refuses a second runner, a dead one is taken over; the work
    directory goes once the JSON is written."""
    import os
    import subprocess
    import sys
    import time

    import zsq.bench.runner as runner

    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CI", "true")
    run = Run("cifar10_resnet20", "qat-zeroq", "qat", 4, 4, budget="smoke", eval_limit=50,
              extra=("--set", "steps_per_epoch=6"))
    work = work_dir(run)
    assert work == tmp_path / "cache" / "bench-work" / run.run_id

    def interrupt(*sets):  # the state a killed `zsq bench run` leaves: OUT with a checkpoint, one attempt
        cmd = [sys.executable, "-m", "zsq", "quantize", run.model, "--recipe", run.recipe, "--protocol", "qat",
               "--w", "4", "--a", "4", "--budget", "smoke", "--threads", "1", "-q", "-o", str(work / "out"), *sets]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode != 0 and "stopped after step 3 of epoch 0" in p.stderr, p.stderr[-2000:]
        now = time.time()
        (work / "attempts.json").write_text(json.dumps([{"start": now - 100.0, "last": now - 40.0}]))

    cmds, done = [], []
    real = runner._attempt
    monkeypatch.setattr(runner, "_attempt", lambda cmd, *a: cmds.append(cmd) or done.append(real(cmd, *a)) or done[-1])

    interrupt("--set", "steps_per_epoch=6", "--set", "stop_at=[0,3]")
    (work / "lock.json").write_text(json.dumps({"runner": os.getppid(), "child": None}))  # alive: another runner
    with pytest.raises(RunBusy):
        run_one(run, tmp_path / "runs", threads=1)
    (work / "lock.json").write_text(json.dumps({"runner": 2 ** 22 + 12345, "child": None}))  # gone: taken over
    rec = run_one(run, tmp_path / "runs", threads=1)
    assert "--resume" in cmds[-1] and "--resume" not in rec["command"]
    assert rec["resumed"] == {"attempts": 1, "earlier_wall_s": 60.0}
    assert run_wall_s(rec) == pytest.approx(rec["zsq"]["wall_s"] + 60.0)
    assert not work.exists() and (tmp_path / "runs" / f"{run.run_id}.json").is_file()
    # the child's progress reached its stderr.log as plain lines (a file, not a terminal)
    assert "--quiet" not in cmds[-1] and "qat epochs: 1/1 loss" in done[-1].stderr, done[-1].stderr[-2000:]

    # a checkpoint of other settings (6 -> 7 steps per epoch): resuming is refused, the run starts over
    interrupt("--set", "steps_per_epoch=7", "--set", "stop_at=[0,3]")
    cmds.clear()
    again = run_one(run, tmp_path / "runs", threads=1, force=True)
    assert ["--resume" in c for c in cmds] == [True, False] and "resumed" not in again
    assert again["zsq"]["metrics"]["top1"] == rec["zsq"]["metrics"]["top1"]  # resumed = uninterrupted
    assert not work.exists()


def test_budget_curves_points_section_and_plot(tmp_path):
    """The accuracy-against-budget curves: the suite runs each curve's values (the default as the shared
    plain run), the report lists the points once one besides the default exists, and
    bench/budget_plot.py draws them (exit 2 with no points)."""
    from zsq.bench.suites import BUDGET_CURVES, budget

    budget_section = load_bench_results("budget").budget_section
    budget_points = load_bench_results("budget").budget_points
    family_goal = load_bench_results("targets").family_goal

    runs = budget()
    assert len(runs) == sum(len(v) for *_, v in BUDGET_CURVES)
    assert Run("cifar10_resnet20", "qat-zeroq", "qat", 3, 3) in runs  # the default point = the qat suite's run
    assert Run("cifar10_resnet20", "gdfq", "qat", 3, 3, extra=("--set", "epochs=25")) in runs
    assert Run("cifar10_resnet20", "genie", "genie-native", 3, 3) in runs  # the genie suite's run
    assert Run("cifar10_resnet20", "genie", "genie-native", 3, 3, extra=("--set", "iters=12000")) in runs

    def rec(run, top1, hparams, wall=600.0):
        return {"run": {**run.__dict__, "extra": list(run.extra)}, "run_id": run.run_id,
                "zsq": {"metrics": {"top1": top1}, "wall_s": wall, "recipe": {"hparams": hparams}}}

    qz = {"epochs": 4, "steps_per_epoch": 250}
    recs = [rec(Run("cifar10_resnet20", "qat-zeroq", "qat", 3, 3), 65.9, qz)]
    assert budget_section(recs, tmp_path) == []  # the default alone is no curve
    recs.append(rec(Run("cifar10_resnet20", "qat-zeroq", "qat", 3, 3, extra=("--set", "steps_per_epoch=500")), 68.0,
                    {**qz, "steps_per_epoch": 500}, wall=1200.0))
    # not a curve point: another extra flag, another seed
    recs.append(rec(Run("cifar10_resnet20", "qat-zeroq", "qat", 3, 3, extra=("--set", "lr=1e-4")), 10.0, qz))
    recs.append(rec(Run("cifar10_resnet20", "qat-zeroq", "qat", 3, 3, seed=1), 66.5, qz))
    pts = budget_points(recs)
    assert [(p["value"], p["scale"], p["iters"], p["top1"]) for p in pts] == [(250, 1.0, 1000, 65.9),
                                                                            (500, 2.0, 2000, 68.0)]
    text = "\n".join(budget_section(recs, tmp_path))
    assert "| qat-zeroq | qat | W3A3 | steps_per_epoch=500 | 2 | 2000 | 68.00 | 72.0 | 20.0 |" in text
    # each row shows its own bit width's family target (a W4A4 row is not held to the W3A3 one)
    recs.append(rec(Run("cifar10_resnet20", "qat-zeroq", "qat", 4, 4), 79.5, qz))
    assert "| qat-zeroq | qat | W4A4 | steps_per_epoch=250 | 1 | 1000 | 79.50 | 78.5 | 10.0 |" in "\n".join(
        budget_section(recs, tmp_path))
    assert (family_goal("gdfq", "W4A4"), family_goal("adasg", "W3A3")) == (78.0, 70.0)
    # genie: its own protocol, steps per block as the loop count, its own issue-5 target; a genie run under
    # another protocol is no point of its curve
    gh = {"iters": 3000, "batch_size": 8}
    recs.append(rec(Run("cifar10_resnet20", "genie", "genie-native", 3, 3, extra=("--set", "iters=6000")), 77.6,
                    {**gh, "iters": 6000}, wall=900.0))
    recs.append(rec(Run("cifar10_resnet20", "genie", "ptq", 3, 3, extra=("--set", "iters=6000")), 77.0,
                    {**gh, "iters": 6000}))
    recs.append(rec(Run("cifar10_resnet32", "genie", "genie-native", 3, 3), 77.3, gh))  # another model
    recs.append(rec(Run("cifar10_resnet20", "genie", "genie-native", 2, 4), 76.7, gh))  # bits of no target
    text = "\n".join(budget_section(recs, tmp_path))
    assert "| genie | genie-native | W3A3 | iters=6000 | 2 | 6000 | 77.60 | 78.3 | 15.0 |" in text
    assert "| genie | ptq |" not in text and "77.30" not in text and "W2A4" not in text
    assert (family_goal("genie", "W3A3", "genie-native"), family_goal("genie", "W4A4", "genie-native")) == (78.3, 80.2)

    mod = load_bench_script("budget_plot")
    assert mod.main(["--runs-dir", str(tmp_path)]) == 2  # no runs there
    for i, r in enumerate(recs):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    assert mod.main(["--runs-dir", str(tmp_path)]) == 0
    png = tmp_path / "budget" / "accuracy_vs_budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plot: `" in "\n".join(budget_section(recs, tmp_path))


def test_sadag_ablation_settings_and_table():
    """bench/sadag_ablation.py: every setting is a valid synthesizer configuration (a typo fails here, not
    after an hour of runs), and the table compares each setting with genie over the seeds both have."""
    from zsq.synth import SYNTHESIZERS

    sadag_val_rows = load_bench_results("sadag").sadag_val_rows

    mod = load_bench_script("sadag_ablation")
    for synth, overrides in mod.SETTINGS.values():
        SYNTHESIZERS[synth].Config.for_budget("default", **overrides)
    assert list(mod.EXPERIMENTS)[: len(mod.SETTINGS)] == [f"{s}__W3A3__s0" for s in mod.SETTINGS]  # seed 0 first

    def rec(setting, seed, top1, synth="sadag", overrides=None):
        return {"setting": setting, "seed": seed, "val_top1": top1, "synth": synth, "overrides": overrides or {},
                "bits": "W3A3", "synth_wall_s": 1.0}

    recs = [rec("genie", 0, 80.0, "genie"), rec("genie", 1, 81.0, "genie"), rec("sadag", 0, 80.5),
            rec("lam1", 0, 79.0, overrides={"lambda_gm": 1.0}), rec("lam1", 1, 80.0, overrides={"lambda_gm": 1.0})]
    rows = sadag_val_rows(recs, list(mod.SETTINGS))
    assert rows[2].startswith("| genie | genie: — | W3A3 | s0 80.00, s1 81.00 | 80.50 | — |")
    assert "| s0 80.50 | 80.50 | +0.50 (n=1) |" in rows[3]  # sadag has seed 0 only: compared on seed 0
    assert "| lam1 | sadag: lambda_gm=1.0 | W3A3 | s0 79.00, s1 80.00 | 79.50 | -1.00 (n=2) |" in rows[4]


def test_qat_val_label_names_what_a_row_varies():
    qat_val_label = load_bench_results("qat").qat_val_label

    assert qat_val_label({"recipe": "qat-zeroq", "hparams": {"lr": 3e-5}}) == "qat-zeroq"
    assert qat_val_label({"recipe": "texq", "hparams": {"kd_weight": 10.0, "mixup_weight": 10.0,
                                                        "clip_images": True}}) \
        == "texq (KD 10, mixup KD 10), clip_images"
    assert qat_val_label({"recipe": "gdfq", "hparams": {"lr_schedule": "cosine"}}) == "gdfq, cosine lr"


def test_best_recipe_target_prefers_a_fully_seeded_recipe_and_counts_its_seeds():
    """The ``top1_best`` targets count the seeds of the recipe they show: one lucky seed-0 run neither passes a
    3-seed target nor hides a fully seeded recipe."""
    targets_section = load_bench_results("targets").targets_section

    def rec(recipe, seed, top1, bits=(4, 4)):
        run = Run("cifar10_resnet20", recipe, "qat", *bits, seed=seed)
        return {"run": {**run.__dict__, "extra": [], "budget": "default"}, "run_id": run.run_id,
                "zsq": {"metrics": {"top1": top1}, "n_eval": 10000}}

    def row(recs):
        (r,) = [x for x in targets_section(recs) if x.startswith("| best generator recipe, qat, W4A4")]
        return r

    recs = [rec("adasg", 0, 78.5), rec("dfq-akd", 0, 79.0)]
    assert "dfq-akd: " in row(recs) and "open (1 of 3 seeds)" in row(recs)
    recs += [rec("adasg", s, 78.2) for s in (1, 2)]  # adasg: 3 seeds, mean 78.30 -> shown over dfq-akd's single 79.0
    assert "adasg: " in row(recs) and "| met |" in row(recs)
    recs += [rec("dfq-akd", s, 77.0) for s in (1, 2)]  # dfq-akd's mean 77.67 < adasg's
    assert "adasg: " in row(recs)
    # no fully seeded recipe reaches the goal: the best mean so far is shown, open while it lacks seeds
    low = [rec("dfq-akd", s, 77.0) for s in range(3)] + [rec("qimera", 0, 77.5)]
    assert row(low).endswith("| qimera: 77.50; best with 3 seeds: dfq-akd 77.00 ± 0.00 (n=3, min 77.00, max 77.00) "
                             "| open (1 of 3 seeds) |")
    assert row(low[:3]).endswith("| dfq-akd: 77.00 ± 0.00 (n=3, min 77.00, max 77.00) | **not met** |")


def test_family_section_groups_qat_recipes_by_family_best_first():
    family_section = load_bench_results("qat").family_section

    def rec(recipe, top1, bits, seed=0, wall=600.0):
        run = Run("cifar10_resnet20", recipe, "qat", *bits, seed=seed)
        return {"run": {**run.__dict__, "extra": [], "budget": "default"}, "run_id": run.run_id,
                "zsq": {"metrics": {"top1": top1}, "n_eval": 10000, "wall_s": wall}}

    recs = [rec("gznq", 79.0, (4, 4)), rec("gznq", 72.0, (3, 3)), rec("qat-zeroq", 79.5, (4, 4)),
            rec("qat-zeroq", 66.0, (3, 3))]
    assert family_section(recs) == []  # no generator recipe yet: nothing to compare
    recs += [rec("gdfq", 72.0, (4, 4)), rec("gdfq", 45.0, (3, 3)), rec("adasg", 78.0, (4, 4), wall=900.0),
             rec("adasg", 62.0, (3, 3), wall=900.0), rec("adasg", 63.0, (3, 3), seed=1, wall=900.0),
             rec("zeroq", 99.0, (4, 4))]  # a PTQ recipe: not a QAT family row
    rows = [r for r in family_section(recs) if r.startswith("| ") and not r.startswith("| family")]
    assert [r.split(" | ")[1] for r in rows] == ["qat-zeroq", "gznq", "adasg", "gdfq"]
    assert rows[2] == "| generator | adasg | 78.00 | 62.50 ± 0.71 (n=2) | 15.0 |"


def test_genie_step_param_summary_differences_to_the_default():
    def rec(recon, bits, top1, synth="s300c"):
        return {"recon": recon, "bits": bits, "val_top1": top1, "synth": synth}

    recs = [rec("r3000b8abs", "W3A3", 82.42), rec("r3000b8abs", "W4A4", 83.88),
            rec("r3000b8rel1e3", "W3A3", 81.66), rec("r3000b8rel1e3", "W4A4", 84.20),
            rec("r3000b8rel1e3", "W8A8", 86.0),  # no default at W8A8: left out
            rec("r3000b8rel1e3", "W4A4", 90.0, synth="s500u"),  # another set: not compared
            rec("r3000b8", "W3A3", 81.86),  # the older set's default: not a variant
            rec("r3000b8lr3e3", "W3A3", 80.98)]
    (line, blank) = genie_step_param_summary(recs)
    assert line == ("Each variant minus Genie's default reconstruction (`r3000b8abs`, same set and seed; seed 0 unless named): "
                    "`r3000b8lr3e3` W3A3 -1.44; `r3000b8rel1e3` W3A3 -0.76, W4A4 +0.32.") and blank == ""
    assert genie_step_param_summary([rec("r3000b8rel1e3", "W3A3", 81.0)]) == []


def test_genie_val_section_rows_name_seed_and_set(tmp_path):
    """bench/genie_validation.py's rows: one per experiment, with its seed and, where recorded, the synthetic
    set's cache key (rows of one set compare directly); the summary line compares each variant with the
    default of the same set, seed and bits."""
    genie_val_section = load_bench_results("genie").genie_val_section

    def rec(name, synth, recon, hp, bits, seed, top1, synth_set=None):
        d = {"name": name, "synth": synth, "synth_overrides": {"n_images": 512} if synth.endswith("512") else {},
             "recon": recon, "recon_hparams": hp, "bits": bits, "seed": seed, "val_top1": top1,
             "synth_wall_s": 10.0, "recon_wall_s": 20.0, "load_avg": 1.0}
        if synth_set:
            d["synth_set"] = synth_set
        (tmp_path / f"{name}.json").write_text(json.dumps(d))

    rec("s300c__r3000b8abs__W3A3__s1", "s300c", "r3000b8abs", {"iters": 3000}, "W3A3", 1, 82.0, "genie-abcdef0123456789")
    rec("s300c__r3000b8rel1e3__W3A3__s1", "s300c", "r3000b8rel1e3", {"iters": 3000}, "W3A3", 1, 81.5,
        "genie-abcdef0123456789")
    rec("s300c512__p1000b8__W3A3__s0", "s300c512", "p1000b8", {"iters": 1000}, "W3A3", 0, 83.1)
    text = "\n".join(genie_val_section(tmp_path))
    assert "| s300c (`genie-abcdef`) | — | r3000b8abs | iters=3000 | W3A3 | 1 | 82.00 |" in text
    assert "| s300c512 | n_images=512 | p1000b8 | iters=1000 | W3A3 | 0 | 83.10 |" in text
    assert "`r3000b8rel1e3` W3A3 s1 -0.50" in text


def test_genie_fidelity_summary_means_over_seeds():
    """Only rows with valsplit.fidelity's fields; one line per set kind / reconstruction / bits, means over
    its seeds."""
    genie_fidelity_summary = load_bench_results("genie").genie_fidelity_summary

    def rec(synth, seed, top1, agree=None, kl=None, hard=None):
        d = {"synth": synth, "recon": "p1000b8", "bits": "W3A3", "seed": seed, "val_top1": top1}
        if agree is not None:
            d.update(val_agree=agree, val_kl=kl, hard_agree=hard)
        return d

    recs = [rec("real", 0, 82.0, 87.0, 0.33, 58.0), rec("real", 1, 81.0, 86.0, 0.35, 55.0),
            rec("s300c", 0, 82.5, 85.5, 0.40, 53.0), rec("s300c", 1, 99.0)]  # no fidelity fields: left out
    lines = genie_fidelity_summary(recs)
    assert "| real | p1000b8 | W3A3 | 0, 1 | 81.50 | 86.50 | 0.3400 | 56.50 | — |" in lines
    assert "| s300c | p1000b8 | W3A3 | 0 | 82.50 | 85.50 | 0.4000 | 53.00 | — |" in lines
    assert genie_fidelity_summary([rec("s300c", 0, 80.0)]) == []
    # beside each kind, its test-set row at the same bits (the default's label for s300c), where there is one
    test = {"genie": {"W3A3": [77.0, 77.2, 77.3], "W4A4": [79.7]},
            "calib-real (genie quantizer, 256 real train images)": {"W4A4": [80.2]}}
    lines = genie_fidelity_summary(recs, test)
    assert "| s300c | p1000b8 | W3A3 | 0 | 82.50 | 85.50 | 0.4000 | 53.00 | 77.17 ± 0.15 (n=3) |" in lines
    assert "| real | p1000b8 | W3A3 | 0, 1 | 81.50 | 86.50 | 0.3400 | 56.50 | — |" in lines  # no W3A3 row
    # a reconstruction variant of the proxy maps to the test row of the same variant, not to the set's default
    aug = dict(recs[2], recon="p1000b8fs3")
    lines = genie_fidelity_summary([aug], test)
    assert "| s300c | p1000b8fs3 | W3A3 | 0 | 82.50 | 85.50 | 0.4000 | 53.00 | — |" in lines
    test["genie --set augment=flipshift --set augment_copies=3"] = {"W3A3": [78.0]}
    assert "| s300c | p1000b8fs3 | W3A3 | 0 | 82.50 | 85.50 | 0.4000 | 53.00 | 78.00 |" in genie_fidelity_summary(
        [aug], test)


def _target_rec(recipe, seed, top1, *, bits=(4, 8), proto="ptq", model="cifar10_resnet20", n_eval=10000,
                eval_limit=None, rss=900.0, extra=()):
    run = Run(model, recipe, proto, *bits, seed=seed, eval_limit=eval_limit, extra=extra)
    return {"run": {**run.__dict__, "extra": list(extra)}, "run_id": run.run_id,
            "zsq": {"metrics": None if top1 is None else {"top1": top1}, "n_eval": None if top1 is None else n_eval,
                    "peak_rss_mb": rss, "wall_s": 10.0}}


def _target_row(recs, start):
    targets_section = load_bench_results("targets").targets_section

    (r,) = [x for x in targets_section(recs) if x.startswith(f"| {start}")]
    return r


def test_mean_target_counts_only_seeds_with_a_full_evaluation():
    """A 'mean of 3 seeds' target is over the seeds that were evaluated on all 10,000 test images: a failed
    evaluation (no top-1) or a partial one (--eval-limit, n_eval 1,000) is not a seed; a recorded 0.00 is a
    measurement, in the mean; the row shows mean ± std with n, min and max."""
    w4a8 = "zeroq, ptq, W4A8, mean of 3 seeds"
    recs = [_target_rec("zeroq", 0, 80.0), _target_rec("zeroq", 1, 80.2)]
    assert _target_row(recs + [_target_rec("zeroq", 2, None)], w4a8).endswith(
        "| 80.10 ± 0.14 (n=2, min 80.00, max 80.20) | open (2 of 3 seeds) |")
    partial = _target_rec("zeroq", 2, 79.9, n_eval=1000, eval_limit=100)
    assert _target_row(recs + [partial], w4a8).endswith("| open (2 of 3 seeds) |")
    assert _target_row(recs + [_target_rec("zeroq", 2, 79.9, n_eval=9000)], w4a8).endswith("| open (2 of 3 seeds) |")
    # 78 / 78 / 0.0 was "78.00 ± 0.00 (n=2) | met" under "mean of 3 seeds"
    zero = [_target_rec("zeroq", 0, 80.0), _target_rec("zeroq", 1, 80.0), _target_rec("zeroq", 2, 0.0)]
    assert _target_row(zero, w4a8).endswith("| 53.33 ± 46.19 (n=3, min 0.00, max 80.00) | **not met** |")
    full = recs + [_target_rec("zeroq", 2, 79.9)]
    assert _target_row(full, w4a8).endswith("| 80.03 ± 0.15 (n=3, min 79.90, max 80.20) | met |")


def test_best_recipe_target_counts_distinct_seeds_not_runs():
    """Three records of seed 0 (copies, or a full and a partial evaluation) are one seed, not three."""
    gen = "best generator recipe, qat, W4A4"
    recs = [_target_rec("adasg", 0, 78.5, bits=(4, 4), proto="qat") for _ in range(3)]
    assert _target_row(recs, gen).endswith("| adasg: 78.50 | open (1 of 3 seeds) |")
    recs += [_target_rec("adasg", s, 78.3, bits=(4, 4), proto="qat", n_eval=1000, eval_limit=100) for s in (1, 2)]
    assert _target_row(recs, gen).endswith("| adasg: 78.50 | open (1 of 3 seeds) |")
    recs += [_target_rec("adasg", s, 78.3, bits=(4, 4), proto="qat") for s in (1, 2)]
    assert _target_row(recs, gen).endswith("| adasg: 78.37 ± 0.12 (n=3, min 78.30, max 78.50) | met |")


def test_peak_rss_target_covers_every_cifar_recipe_at_the_default_budget():
    """benchmarks.md: peak RSS < 4 GB for any CIFAR recipe at the default budget; other models, runs with
    extra flags and real-data calibration runs do not count; the worst run is named."""
    rss = "peak RSS < 4 GB"
    recs = [_target_rec("zeroq", 0, 80.0, rss=1200.0), _target_rec("genie", 1, 77.0, proto="genie-native", rss=1300.0),
            _target_rec("dfq", 0, 81.0, model="efficientnet_lite0", proto="fixed", n_eval=1000, rss=5300.0),
            _target_rec("genie", 0, 77.0, proto="genie-native", rss=6000.0, extra=("--synth-set", "n_images=1024"))]
    row = _target_row(recs, rss)
    assert "1,300.0 MiB (cifar10_resnet20 genie genie-native W4A8 seed 1); 0 of 2 runs over | met |" in row
    recs.append(_target_rec("sadag", 1, 77.4, bits=(3, 3), proto="genie-native", model="cifar10_resnet32", rss=4131.0))
    assert _target_row(recs, rss).endswith(
        "| 4,131.0 MiB (cifar10_resnet32 sadag genie-native W3A3 seed 1); 1 of 3 runs over | **not met** |")
    assert "open (no runs)" in _target_row(recs[2:4], rss)


def test_bench_report_runs_the_checkouts_generator(tmp_path, monkeypatch, capsys):
    """`zsq bench report` runs bench/report.py of the checkout it is called in (here from a folder below the
    checkout's root), and outside a checkout says so in one line with exit 2."""
    from pathlib import Path

    from zsq.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root / "tests")
    with pytest.raises(SystemExit) as e:
        main(["bench", "report", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results.md")])
    assert e.value.code == 0
    assert (tmp_path / "results.md").read_text().endswith("No runs yet.")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["bench", "report"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no bench/report.py in" in err and len(err.strip().splitlines()) == 1


def test_bench_scripts_import_only_public_zsq_names():
    """bench/ is not part of the package: its scripts use zsq's public names only (no ``_name``, no private
    module), so a refactoring of the package's internals cannot break them silently."""
    import ast
    from pathlib import Path

    bad = []
    bench = Path(__file__).resolve().parents[1] / "bench"
    for path in sorted(bench.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(bench).parts):
            continue  # e.g. bench/peers/.venv-mct (a peer's virtual environment), not our scripts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "zsq" and not node.level:
                names = node.module.split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [p for a in node.names if a.name.split(".")[0] == "zsq" for p in a.name.split(".")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "zsq":
                names = [node.attr]
            if any(n.startswith("_") and not n.startswith("__") for n in names):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, bad
