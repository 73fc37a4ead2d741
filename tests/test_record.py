"""The record a model carries (zsq.record.QuantizedModel in ``module.zsq_record``): one attribute with the
model info, the layout, the provenance and each method's record; export, report and eval read it;
outputs written in the format from before the record load; zsq.json keeps its fields."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch
from torch import nn

import zsq
from zsq.models.preprocess import Preprocess
from zsq.models.registry import ModelInfo
from zsq.quant.modules import QUANT_LAYERS, Quantizer, weight_codes
from zsq.record import ATTR, QuantizedModel, model_info, record_of

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "zsq"

#: the top-level fields of zsq.json (../shared/docs/design.md), in the order zsq.save writes them
ZSQ_JSON_FIELDS = ["schema_version", "model", "recipe", "protocol", "bits", "budget", "seed", "synthetic", "policy",
                   "layout", "versions", "machine", "wall_s", "cpu_s", "peak_rss_mb", "size", "metrics", "n_eval",
                   "eval_path"]


def _dfq(resnet20):
    """W8A8 dfq (pre-step dfq, then the data-free quantizer): no synthesis, two method records."""
    return zsq.quantize(resnet20, "dfq", 8, 8, progress=False)


def test_a_loaded_model_carries_its_info_in_the_record(resnet20):
    rec = getattr(resnet20, ATTR)
    assert isinstance(rec, QuantizedModel) and record_of(resnet20) is rec
    assert model_info(resnet20) is rec.model and rec.model.id == "cifar10_resnet20"
    assert rec.layout is None and rec.result == {} and rec.methods == {}
    bare = nn.Linear(2, 2)
    assert model_info(bare) is None and not hasattr(bare, ATTR)  # reading attaches nothing
    assert record_of(bare) == QuantizedModel() and hasattr(bare, ATTR)
    assert ATTR not in str(list(bare.state_dict()))


def test_a_quantized_model_carries_one_record(resnet20):
    q = _dfq(resnet20)
    rec = record_of(q)
    # one attribute: none of the former zsq_info / zsq_layout / zsq_result / zsq_<method> ones
    assert [k for k in vars(q) if k.startswith("zsq_")] == [ATTR]
    assert rec.model is model_info(resnet20)
    assert rec.layout.protocol == "fixed" and (rec.layout.w_bits, rec.layout.a_bits) == (8, 8)
    assert set(rec.layout.weights) == {n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert rec.result["recipe"]["name"] == "dfq" and rec.result["recipe"]["pre"] == "dfq"
    assert rec.result["bits"] == {"w": 8, "a": 8} and rec.result["protocol"] == "fixed"
    assert set(rec.methods) == {"dfq", "datafree"}
    assert rec.methods["dfq"]["absorbed"] >= 0 and rec.methods["datafree"]["method"] == "dfq"
    assert not any(ATTR in k for k in q.state_dict())
    assert record_of(resnet20).layout is None and record_of(resnet20).methods == {}  # the FP model is untouched


def test_export_report_and_eval_read_the_record(resnet20, real_batch):
    from zsq.data.eval import evaluate
    from zsq.export.onnx import _input_shape
    from zsq.report import fp_reference

    q = _dfq(resnet20)
    fp, ref = fp_reference(q, {"model": {"id": "cifar10_resnet20"}, "recipe": record_of(q).result["recipe"]})
    assert record_of(ref).layout.to_dict() == record_of(q).layout.to_dict()
    assert _input_shape(q) == (3, 32, 32)
    small = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    assert _input_shape(small) == (3, 32, 32)  # no record: the default
    record_of(small).model = ModelInfo("toy", None, Preprocess(input_size=16), 10)
    assert _input_shape(small) == (3, 16, 16)
    # evaluate opens a path with the record's preprocessing
    tar = REPO.parent / "shared" / "assets" / "cifar10-jpeg" / "test.tar"
    assert evaluate(q, str(tar), limit=20, progress=False)["n"] == 20


def test_export_and_report_use_no_api_internals():
    """The weight codes are the quant layer's public weight_codes; export imports nothing of zsq.api."""
    for rel in ("export/onnx.py", "report.py", "data/eval.py"):
        tree = ast.parse((SRC / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("api"):
                assert rel != "export/onnx.py", f"{rel} imports zsq.api"
                assert not any(a.name.startswith("_") for a in node.names), (rel, [a.name for a in node.names])
    assert not hasattr(zsq.api, "_weight_codes")
    wq = Quantizer(4, symmetric=False, per_channel=True, channels=3)
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    wq.init_from_tensor(w)
    codes = weight_codes(wq, w)
    s, z = wq.scale.view(-1, 1), wq.zero_point.view(-1, 1)
    assert torch.equal(codes, codes.round()) and codes.min() >= wq.qmin and codes.max() <= wq.qmax
    with torch.no_grad():
        torch.testing.assert_close((codes - z) * s, wq(w), rtol=0, atol=1e-6)


def _save_as_before(q: nn.Module, out: Path) -> None:
    """OUT written the way zsq.save wrote it before the record (format zsq-qmodel-1), from the
    state dict and a literal copy of what the former attributes held, without calling zsq.save."""
    rec = record_of(q)
    info, lay, res = rec.model, rec.layout, rec.result
    out.mkdir(parents=True)
    int_w = {}
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS):
            int_w[name] = weight_codes(m.wq, m.weight.detach()).to(torch.int16 if m.wq.qmax > 127 else torch.int8)
    torch.save({
        "format": "zsq-qmodel-1",
        "model": {"id": info.id, "preprocess": info.preprocess.to_dict(), "num_classes": info.num_classes},
        "layout": {"protocol": res["protocol"], "w_bits": lay.w_bits, "a_bits": lay.a_bits, "policy": res["policy"]},
        "state_dict": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in q.state_dict().items()},
        "int_weights": int_w,
    }, out / "qmodel.pt")
    doc = {"schema_version": 1, "model": {"id": info.id, "weights_sha256": info.weights_sha256},
           **{k: res.get(k) for k in ("recipe", "protocol", "bits", "budget", "seed", "synthetic", "policy")},
           "layout": lay.to_dict(), "versions": {"zsq": "0.0.0"}, "machine": {"cpu": "?", "threads": 1, "processes": 1},
           "wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "peak_rss_mb": 1.0, "size": res["size"], "metrics": None,
           "n_eval": None, "eval_path": None}
    (out / "zsq.json").write_text(json.dumps(doc))


