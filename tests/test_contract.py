"""One contract over every registered recipe (scikit-learn's ``test_common.py`` / ``parametrize_with_checks``).

The recipes come from the registry (``zsq.api.list_methods()``, ``zsq.recipes.RECIPES``), never from a
typed-out list: a recipe registered tomorrow is checked tomorrow. For each recipe:

* a smoke run (``budget="smoke"``, W4A4, seed 0) on the zoo model its protocol targets
  (``cifar10_vit_tiny`` for the ViT protocols, ``cifar10_resnet20`` otherwise), its synthetic set shrunk
  through the documented ``--synth-set`` settings only (``conftest.smoke_synth_overrides``);
* every quantizer's output, seen through forward hooks on a batch of real images, on at most ``2^b``
  levels (per output channel for weights, per tensor / channel for activations), and every Conv2d / Linear
  quantized; the saved ``int_weights`` of ``qmodel.pt`` on at most ``2^b`` codes per channel that give back
  the weights the model computes with;
* ``zsq.save`` then ``zsq.load``: ``zsq.json`` holds the contract's fields and the resolved recipe, and the
  rebuilt model's outputs on the batch are ``torch.equal`` to the original's;
* every documented setting (``zsq.settings``) of the recipe's quantizer / pre-step accepted in its
  command-line spelling, and, once per quantizer kind, a bad value refused by ``zsq quantize`` with exit 2.
  (``tests/test_settings.py`` checks that every key refuses a bad value in-process; not repeated here.)

A recipe whose parts need an optional extra (``pyproject.toml``'s ``[project.optional-dependencies]``,
e.g. ``genq``) that is not installed is skipped, naming the extra and the missing packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import zsq
from zsq import api
from zsq.recipes import QUANTIZERS, RECIPES
from zsq.record import model_info

from conftest import (CIFAR_TEST, SMOKE_BITS, smoke_fp_model, smoke_model_id as model_id, smoke_quantize,
                      smoke_synth_overrides)

#: every registered recipe, in registration order (``list_methods`` imports the catalogue that registers them)
NAMES = [m["name"] for m in api.list_methods()]
#: the smoke runs (conftest.smoke_quantize): W4A4, the smoke budget's synthetic set shrunk to at most 16 images
#: in fp32 through --synth-set; recipes sharing a synthesizer and its settings share one set (cached by key
#: under the session's ZSQ_CACHE)
W_BITS, A_BITS = SMOKE_BITS
BATCH = 16  # real test images through every model for the level and round-trip checks

#: the fields zsq.json carries (../shared/docs/design.md, "zsq.json")
JSON_FIELDS = {"schema_version", "model", "recipe", "protocol", "bits", "budget", "seed", "synthetic", "versions",
               "machine", "wall_s", "peak_rss_mb", "size", "metrics", "n_eval", "eval_path"}

pytestmark = pytest.mark.usefixtures("one_thread")


# -------------------------------------------------------------------------------------------------
# what the registry says about a recipe
# -------------------------------------------------------------------------------------------------

def _extras() -> dict[str, list[str]]:
    """zsq's optional extras -> the distributions each needs (installed metadata, else pyproject.toml)."""
    try:
        reqs = importlib.metadata.requires("zsq") or []
    except importlib.metadata.PackageNotFoundError:  # a source checkout that is not installed
        import tomllib

        doc = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
        return {k: [re.split(r"[ <>=!;\[]", r)[0] for r in v]
                for k, v in doc["project"].get("optional-dependencies", {}).items()}
    out: dict[str, list[str]] = {}
    for r in reqs:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        if m:
            out.setdefault(m.group(1), []).append(re.split(r"[ <>=!;\[]", r)[0])
    return out


def missing_extra(name: str) -> str | None:
    """Why a recipe cannot run here, or None: one of its parts (the recipe, its synthesizer, quantizer or
    pre-step) is an optional extra whose packages are not importable."""
    r = RECIPES[name]
    extras = _extras()
    for part in dict.fromkeys(p for p in (r.name, r.synth, r.quant, r.pre) if p):
        if part in extras:
            missing = [d for d in extras[part] if importlib.util.find_spec(d.replace("-", "_")) is None]
            if missing:
                return (f"recipe {name} needs the optional extra zsq[{part}] ({', '.join(missing)} not installed: "
                        f"pip install 'zsq[{part}]')")
    return None


