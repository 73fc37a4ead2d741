"""Shared test set-up: the read-only assets are ZSQ_HOME, everything written goes to a temp ZSQ_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# ZSQ_TEST_ASSETS: the assets somewhere else (the GPU machine, where ../shared does not travel: bench/gpu_bench.py)
ASSETS = Path(os.environ["ZSQ_TEST_ASSETS"]) if os.environ.get("ZSQ_TEST_ASSETS") else SHARED / "assets"
CIFAR_TEST = ASSETS / "cifar10-jpeg" / "test.tar"


def load_bench_script(name: str):
    """``bench/<name>.py`` imported as the module ``zsq_bench_<name>`` (registered in ``sys.modules``, once),
    with ``bench/`` on ``sys.path`` while it loads (the scripts import their sibling ``valsplit``)."""
    import importlib.util
    import sys

    mod_name = f"zsq_bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    bench = str(ROOT / "bench")
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    sys.path.insert(0, bench)
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    finally:
        sys.path.remove(bench)
    return mod


def load_bench_results(name: str):
    """``bench/results/<name>.py`` (a section of docs/results.md), imported as ``results.<name>`` the way
    ``bench/report.py`` and the bench scripts import it, with ``bench/`` on ``sys.path`` while it loads."""
    import importlib
    import sys

    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(f"results.{name}")
    finally:
        sys.path.remove(bench)


@pytest.fixture(autouse=True, scope="session")
def _zsq_env(tmp_path_factory):
    old = {k: os.environ.get(k) for k in ("ZSQ_HOME", "ZSQ_CACHE", "ZSQ_EVAL_WORKERS")}
    os.environ["ZSQ_HOME"] = str(ASSETS)
    os.environ["ZSQ_CACHE"] = str(tmp_path_factory.mktemp("zsq_cache"))
    os.environ["ZSQ_EVAL_WORKERS"] = "0"  # evaluation decodes in-process (tests that test workers pass them)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def one_thread():
    """One torch thread for the test (small tensors: less overhead, results independent of the host)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def resnet20():
    import zsq

    os.environ.setdefault("ZSQ_HOME", str(ASSETS))
    return zsq.load_model("cifar10_resnet20")


@pytest.fixture(scope="session")
def real_batch(resnet20):
    """64 real test images (6-7 per class), normalised for ResNet-20."""
    from zsq.data.eval import load_images
    from zsq.record import model_info

    x, y = load_images(str(CIFAR_TEST), model_info(resnet20).preprocess, 64, seed=0)
    return x, y


# -- the smoke run of every recipe, shared (tests/test_contract.py and the method tests) ------------------------

#: the smoke runs' bits and their synthetic sets: the smoke budget's set shrunk to at most SMOKE_N_IMAGES images
#: and made in fp32, through the documented --synth-set settings (bf16 autocast has no native kernel on CPUs
#: without AVX512-BF16, where the smoke budget's bf16 synthesis is ~10x slower)
SMOKE_BITS = (4, 4)
SMOKE_N_IMAGES = 16


def smoke_model_id(name: str) -> str:
    """The zoo model a recipe's smoke run uses: the ViT protocols place quantizers on a vision transformer's
    attention matmuls (``cifar10_vit_tiny``); every other protocol targets CNNs (``cifar10_resnet20``)."""
    from zsq.recipes import RECIPES

    return "cifar10_vit_tiny" if RECIPES[name].protocol.startswith("vit") else "cifar10_resnet20"


def smoke_synth_overrides(name: str) -> dict | None:
    """``--synth-set`` of a recipe's smoke run (None when it runs no synthesizer)."""
    from zsq import api
    from zsq.synth import get_synthesizer

    res = api.resolve(name, budget="smoke")
    if not res.synth:
        return None
    overrides, n = api.synth_settings(res)
    cfg = get_synthesizer(res.synth, "smoke", {**overrides, **({"n_images": n} if n is not None else {})}).config
    out = {"n_images": min(int(cfg.n_images), SMOKE_N_IMAGES)}
    if getattr(cfg, "precision", "fp32") != "fp32":
        out["precision"] = "fp32"
    return out


_SMOKE_MODELS: dict = {}


def smoke_fp_model(name: str):
    """The (shared, session-wide) FP zoo model of a recipe's smoke run."""
    import zsq

    mid = smoke_model_id(name)
    if mid not in _SMOKE_MODELS:
        _SMOKE_MODELS[mid] = zsq.load_model(mid)
    return _SMOKE_MODELS[mid]


def smoke_quantize(name: str):
    """A fresh smoke run of recipe ``name`` (W4A4, seed 0, the settings above)."""
    import torch

    import zsq

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return zsq.quantize(smoke_fp_model(name), name, *SMOKE_BITS, budget="smoke", seed=0, progress=False,
                            synth_overrides=smoke_synth_overrides(name))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_qmodel():
    """``smoke_qmodel(name)``: recipe ``name``'s smoke run, run once per session (the contract test checks it;
    method tests add their own checks on the same run instead of running the recipe again). Do not modify it."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = smoke_quantize(name)
        return cache[name]

    return get
