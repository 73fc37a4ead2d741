"""Shared test set-up: the read-only assets are ZSQ_HOME, everything written goes to a temp ZSQ_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ASSETS = SHARED / "assets"
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


@pytest.fixture(autouse=True, scope="session")
def _zsq_env(tmp_path_factory):
    old = {k: os.environ.get(k) for k in ("ZSQ_HOME", "ZSQ_CACHE")}
    os.environ["ZSQ_HOME"] = str(ASSETS)
    os.environ["ZSQ_CACHE"] = str(tmp_path_factory.mktemp("zsq_cache"))
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

    x, y = load_images(str(CIFAR_TEST), resnet20.zsq_info.preprocess, 64, seed=0)
    return x, y