# -------------------------------------------------------------------------------------------------
# the checks (plain functions: the self-checks below run them on deliberately broken recipes)
# -------------------------------------------------------------------------------------------------

def _per_channel_levels(t: torch.Tensor, axis: int) -> int:
    t = t.detach().movedim(axis, 0).reshape(t.shape[axis], -1)
    return max(len(torch.unique(row)) for row in t)


def check_levels(q: nn.Module, x: torch.Tensor, w_bits: int = W_BITS, a_bits: int = A_BITS) -> None:
    """Every quantizer's output on the batch ``x`` (forward hooks) on at most 2^bits levels: weights per
    output channel, activations per tensor (per channel when the quantizer is per-channel). Every Conv2d /
    Linear is a quantized layer whose weight quantizer ran, at W bits or 8 (the protocols' first / last
    layers), and at least one activation quantizer ran, at A bits or 8."""
    from zsq.quant.modules import QUANT_LAYERS, Quantizer

    plain = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYERS)]
    assert not plain, f"layers left unquantized: {plain[:5]}"
    layers = {n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert layers, "no quantized layer"
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, o.detach()))
             for n, m in q.named_modules() if isinstance(m, Quantizer)]
    try:
        with torch.inference_mode():
            q(x)
    finally:
        for h in hooks:
            h.remove()
    w_seen = {n.rsplit(".", 1)[0] for n in seen if n.rsplit(".", 1)[-1] == "wq"}
    assert layers <= w_seen, f"weight quantizers that never ran: {sorted(layers - w_seen)[:5]}"
    w_bits_seen, a_bits_seen = set(), set()
    for n, out in seen.items():
        qz = q.get_submodule(n)
        is_weight = n.rsplit(".", 1)[-1] == "wq"
        assert qz.mode == "quant", f"{n}: mode {qz.mode}"
        (w_bits_seen if is_weight else a_bits_seen).add(qz.bits)
        if is_weight:
            levels = _per_channel_levels(out, qz.ch_axis)
        elif qz.per_channel:
            levels = _per_channel_levels(out, qz.ch_axis % out.dim())
        else:
            levels = len(torch.unique(out))
        assert levels <= 2 ** qz.bits, f"{n}: {levels} levels at {qz.bits} bits"
    assert w_bits in w_bits_seen, f"no weight quantizer at {w_bits} bits: {w_bits_seen}"
    assert w_bits_seen <= {w_bits, 8}, f"weight bits {w_bits_seen}"
    assert a_bits_seen and a_bits_seen <= {a_bits, 8}, f"activation bits {a_bits_seen}"


def check_int_weights(q: nn.Module, out: Path) -> None:
    """``qmodel.pt``'s ``int_weights``: one entry per quantized layer, codes in [qmin, qmax] on at most
    2^bits values per output channel, and ``(codes - zero_point) * scale`` the weights the model computes
    with (rtol 1e-5, atol 1e-6; a step is > 1e-4 here, so a code off by one fails by 100x the tolerance)."""
    from zsq.quant.modules import QUANT_LAYERS

    payload = torch.load(out / "qmodel.pt", map_location="cpu", weights_only=True)
    codes_of = payload["int_weights"]
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS) and m.wq.bits <= 8}
    assert set(codes_of) == set(layers)
    for n, m in layers.items():
        wq, codes = m.wq, codes_of[n]
        assert codes.shape == m.weight.shape and not codes.is_floating_point(), n
        assert int(codes.min()) >= wq.qmin and int(codes.max()) <= wq.qmax, n
        assert _per_channel_levels(codes, 0) <= 2 ** wq.bits, n
        shape = [-1] + [1] * (codes.dim() - 1)
        s = wq.scale.detach().reshape(shape) if wq.per_channel else wq.scale.detach().reshape(())
        z = wq.zero_point.detach().reshape(shape) if wq.per_channel else wq.zero_point.detach().reshape(())
        with torch.inference_mode():
            torch.testing.assert_close((codes.float() - z) * s, m.qweight(), rtol=1e-5, atol=1e-6, msg=n)


