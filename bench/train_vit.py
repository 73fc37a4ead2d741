"""Train the zoo's ``cifar10_vit_tiny`` (zsq.models.vit) from scratch on ``cifar10-jpeg/train.tar``.

Recipe (DeiT-style, shortened for 2 CPU cores): AdamW (lr 1e-3 at batch 128, betas 0.9/0.999,
weight decay 0.05 on weight matrices only), linear warm-up for 3 epochs then cosine decay to 1e-5,
per step; random crop 32 with zero padding 4 + horizontal flip (on a uint8 tensor batch);
label smoothing 0.1; stochastic depth 0.1; optional mixup / cutmix (``--mixup A``, ``--cutmix A``;
off by default: a 40-epoch schedule is short, strong regularisation is the usual remedy for long ones); bf16 autocast for
forward and loss (fp32 master weights; twice the fp32 speed on an AVX512-BF16 CPU).
``channels_last`` is not used: only the patch-embedding convolution sees a 4-D tensor.

Every random draw comes from the seed, the epoch and the step (data order per epoch; augmentation,
mixup and stochastic depth per step), so a run resumed from any checkpoint ends with the very same
weights as an uninterrupted one. A checkpoint (model, optimizer, log; atomic, with a SHA-256
trailer) is written at the end of every epoch, every ``--ckpt-steps`` steps, and after the step
running when Ctrl-C / SIGTERM arrives (a second Ctrl-C quits at once); ``--resume`` continues from it. The training images are decoded once into a uint8 tensor cached
under ``ZSQ_CACHE/train-vit/``. At the end the model is evaluated on ``cifar10-jpeg/test.tar``, the
weights are written (atomically, a plain ``state_dict``) to ``--out`` and their SHA-256 is printed:
set it as ``VIT_TINY_SHA256`` (and the top-1 as ``VIT_TINY_TOP1``) in ``src/zsq/models/vit.py``.

Run (from the repository root; ZSQ_HOME = the shared assets, ZSQ_CACHE = where checkpoints go)::

    ZSQ_HOME=../shared/assets python bench/train_vit.py                  # full run, ~2.7 h on 2 cores
    ZSQ_HOME=../shared/assets python bench/train_vit.py --resume         # after an interruption
    ZSQ_HOME=../shared/assets python bench/train_vit.py --time-steps 3   # measure s/step, estimate epochs

Timing (``--time-steps 3 --threads 1``: batch 128, bf16, real images with augmentation, one
thread, ``nice -n 19`` while a 2-thread benchmark kept both cores busy; AMD EPYC with AVX512-BF16):
1.06 s/step wall, 1.04 CPU-s/step, i.e. about 410 s per epoch of 390 steps on one core (fp32: 2x
slower). The same run with 2 threads was slower still (2.1 s/step: the cores were taken), so the
2-core figure is an estimate, not a measurement: assuming two free cores run a step 1.7x faster than
one, an epoch takes about 240 s, and 3 hours (minus ~3 % for decoding, checkpoints and the test
evaluation) hold about 43 epochs. The default is 40 epochs (~2.7 h on 2 free cores; ~4.6 h on one
free core). Re-measure on the machine that will train: ``--time-steps 3 --threads 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zsq.data.augment import random_flip_shift

REPO = Path(__file__).resolve().parents[1]
FORMAT = "zsq-train-vit-1"
# assumed, not measured (the machine was loaded): two free cores run this model's step 1.7x faster
# than one (batch-128 GEMMs of 192-384 columns; typical for 2 cores sharing one socket)
TWO_THREAD_SPEEDUP = 1.7
EVAL_CKPT_SHARE = 0.97  # of the budget left for training steps (test eval, checkpoints, data decoding)


def _asset(name: str) -> str:
    home = os.environ.get("ZSQ_HOME")
    base = Path(home) if home else REPO.parent / "shared" / "assets"
    return str(base / "cifar10-jpeg" / name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from zsq.models.vit import VIT_TINY_FILE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", default=_asset("train.tar"), help="training images (ImageFolder tar / dir)")
    ap.add_argument("--test", default=_asset("test.tar"), help="test images, evaluated once at the end")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup-epochs", type=float, default=3.0)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(a, a); 0 = off")
    ap.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta(a, a); 0 = off (both on: one per batch)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--subset", type=int, default=None, help="train on N images only (tests, smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N/10 test images per class")
    ap.add_argument("--run-dir", default=None, help="checkpoint + log.json (default ZSQ_CACHE/train-vit/run)")
    ap.add_argument("--out", default=str(REPO / "src" / "zsq" / "models" / "weights" / VIT_TINY_FILE))
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    ap.add_argument("--ckpt-steps", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    ap.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop after global step N")
    ap.add_argument("--time-steps", type=int, default=None,
                    help="only time N steps (after one warm-up step), print s/step and the epoch estimate")
    ap.add_argument("--budget-hours", type=float, default=3.0, help="for --time-steps: hours to fill")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------- data
def _cache_dir() -> Path:
    from zsq.paths import zsq_cache

    return zsq_cache() / "train-vit"


def load_uint8(path: str, subset: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [N,3,H,W], int64 [N])``; the full set is decoded once and cached under ZSQ_CACHE."""
    from zsq.data.eval import open_dataset
    from zsq.errors import DataError
    from zsq.paths import torch_save_atomic

    st = Path(path).resolve().stat()
    key = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = _cache_dir() / f"{Path(path).name}-{key}-u8.pt"
    if subset is None and cache.is_file():
        d = torch.load(cache, map_location="cpu", weights_only=True)
        return d["x"], d["y"]
    ds = open_dataset(path)
    items = None
    if subset is not None:
        g = torch.Generator().manual_seed(seed)
        items = torch.randperm(len(ds), generator=g)[:subset].sort().values
    got = ds.uint8(items)  # decodes every image once (zsq.data.eval's uint8 cache)
    if got is None:
        raise DataError(f"{path}: images are not small ones of one size (expected 32x32 CIFAR JPEGs)")
    x, y = got[0].clone(), got[1]
    if subset is None:
        torch_save_atomic({"x": x, "y": y}, cache)
    return x, y