def test_an_output_written_before_the_record_loads(resnet20, real_batch, tmp_path):
    q = _dfq(resnet20)
    _save_as_before(q, tmp_path / "old")
    q2 = zsq.load(tmp_path / "old")
    rec, rec2 = record_of(q), record_of(q2)
    assert [k for k in vars(q2) if k.startswith("zsq_")] == [ATTR]
    assert rec2.model.id == "cifar10_resnet20" and rec2.model.preprocess == rec.model.preprocess
    assert rec2.layout.to_dict() == rec.layout.to_dict()
    for k in ("recipe", "protocol", "bits", "budget", "seed", "synthetic", "policy", "wall_s", "size"):
        assert rec2.result[k] == json.loads(json.dumps(rec.result[k])), k
    x, _ = real_batch
    with torch.inference_mode():
        assert torch.equal(q(x), q2(x))
    # and zsq.save of the loaded model writes the same zsq.json fields and the same integer weights
    zsq.save(q2, tmp_path / "new")
    old, new = (json.loads((tmp_path / d / "zsq.json").read_text()) for d in ("old", "new"))
    assert list(new) == ZSQ_JSON_FIELDS
    for k in ("model", "recipe", "protocol", "bits", "budget", "seed", "synthetic", "policy", "layout", "size"):
        assert new[k] == old[k], k
    p_old, p_new = (torch.load(tmp_path / d / "qmodel.pt", weights_only=True) for d in ("old", "new"))
    assert p_new.keys() == p_old.keys() and p_new["model"] == p_old["model"] and p_new["layout"] == p_old["layout"]
    for k, v in p_old["int_weights"].items():
        assert torch.equal(p_new["int_weights"][k], v), k