def check_round_trip(q: nn.Module, out: Path, x: torch.Tensor, name: str) -> None:
    """``zsq.json`` holds the contract's fields and the resolved recipe; ``zsq.load`` rebuilds a model
    whose outputs on ``x`` are ``torch.equal`` to the original's."""
    res = api.resolve(name, budget="smoke")
    meta = json.loads((out / "zsq.json").read_text())
    assert JSON_FIELDS <= set(meta), JSON_FIELDS - set(meta)
    assert meta["recipe"]["name"] == name
    assert (meta["recipe"]["pre"], meta["recipe"]["synth"], meta["recipe"]["quant"]) == (res.pre, res.synth, res.quant)
    assert meta["recipe"]["hparams"] == json.loads(json.dumps(res.hparams))
    assert (meta["protocol"], meta["budget"], meta["seed"]) == (res.protocol, "smoke", 0)
    assert meta["bits"] == {"w": W_BITS, "a": A_BITS}
    assert meta["model"]["id"] == model_id(name)
    n_images = (smoke_synth_overrides(name) or {}).get("n_images", 0)
    assert meta["synthetic"]["n_images"] == n_images
    q2 = zsq.load(out)
    with torch.inference_mode():
        y, y2 = q(x), q2(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y2), f"max |diff| {float((y - y2).abs().max())}"


# -------------------------------------------------------------------------------------------------
# shared set-up
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batches():
    """``batches(model_id)``: the first-drawn real test images (seed 0) of that model's preprocessing."""
    from zsq.data.eval import load_images

    cache: dict[str, torch.Tensor] = {}

    def get(mid: str) -> torch.Tensor:
        if mid not in cache:
            model = zsq.load_model(mid)
            cache[mid] = load_images(str(CIFAR_TEST), model_info(model).preprocess, BATCH, seed=0)[0]
        return cache[mid]

    return get


# -------------------------------------------------------------------------------------------------
# the contract
# -------------------------------------------------------------------------------------------------

def test_registry_is_not_empty():
    assert len(NAMES) == len(RECIPES) > 0 and len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_contract(name, smoke_qmodel, batches, tmp_path):
    why = missing_extra(name)
    if why:
        pytest.skip(why)
    q = smoke_qmodel(name)
    x = batches(model_id(name))
    check_levels(q, x)
    zsq.save(q, tmp_path / "out")
    check_int_weights(q, tmp_path / "out")
    check_round_trip(q, tmp_path / "out", x, name)


def _valid_values(setting, current):
    """Command-line spellings (``--set KEY=TEXT``) of valid values of ``setting``: the recipe's own value
    when it has one, every choice of a string setting, both booleans, null when optional."""
    texts = []
    if current is not None:
        texts.append(current if isinstance(current, str) else json.dumps(current))
    kind = setting.kind
    if kind == "str":
        texts += list(setting.choices)
    elif kind == "bool":
        texts += ["true", "false"]
    elif current is None:
        lo = setting.minimum if setting.minimum is not None else 1
        if kind == "int":
            texts.append(str(int(max(lo, 1))))
        elif kind in ("float", "k"):
            texts.append(str(float(max(lo, 0.5))))
        elif kind in ("ints", "floats"):
            item = int(max(lo, 1)) if kind == "ints" else float(max(lo, 0.5))
            texts.append(json.dumps([item] * (setting.length or 2)))
    if setting.optional:
        texts.append("null")
    return texts