#: random crop 32 with zero padding 4 + horizontal flip, per image, on the uint8 batch (one gather)
augment = random_flip_shift


def normalize(x: torch.Tensor, pre) -> torch.Tensor:
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def mix(x: torch.Tensor, y: torch.Tensor, args, g: torch.Generator):
    """Mixup or cutmix (one per batch when both are on): ``(x, y_a, y_b, lam)``."""
    alphas = [(k, a) for k, a in (("mixup", args.mixup), ("cutmix", args.cutmix)) if a > 0]
    if not alphas:
        return x, y, y, 1.0
    kind, a = alphas[int(torch.randint(len(alphas), (1,), generator=g))]
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))).beta(a, a))
    perm = torch.randperm(x.shape[0], generator=g)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return x, y, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


# ----------------------------------------------------------------------------------------- training
def build(args):
    from zsq.models.vit import VIT_TINY, VisionTransformer

    torch.manual_seed(args.seed)
    model = VisionTransformer(replace(VIT_TINY, drop_path=args.drop_path))
    no_wd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in no_wd]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in no_wd)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    return model, opt


def lr_at(step: int, total: int, warmup: int, args) -> float:
    if step < warmup:
        return args.lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _seed(args, epoch: int, step: int = -1) -> int:
    return (args.seed * 1_000_003 + epoch) * 100_003 + step + 1


