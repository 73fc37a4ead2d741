"""Seed-0 fingerprints of fast configurations: top-1 on the first 1,000 JPEG-CIFAR-10 test images and
the SHA-256 of every tensor in the saved ``qmodel.pt``. A change that must keep results identical (a
redesign, a memory or speed fix, a new device path) is checked by running this before and after and
comparing the two JSON files::

    python bench/fingerprints.py -o /tmp/before.json            # on the old tree (PYTHONPATH=old/src)
    python bench/fingerprints.py -o /tmp/after.json --compare /tmp/before.json

The configurations cover every quantizer kind (synthesis-free, range calibration, block reconstruction,
QAT, generator) at tiny budgets; ``--only TEXT`` runs the ones whose id contains TEXT. One thread, so the
hashes do not depend on the host's core count; synthesis in bf16 (``ZSQ_PRECISION=bf16``, emulated and slow
on a CPU without native bf16), so they do not depend on its bf16 support.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CIFAR_TEST = ASSETS / "cifar10-jpeg" / "test.tar"

# (recipe, protocol or None for the recipe's own, w, a, budget)
CONFIGS = [
    ("squant", "fixed", 4, 4, "default"),
    ("squant", "fixed", 3, 3, "default"),
    ("dfq", "fixed", 4, 4, "default"),
    ("udfc", "fixed", 4, 4, "default"),
    ("zeroq", "ptq", 4, 8, "smoke"),
    ("zeroq", "ptq", 4, 4, "smoke"),
    ("genie", None, 4, 4, "smoke"),
    ("sadag", None, 3, 3, "smoke"),
    ("qat-zeroq", None, 4, 4, "smoke"),
    ("gdfq", None, 4, 4, "smoke"),
    ("adasg", None, 4, 4, "smoke"),
]


def config_id(recipe, protocol, w, a, budget) -> str:
    return f"{recipe}__{protocol or 'native'}__W{w}A{a}__{budget}"


def tensor_hashes(qmodel_pt: Path) -> dict[str, str]:
    """name -> sha256 of dtype, shape and bytes, for every tensor in qmodel.pt (state dict and integer codes)."""
    import torch

    payload = torch.load(qmodel_pt, map_location="cpu", weights_only=True)
    out = {}
    for section in ("state_dict", "int_weights"):
        for k, v in sorted(payload.get(section, {}).items()):
            if isinstance(v, torch.Tensor):
                h = hashlib.sha256(f"{v.dtype}:{tuple(v.shape)};".encode())
                h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                out[f"{section}/{k}"] = h.hexdigest()
    return out


def run_one(cfg, work: Path) -> dict:
    import torch

    import zsq

    recipe, protocol, w, a, budget = cfg
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    q = zsq.quantize("cifar10_resnet20", recipe=recipe, w_bits=w, a_bits=a, protocol=protocol, budget=budget,
                     seed=0, progress=False)
    wall = time.perf_counter() - t0
    r = zsq.evaluate(q, str(CIFAR_TEST), limit=1000, progress=False)
    out = work / config_id(*cfg)
    zsq.save(q, out, metrics=r, overwrite=True)
    hashes = tensor_hashes(out / "qmodel.pt")
    all_h = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    return {"id": config_id(*cfg), "top1": r["top1"], "n": r["n"], "sha256": all_h, "n_tensors": len(hashes),
            "tensors": hashes, "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True, help="JSON file to write (updated after every configuration)")
    ap.add_argument("--only", default=None, help="run only configurations whose id contains this text")
    ap.add_argument("--compare", default=None, help="a JSON file from an earlier run to compare against")
    args = ap.parse_args(argv)
    os.environ.setdefault("ZSQ_HOME", str(ASSETS))
    os.environ.setdefault("ZSQ_CACHE", tempfile.mkdtemp(prefix="zsq_fp_cache_"))
    # synthesis's precision "auto" is bf16 only on CPUs with native bf16: pin it, so the hashes compare
    # across machines (the stored ones were made in bf16)
    os.environ.setdefault("ZSQ_PRECISION", "bf16")
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in CONFIGS:
            cid = config_id(*cfg)
            if args.only and args.only not in cid:
                continue
            if cid in res:
                print(f"{cid}: done before", file=sys.stderr)
                continue
            res[cid] = run_one(cfg, Path(tmp))
            print(f"{cid}: top1 {res[cid]['top1']:.2f} sha {res[cid]['sha256'][:12]} ({res[cid]['wall_s']} s)",
                  file=sys.stderr)
            out.write_text(json.dumps(res, indent=1, sort_keys=True))
    rc = 0
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        for cid, r in sorted(res.items()):
            o = old.get(cid)
            if o is None:
                print(f"{cid}: not in {args.compare}")
                continue
            same = o["sha256"] == r["sha256"] and o["top1"] == r["top1"]
            diff = [k for k in o["tensors"] if o["tensors"][k] != r["tensors"].get(k)]
            print(f"{cid}: top1 {o['top1']:.2f} -> {r['top1']:.2f}  tensors {'identical' if same else f'{len(diff)} differ'}")
            rc |= 0 if same else 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
