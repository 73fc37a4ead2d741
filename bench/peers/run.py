"""Peers side by side, in one run: Sony MCT and Qualcomm AIMET (each in its own venv, see setup.sh)
and zsq's comparable `fixed` rows on the same model, eval set, bits and seeds.

Run with zsq's main venv from the repository root::

    bash bench/peers/setup.sh                       # once: the two peer venvs
    python bench/peers/run.py                       # W8A8 W4A8 W4A4 W3A3, seed 0, mct + aimet + zsq rows
    python bench/peers/run.py --bits W4A4 --seeds 0,1,2 --gptq --only mct
    python bench/peers/run.py --dry-run             # print what would run
    python bench/peers/run.py --mixed               # MCT mixed precision at the weight memory of W3A8 and W2A4

``--mixed`` (issue 38): MCT's mixed-precision PTQ (peer ``mct-mp``; ``mct-gptq-mp`` with ``--gptq``) with a
weights-memory target equal to uniform W{w}'s, at W3A8 and W2A4 by default, written to
``bench/runs/peers/mixed/`` (with ``--peers mct-mp,mct`` MCT's uniform W{w}A{a} beside it, there too); no zsq rows
are run (the zsq side is ``bench/mixed_precision.py``'s `ptq` runs in
``bench/runs/mixed/``). MCT's generated images are kept per seed (``--data-cache``), so the bit settings of a
seed share one generation.

zsq rows go through the bench runner into ``bench/runs/peers/zsq/<run_id>.json`` (resumable like every
run; kept apart from ``bench/runs/`` so this run's rows, measured beside the peers on one machine, neither
replace nor mix with the main tables' runs); peer rows are written to
``bench/runs/peers/<peer>__W{w}A{a}__s{seed}.json`` (a suffix marks a reduced eval set or data-generation
budget). An existing JSON is skipped unless ``--force``.
``zsq bench report`` renders both side by side (section "Peers side by side").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

BITS = [(8, 8), (4, 8), (4, 4), (3, 3)]
ZSQ_RECIPES = ("squant", "dfq", "udfc", "zeroq")  # all under `fixed`
MODEL = "cifar10_resnet20"
MCT_GEN = (256, 500)  # benchmarks.md: 256 images x 500 iterations
GPTQ_EPOCHS = 25  # benchmarks.md's MCT GPTQ row

#: peer name -> (venv folder, script, extra args)
PEERS = {
    "mct": (".venv-mct", "mct_peer.py", []),
    "mct-gptq": (".venv-mct", "mct_peer.py", ["--gptq"]),
    "aimet": (".venv-aimet", "aimet_peer.py", []),
    "mct-mp": (".venv-mct", "mct_peer.py", ["--mixed"]),
    "mct-gptq-mp": (".venv-mct", "mct_peer.py", ["--gptq", "--mixed"]),
}
MIXED_BITS = [(3, 8), (2, 4)]  # issue 38's comparisons: zeroq --wbits-avg 3 --a 8, genie --wbits-avg 2 --a 4
MP_BITS = "2,3,4,6,8"  # zsq's default candidates


def parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for tok in filter(None, (t.strip() for t in text.split(","))):
        t = tok.upper()
        if not (t.startswith("W") and "A" in t):
            raise SystemExit(f"run.py: --bits expects e.g. W8A8,W4A4, got '{tok}'")
        w, a = t[1:].split("A", 1)
        out.append((int(w), int(a)))
    return out


def peer_id(peer: str, w: int, a: int, seed: int, eval_limit: int | None, gen: tuple[int, int],
            gptq_epochs: int = GPTQ_EPOCHS, mp_bits: str = MP_BITS) -> str:
    tags = [f"n{eval_limit}" if eval_limit else ""]
    if peer.startswith("mct") and tuple(gen) != MCT_GEN:
        tags.append(f"g{gen[0]}x{gen[1]}")
    if peer.startswith("mct-gptq") and gptq_epochs != GPTQ_EPOCHS:
        tags.append(f"e{gptq_epochs}")
    if peer.endswith("-mp") and mp_bits != MP_BITS:
        tags.append("b" + mp_bits.replace(",", ""))
    tail = "__".join(t for t in tags if t)
    return f"{peer}__W{w}A{a}__s{seed}" + (f"__{tail}" if tail else "")


def peer_python(peer: str) -> Path:
    return HERE / PEERS[peer][0] / "bin" / "python"


def peer_cmd(peer: str, w: int, a: int, seed: int, out: Path, args) -> list[str]:
    _, script, extra = PEERS[peer]
    cmd = [str(peer_python(peer)), str(HERE / script), "--w", str(w), "--a", str(a), "--seed", str(seed),
           "--out", str(out), "--model", args.model, "--threads", str(args.threads), *extra]
    if args.eval_limit:
        cmd += ["--eval-limit", str(args.eval_limit)]
    if peer.startswith("mct"):
        cmd += ["--gen-images", str(args.gen_images), "--gen-iters", str(args.gen_iters)]
    if peer.startswith("mct-gptq"):
        cmd += ["--gptq-epochs", str(args.gptq_epochs)]
    if peer.endswith("-mp"):
        cmd += ["--mp-bits", args.mp_bits]
    if peer.startswith("mct") and args.data_cache:
        cmd += ["--data-cache", args.data_cache]
    return cmd


def run_peer(peer: str, cmd: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        raise RuntimeError(f"{peer} failed (exit {p.returncode}):\n    " + "\n    ".join(tail))
    rec = json.loads(out.read_text())
    rec["process_wall_s"] = round(wall, 1)  # including interpreter start, imports and evaluation
    from zsq.paths import write_json_atomic

    write_json_atomic(out, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default=None, help="default " + ",".join(f"W{w}A{a}" for w, a in BITS)
                    + " (--mixed: " + ",".join(f"W{w}A{a}" for w, a in MIXED_BITS) + ")")
    ap.add_argument("--seeds", default="0", help="comma-separated (default %(default)s)")
    ap.add_argument("--peers", default=None, help=f"comma-separated from {', '.join(PEERS)} (default mct,aimet; "
                    "--mixed: mct-mp)")
    ap.add_argument("--gptq", action="store_true", help="also run MCT GPTQ (peer 'mct-gptq', --mixed: 'mct-gptq-mp')")
    ap.add_argument("--mixed", action="store_true",
                    help="MCT mixed precision at uniform W{w}'s weight memory (bench/runs/peers/mixed/)")
    ap.add_argument("--mp-bits", default=MP_BITS, help="mixed-precision weight candidates (default %(default)s)")
    ap.add_argument("--data-cache", default=None,
                    help="keep MCT's generated images per seed here (--mixed default: $ZSQ_CACHE/mct-gen)")
    ap.add_argument("--zsq-recipes", default=None,
                    help="zsq rows under `fixed`; empty for none (default " + ",".join(ZSQ_RECIPES)
                    + "; --mixed: none)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N/10 test images per class (quick tests)")
    ap.add_argument("--gen-images", type=int, default=MCT_GEN[0], help="MCT data generation (default %(default)s)")
    ap.add_argument("--gen-iters", type=int, default=MCT_GEN[1], help="MCT data generation (default %(default)s)")
    ap.add_argument("--gptq-epochs", type=int, default=GPTQ_EPOCHS, help="MCT GPTQ (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every run, peers and zsq (default %(default)s)")
    ap.add_argument("--runs-dir", default=str(ROOT / "bench" / "runs"))
    ap.add_argument("--only", default=None, help="run only rows whose id contains this text")
    ap.add_argument("--force", action="store_true", help="recompute rows whose JSON exists")
    ap.add_argument("--dry-run", action="store_true", help="print the rows and commands, run nothing")
    args = ap.parse_args(argv)
    if args.bits is None:
        args.bits = ",".join(f"W{w}A{a}" for w, a in (MIXED_BITS if args.mixed else BITS))
    if args.peers is None:
        args.peers = "mct-mp" if args.mixed else "mct,aimet"
    if args.zsq_recipes is None:
        args.zsq_recipes = "" if args.mixed else ",".join(ZSQ_RECIPES)
    if args.mixed and args.data_cache is None:
        args.data_cache = str(Path(os.environ.get("ZSQ_CACHE") or Path.home() / ".cache" / "zsq") / "mct-gen")

    bits = parse_bits(args.bits)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    gptq_peer = "mct-gptq-mp" if args.mixed else "mct-gptq"
    if args.gptq and gptq_peer not in peers:
        peers.append(gptq_peer)
    bad = [p for p in peers if p not in PEERS]
    if bad:
        print(f"run.py: unknown peer(s) {', '.join(bad)} (choose from {', '.join(PEERS)})", file=sys.stderr)
        return 2
    recipes = [r.strip() for r in args.zsq_recipes.split(",") if r.strip()]
    runs_dir = Path(args.runs_dir)
    peers_dir = runs_dir / "peers"
    zsq_dir = peers_dir / "zsq"

    missing = sorted({PEERS[p][0] for p in peers if not peer_python(p).exists()})
    if missing:
        msg = (f"run.py: peer venv(s) {', '.join('bench/peers/' + m for m in missing)} missing: "
               "run bench/peers/setup.sh first")
        if not args.dry_run:
            print(msg, file=sys.stderr)
            return 2
        print(f"(dry run) {msg}")

    from zsq.bench.runner import Run, run_one

    rows = []  # (id, kind, payload)
    for s in seeds:
        for w, a in bits:
            for r in recipes:
                run = Run(args.model, r, "fixed", w, a, seed=s, eval_limit=args.eval_limit)
                rows.append((run.run_id, "zsq", run))
            for p in peers:
                pid = peer_id(p, w, a, s, args.eval_limit, (args.gen_images, args.gen_iters), args.gptq_epochs,
                              args.mp_bits)
                rows.append((pid, p, (w, a, s)))
    if args.only:
        rows = [r for r in rows if args.only in r[0]]

    failures = 0
    for i, (rid, kind, payload) in enumerate(rows, 1):
        if kind == "zsq":
            path = zsq_dir / f"{rid}.json"
        else:
            path = (peers_dir / "mixed" if args.mixed or kind.endswith("-mp") else peers_dir) / f"{rid}.json"
        done = path.exists() and not args.force
        head = f"[{i}/{len(rows)}] {rid}"
        if args.dry_run:
            if kind == "zsq":
                print(f"{head}{' (done)' if done else ''}: zsq quantize via zsq.bench.runner.run_one")
            else:
                w, a, s = payload
                print(f"{head}{' (done)' if done else ''}: {' '.join(peer_cmd(kind, w, a, s, path, args))}")
            continue
        if done:
            print(f"{head} (done)")
            continue
        print(head, flush=True)
        try:
            if kind == "zsq":
                zsq_dir.mkdir(parents=True, exist_ok=True)
                rec = run_one(payload, zsq_dir, threads=args.threads, force=args.force)
                z = rec["zsq"]
                print(f"    top1 {(z.get('metrics') or {}).get('top1')}  wall {z.get('wall_s')} s", flush=True)
            else:
                w, a, s = payload
                path.parent.mkdir(parents=True, exist_ok=True)
                rec = run_peer(kind, peer_cmd(kind, w, a, s, path, args), path, args.threads)
                print(f"    top1 {rec.get('top1')}  wall {rec.get('wall_s_no_eval')} s "
                      f"(process {rec.get('process_wall_s')} s)", flush=True)
        except RuntimeError as e:
            failures += 1
            print(f"    {e}", file=sys.stderr, flush=True)
    if failures:
        print(f"{failures} row(s) failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