def fingerprint(args, n_train: int) -> str:
    keys = ("train", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "label_smoothing",
            "drop_path", "mixup", "cutmix", "precision", "seed", "subset")
    d = {k: getattr(args, k) for k in keys}
    d["train"] = str(Path(args.train).resolve())
    d["n_train"] = n_train
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _deferred_interrupts():
    """Ctrl-C / SIGTERM only set a flag, read between steps (so the checkpoint written then is
    consistent); a second Ctrl-C stops at once, leaving the last checkpoint as it was."""
    hits = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda: False
        return

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(hits)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def train(args) -> dict:
    from zsq.data.eval import evaluate
    from zsq.models.preprocess import CIFAR10
    from zsq.paths import load_resume_checkpoint, torch_save_checked, write_json_atomic
    from zsq.progress import fmt_loss, loss_progress

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir) if args.run_dir else _cache_dir() / "run"
    ckpt_path, log_path = run_dir / "ckpt.pt", run_dir / "log.json"
    x_all, y_all = load_uint8(args.train, args.subset, args.seed)
    n = len(y_all)
    steps_per_epoch = n // args.batch_size  # last partial batch dropped (fixed shapes, fixed lr schedule)
    if steps_per_epoch == 0:
        raise SystemExit(f"batch size {args.batch_size} exceeds the {n} training images")
    total = steps_per_epoch * args.epochs
    warmup = max(int(round(args.warmup_epochs * steps_per_epoch)), 1)
    fp = fingerprint(args, n)
    model, opt = build(args)
    state = {"step": 0, "log": [], "running": None}
    if args.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ck = load_resume_checkpoint(ckpt_path, "training checkpoint", FORMAT, fp)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = {k: ck[k] for k in state}
        _say(args, f"resumed at step {state['step']}/{total} from {ckpt_path}")
    elif ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or delete {run_dir}")

    def save():
        torch_save_checked({"format": FORMAT, "fingerprint": fp, "model": model.state_dict(),
                            "opt": opt.state_dict(), **state}, ckpt_path)
        write_json_atomic(log_path, {"args": vars(args), "step": state["step"], "total_steps": total,
                                     "epochs": state["log"]})

    autocast = torch.autocast("cpu", torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    start_step = state["step"]
    bar = loss_progress(not args.quiet)
    model.train()
    with _deferred_interrupts() as interrupted, (bar or contextlib.nullcontext()):
        task = bar.add_task("train cifar10_vit_tiny", total=total, completed=state["step"], loss="-") if bar else None
        while state["step"] < total:
            epoch, first = divmod(state["step"], steps_per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(args, epoch)))
            run = state["running"] or {"loss": 0.0, "correct": 0, "seen": 0, "wall": 0.0, "cpu": 0.0}
            for i in range(first, steps_per_epoch):
                t0, c0 = time.perf_counter(), time.process_time()
                step = state["step"]
                g = torch.Generator().manual_seed(_seed(args, epoch, i))
                torch.manual_seed(_seed(args, epoch, i))  # stochastic depth
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                xb = normalize(augment(x_all[idx], g), CIFAR10)
                xb, ya, yb, lam = mix(xb, y_all[idx], args, g)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup, args)
                with autocast:
                    out = model(xb)
                    loss = lam * F.cross_entropy(out, ya, label_smoothing=args.label_smoothing)
                    if lam < 1.0:
                        loss = loss + (1 - lam) * F.cross_entropy(out, yb, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run["loss"] += float(loss.detach()) * len(idx)
                run["correct"] += int((out.argmax(1) == ya).sum())
                run["seen"] += len(idx)
                run["wall"] += time.perf_counter() - t0
                run["cpu"] += time.process_time() - c0
                state["step"] = step + 1
                state["running"] = run
                if bar:
                    bar.update(task, advance=1, loss=fmt_loss(float(loss.detach())))
                stop = interrupted() or (args.stop_after is not None and state["step"] >= args.stop_after)
                if stop or (args.ckpt_steps and state["step"] % args.ckpt_steps == 0 and i + 1 < steps_per_epoch):
                    save()
                if stop:
                    _say(args, f"stopped at step {state['step']}/{total}; checkpoint {ckpt_path} (continue with --resume)")
                    if interrupted():
                        raise SystemExit(130)
                    return {"stopped_at": state["step"], "steps_run": state["step"] - start_step, "model": model}
            rec = {"epoch": epoch + 1, "step": state["step"], "lr": opt.param_groups[0]["lr"],
                   "train_loss": round(run["loss"] / run["seen"], 5),
                   "train_top1": round(100 * run["correct"] / run["seen"], 2),
                   "wall_s": round(run["wall"], 1), "cpu_s": round(run["cpu"], 1)}
            state["log"].append(rec)
            state["running"] = None
            save()
            _say(args, json.dumps(rec))

    model.eval()
    res = evaluate(model, args.test, limit=args.eval_limit, progress=not args.quiet, preprocess=CIFAR10)
    sha = save_weights(model, args.out)
    summary = {"args": vars(args), "config": model.cfg.to_dict(), "params": sum(p.numel() for p in model.parameters()),
               "test": {"path": args.test, "top1": round(res["top1"], 2), "top5": round(res["top5"], 2), "n": res["n"]},
               "weights": {"path": str(args.out), "sha256": sha}, "epochs": state["log"],
               "train_wall_s": round(sum(r["wall_s"] for r in state["log"]), 1),
               "train_cpu_s": round(sum(r["cpu_s"] for r in state["log"]), 1)}
    write_json_atomic(run_dir / "result.json", summary)
    summary["steps_run"] = state["step"] - start_step
    print(f"test top1 {res['top1']:.2f} (n={res['n']}); weights {args.out}")
    print(f"sha256 {sha}")
    return {**summary, "model": model}


def save_weights(model: torch.nn.Module, path: str) -> str:
    """Write the plain fp32 ``state_dict`` atomically; the bytes depend only on the tensors (the
    archive is built in memory, so no temporary file name ends up in it). Returns the SHA-256."""
    import io

    from zsq.paths import atomic_path

    buf = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def time_steps(args) -> dict:
    """Time ``args.time_steps`` training steps on real images (after one warm-up step)."""
    from zsq.models.preprocess import CIFAR10

    torch.set_num_threads(args.threads)
    x_all, y_all = load_uint8(args.train, args.subset or args.batch_size * (args.time_steps + 1), args.seed)
    model, opt = build(args)
    model.train()
    autocast = torch.autocast("cpu", torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(args.seed)
    walls, cpus = [], []
    for i in range(args.time_steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = torch.randint(len(y_all), (args.batch_size,), generator=g)
        xb = normalize(augment(x_all[idx], g), CIFAR10)
        with autocast:
            loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    wall, cpu = sum(walls) / len(walls), sum(cpus) / len(cpus)
    steps = 50_000 // args.batch_size
    # CPU-seconds are what a 1-thread step costs whatever else runs; 2 free cores are assumed
    # TWO_THREAD_SPEEDUP times faster; a 2-thread measurement is taken as is (valid on a free machine)
    epoch_2 = (cpu / TWO_THREAD_SPEEDUP if args.threads == 1 else wall) * steps
    est = {"threads": args.threads, "batch_size": args.batch_size, "precision": args.precision,
           "wall_s_per_step": round(wall, 3), "cpu_s_per_step": round(cpu, 3),
           "epoch_s_at_this_speed": round(wall * steps, 1), "epoch_s_2_free_cores": round(epoch_2, 1),
           "epochs_in_budget": int(args.budget_hours * 3600 * EVAL_CKPT_SHARE // epoch_2)}
    print(json.dumps(est))
    return est


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return time_steps(args) if args.time_steps else train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