def _cli_value(text: str):
    """What ``zsq quantize --set KEY=TEXT`` hands on: TEXT read as JSON, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.mark.parametrize("name", NAMES)
def test_every_documented_setting_is_accepted(name):
    """Every key the settings table declares for the recipe's quantizer (and pre-step) takes a valid value
    in its command-line spelling, converted to the declared type."""
    from zsq.settings import settings_table

    r = RECIPES[name]
    table = settings_table()
    owners = [r.quant] + ([f"pre:{r.pre}"] if r.pre else [])
    keys = {k: table[o][k] for o in reversed(owners) for k in table[o]}  # the quantizer's declaration wins
    assert keys, f"{name}: no documented setting"
    defaults = api.resolve(name, budget="smoke").hparams
    for k, setting in keys.items():
        for text in _valid_values(setting, defaults.get(k)):
            got = api.resolve(name, budget="smoke", hparams={k: _cli_value(text)}).hparams[k]
            expect = setting.check(k, _cli_value(text))
            assert got == expect and type(got) is type(expect), (name, k, text, got)
            if setting.kind == "bool":
                assert got is (text == "true"), (name, k, text)
            if setting.kind == "str":
                assert got == text, (name, k, text)


def _bad_text(setting) -> str:
    return {"str": "bogus", "bool": "maybe", "int": "many", "float": "fast", "floats": "x", "ints": "x",
            "k": "x"}[setting.kind]


#: one recipe per quantizer kind (the first registered recipe that uses it)
QUANT_KINDS = {}
for _n in NAMES:
    QUANT_KINDS.setdefault(RECIPES[_n].quant, _n)


@pytest.mark.parametrize("quant", list(QUANT_KINDS))
def test_cli_refuses_a_bad_setting_with_exit_2(quant, tmp_path, capsys):
    """``zsq quantize ... --set KEY=BAD``: exit 2, one line naming the key, nothing written; once per
    quantizer kind (a key with choices when it has one)."""
    from zsq import cli
    from zsq.settings import settings_table

    name = QUANT_KINDS[quant]
    table = settings_table()[quant]
    key = min(table, key=lambda k: (table[k].kind != "str", table[k].kind != "bool", k))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", model_id(name), "--recipe", name, "--budget", "smoke", "-q",
                  "--set", f"{key}={_bad_text(table[key])}", "-o", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"setting {key}" in lines[0], err
    assert "Traceback" not in err and not out.exists()


# -------------------------------------------------------------------------------------------------
# the contract can fail: deliberately broken recipes
# -------------------------------------------------------------------------------------------------

#: a fast recipe for the self-checks: the first registered one that synthesizes nothing
FAST = next(n for n in NAMES if RECIPES[n].synth is None and RECIPES[n].kind == "PTQ")


def _broken(monkeypatch, quant: str, breaks):
    """Register, for this test, ``quant`` as the real quantizer followed by ``breaks(qmodel)``."""
    monkeypatch.undo()  # the real quantizer, not an earlier broken one
    real = QUANTIZERS[quant]

    def run(ctx):
        q = real(ctx)
        breaks(q)
        return q

    monkeypatch.setitem(QUANTIZERS._items, quant, run)


def test_levels_check_fails_on_a_recipe_that_skips_weight_quantization(batches, monkeypatch):
    from zsq.quant.modules import quantizers

    q = smoke_quantize(FAST)
    check_levels(q, batches(model_id(FAST)))  # the real recipe passes

    def skip_weights(q):
        for _, wq in quantizers(q, "weight"):
            wq.mode = "off"

    _broken(monkeypatch, RECIPES[FAST].quant, skip_weights)
    with pytest.raises(AssertionError, match="mode off"):
        check_levels(smoke_quantize(FAST), batches(model_id(FAST)))

    def skip_weights_quietly(q):  # still reports "quant", but computes with FP weights
        for _, wq in quantizers(q, "weight"):
            wq.forward = lambda w: w

    _broken(monkeypatch, RECIPES[FAST].quant, skip_weights_quietly)
    with pytest.raises(AssertionError, match=r"levels at \d bits"):
        check_levels(smoke_quantize(FAST), batches(model_id(FAST)))

    def wider_activations(q):  # activations on 2^8 levels while the run says A4
        for _, aq in quantizers(q, "act"):
            if aq.bits == A_BITS:
                aq.forward = lambda t: torch.round(t * 64) / 64

    _broken(monkeypatch, RECIPES[FAST].quant, wider_activations)
    with pytest.raises(AssertionError, match=r"levels at \d bits"):
        check_levels(smoke_quantize(FAST), batches(model_id(FAST)))


def test_round_trip_check_fails_when_the_saved_model_differs(batches, tmp_path):
    q = smoke_quantize(FAST)
    x = batches(model_id(FAST))
    zsq.save(q, tmp_path / "out")
    check_int_weights(q, tmp_path / "out")
    check_round_trip(q, tmp_path / "out", x, FAST)
    payload = torch.load(tmp_path / "out" / "qmodel.pt", weights_only=True)
    k = next(k for k in payload["state_dict"] if k.endswith("wq.scale"))
    payload["state_dict"][k] = payload["state_dict"][k] * 1.5  # one layer's weight steps changed on disk
    torch.save(payload, tmp_path / "out" / "qmodel.pt")
    with pytest.raises(AssertionError, match=re.escape("max |diff|")):
        check_round_trip(q, tmp_path / "out", x, FAST)
