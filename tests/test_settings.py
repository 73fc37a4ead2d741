"""Quantizer settings (issue 33, items 2 and 7): every ``--set`` / ``hparams=`` value is checked against its
declared type or choices before any work, with a one-line error and a suggestion; ``zsq methods`` shows the
settings a run actually uses, per budget, readable at 100 columns; ``zsq bench list`` prints clean lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from zsq.api import resolve
from zsq.errors import BadValueError, UnknownNameError
from zsq.recipes import HPARAM_KEYS, PRE_STEPS, QUANTIZERS, RECIPES

REPO = Path(__file__).resolve().parents[1]
BUDGETS = ("smoke", "default", "paper")


def _owners(r):
    return [r.quant] + ([f"pre:{r.pre}"] if r.pre else [])


# -------------------------------------------------------------------------------------------------
# the declaration table

def test_every_quantizer_and_pre_step_declares_exactly_its_keys():
    """One contract over every registered quantizer and pre-step: the settings table declares a type for
    each --set key, and no other key."""
    from zsq.settings import settings_table

    table = settings_table()
    owners = list(QUANTIZERS._items) + [f"pre:{p}" for p in PRE_STEPS._items]
    for o in owners:
        assert o in table, f"{o} declares no settings"
        assert set(table[o]) == set(HPARAM_KEYS[o]), (o, set(table[o]) ^ set(HPARAM_KEYS[o]))
    for name, r in RECIPES._items.items():
        for k in r.hparams:
            assert any(k in table[o] for o in _owners(r)), f"recipe {name}: hparam {k} has no declared setting"


@pytest.mark.parametrize("budget", BUDGETS)
def test_recipe_defaults_pass_their_declarations_unchanged(budget):
    """Every recipe's settings at every budget are valid and come back identical (value and type): the
    checks change nothing a valid run does."""
    from zsq.settings import check_hparams

    for name, r in RECIPES._items.items():
        h = resolve(name, budget=budget).hparams
        checked = check_hparams(h, _owners(r))
        assert checked == h, name
        assert {k: type(v) for k, v in checked.items()} == {k: type(v) for k, v in h.items()}, name
        # and the same values given explicitly (as --set would) resolve to the same settings
        assert resolve(name, budget=budget, hparams=dict(h)).hparams == h, name


def _bad_value(setting):
    return {"str": "bogus", "bool": "maybe", "int": "many", "float": "fast", "floats": "x", "ints": "x",
            "k": "x"}[setting.kind]


def _cases():
    from zsq.settings import settings_table

    table = settings_table()
    out = []
    for name, r in RECIPES._items.items():
        keys = (set(HPARAM_KEYS[r.quant]) | set(HPARAM_KEYS.get(f"pre:{r.pre}", ()))) - {"stop_at"}
        for k in sorted(keys):
            s = next(table[o][k] for o in _owners(r) if k in table[o])
            out.append((name, k, _bad_value(s)))
    return out


def test_every_setting_of_every_recipe_refuses_a_bad_value():
    """For every recipe and every key it takes: a value of the wrong type, or outside the choices, is a
    one-line BadValueError naming the key (the old code accepted most of them until the quantizer ran)."""
    cases = _cases()
    assert len(cases) > 300
    for name, key, bad in cases:
        with pytest.raises(BadValueError) as e:
            resolve(name, budget="smoke", hparams={key: bad})
        msg = str(e.value)
        assert f"setting {key} " in msg and "\n" not in msg, (name, key, msg)


@pytest.mark.parametrize("recipe,hp,needles", [
    ("zeroq", {"w_observer": "bogus"}, ["w_observer", "minmax", "percentile", "mse", "'bogus'"]),
    ("zeroq", {"w_observer": "MSE"}, ["w_observer", "'MSE'", "did you mean mse?"]),
    ("zeroq", {"a_observer": "minmx"}, ["a_observer", "did you mean minmax"]),
    ("zeroq", {"w_observer": "ema"}, ["w_observer", "one of minmax, percentile, mse"]),  # no weight EMA
    ("zeroq", {"calib_batch": 0}, ["calib_batch", ">= 1"]),
    ("squant", {"rounding": "squant_k"}, ["rounding", "did you mean squant-k"]),
    ("dfq", {"relu6": "Replace"}, ["relu6", "did you mean replace"]),
    ("dfq", {"k": {"4": "wide"}}, ["k[4]"]),
    ("genie", {"iters": 2.5}, ["iters", "an integer"]),
    ("genie", {"b_range": [20]}, ["b_range", "a list of 2 numbers"]),
    ("genie", {"granularity": "blocks"}, ["granularity", "did you mean block"]),
    ("qat-zeroq", {"kd_reduction": "sum"}, ["kd_reduction", "batchmean, mean"]),
    ("qat-zeroq", {"nesterov": 2}, ["nesterov", "true or false"]),
    ("gdfq", {"lr_schedule": "step"}, ["lr_schedule", "multistep, cosine"]),
    ("autorecon", {"arc_genotype": "cifar-10"}, ["arc_genotype", "did you mean cifar10"]),
])
def test_bad_values_name_the_choices_and_suggest(recipe, hp, needles):
    with pytest.raises(BadValueError) as e:
        resolve(recipe, budget="smoke", hparams=hp)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_strings_are_read_as_the_declared_type_through_the_api():
    """``hparams=`` strings mean what they say (``bool("false")`` is True: the data-free quantizers read
    "false" as true before); values of the right type pass unchanged."""
    assert resolve("squant", hparams={"bias_correction": "false"}).hparams["bias_correction"] is False
    assert resolve("dfq", hparams={"cle": "0"}).hparams["cle"] is False
    assert resolve("zeroq", hparams={"calib_batch": "64"}).hparams["calib_batch"] == 64
    assert resolve("genie", hparams={"lr_round": "2e-3"}).hparams["lr_round"] == 2e-3
    h = resolve("zeroq", hparams={"w_observer": "percentile", "calib_batch": 32, "sequential": True}).hparams
    assert (h["w_observer"], h["calib_batch"], h["sequential"]) == ("percentile", 32, True)
    assert resolve("squant", hparams={"stats_batch": None}).hparams["stats_batch"] is None
    assert resolve("squant", hparams={"k": 3}).hparams["k"] == 3
    assert resolve("gdfq", hparams={"milestones": [0.5]}).hparams["milestones"] == [0.5]


def test_unknown_keys_still_refused_first():
    with pytest.raises(UnknownNameError, match="did you mean w_observer"):
        resolve("zeroq", hparams={"w_obsrver": "bogus"})


def test_api_checks_settings_before_loading_the_model():
    """zsq.quantize refuses a bad setting before it loads anything (a model name that does not exist is
    never looked at)."""
    import zsq

    with pytest.raises(BadValueError, match="w_observer"):
        zsq.quantize("no_such_model_anywhere", "zeroq", 4, 4, budget="smoke", hparams={"w_observer": "bogus"},
                     progress=False)


# -------------------------------------------------------------------------------------------------
# the configs (zsq.config, issue 35): one converter, one from_dict / to_dict, the table read from them

def _configs():
    from zsq.ptq.datafree import CONFIGS
    from zsq.ptq.dfq import DFQPreConfig
    from zsq.ptq.quantizers import CalibConfig

    return {**CONFIGS, "calib": CalibConfig, "calib-sparse": CalibConfig, "pre:dfq": DFQPreConfig}


def test_settings_table_is_read_from_the_configs():
    from zsq.settings import settings_table

    table = settings_table()
    for owner, cls in _configs().items():
        assert table[owner] == cls.settings(), owner
        assert HPARAM_KEYS[owner] == frozenset(cls.settings()), owner



def test_settings_table_is_read_from_the_reconstruction_qat_and_generator_configs():
    """Reconstruction (ReconConfig + the engine's ReconEngineConfig, + BrecqActConfig for brecq), the fixed-set
    QAT loop and the generator games: their keys' settings are the configs' (only ``stop_at`` of the QAT and
    generator trainers is declared by zsq.settings)."""
    from zsq.gen.loop import GenConfig
    from zsq.gen.objectives import GAMES
    from zsq.gen.quantizers import GAME_OF, LOOP_KEYS
    from zsq.ptq.reconstruct import RECON_METHODS, BrecqActConfig, ReconConfig, ReconEngineConfig
    from zsq.qat.engine import QATConfig
    from zsq.settings import settings_table

    table = settings_table()
    for m in RECON_METHODS:
        want = {**ReconConfig.settings(), **ReconEngineConfig.settings(),
                **(BrecqActConfig.settings() if m == "brecq" else {})}
        assert table[m] == want and HPARAM_KEYS[m] == frozenset(want), m
    assert {k: v for k, v in table["qat-kd"].items() if k != "stop_at"} == QATConfig.settings()
    loop = {k: v for k, v in GenConfig.settings().items() if k in LOOP_KEYS}
    for name, game in GAME_OF.items():
        assert {k: v for k, v in table[name].items() if k != "stop_at"} == {**loop, **GAMES[game].settings()}, name
    # the engine options' and BRECQ's activation pass's defaults, as the engine read them before
    assert ReconEngineConfig().to_dict() == {"ckpt_every_s": 120.0, "augment": "none", "augment_copies": 1,
                                             "augment_pad": 4, "w_observer": "mse", "stop_at": None}
    assert BrecqActConfig().to_dict() == {"lr_a": 4e-4, "iters_a": 5000}
    # the games' numbers are >= 0, latent_dim / g_steps / s_steps >= 1, as their __post_init__ says
    qimera = GAMES["qimera"].settings()
    assert qimera["mix_prob"].minimum == 0 and qimera["latent_dim"].minimum == 1 and qimera["mapping"].minimum is None
    assert GAMES["zaq"].settings()["s_steps"].minimum == 1


def test_reconstruction_qat_and_generator_configs_round_trip_and_refuse_alike():
    import json

    from zsq.gen.loop import GenConfig
    from zsq.gen.objectives import GAMES
    from zsq.ptq.reconstruct import BrecqActConfig, ReconConfig, ReconEngineConfig
    from zsq.qat.engine import QATConfig

    for cls in (ReconConfig, ReconEngineConfig, BrecqActConfig, QATConfig, GenConfig):
        assert cls.from_dict(json.loads(json.dumps(cls().to_dict()))) == cls(), cls.__name__
    for cls in GAMES.values():  # a game's to_dict also names the game
        d = json.loads(json.dumps(cls().to_dict()))
        assert cls.from_dict(d) == cls(), cls.__name__  # zsq.json's generator.game, as written
        assert d.pop("game") == cls.name and cls.from_dict(d) == cls(), cls.__name__
    with pytest.raises(BadValueError, match="cannot be read from the settings of game 'qimera'"):
        GAMES["gdfq"].from_dict(GAMES["qimera"]().to_dict())
    with pytest.raises(BadValueError, match=r"^QATConfig has no setting 'kd_reductin': did you mean kd_reduction\b"):
        QATConfig.from_dict({"kd_reductin": "mean"})
    with pytest.raises(BadValueError, match=r"^setting augment_copies must be >= 1, got 0$"):
        ReconEngineConfig.from_hparams({"augment_copies": 0, "iters": 5})
    with pytest.raises(BadValueError, match="setting lr_schedule must be one of multistep, cosine"):
        GenConfig.from_hparams({"lr_schedule": "step"})
    assert tuple(ReconEngineConfig.from_hparams({"stop_at": [0, 1, 2], "augment": "flip"}).stop_at) == (0, 1, 2)
    assert BrecqActConfig.from_hparams({"iters_a": "7", "lr_a": 1}) == BrecqActConfig(iters_a=7, lr_a=1.0)

def test_config_defaults_are_the_values_the_quantizers_read_before():
    """The defaults the quantizers wrote as ``h.get(key, default)`` before the configs (results unchanged)."""
    from zsq.ptq.bn_ranges import DEFAULT_K

    c = _configs()
    datafree = {"w_observer": "minmax", "a_observer": "minmax", "act_range": "ksigma", "k": DEFAULT_K,
                "stats_batch": None, "rounding": "nearest", "bias_correction": True, "bc_act": False,
                "udfc_act_noise": False, "udfc_out_noise": False, "udfc_clip": True, "udfc_cov": "noise",
                "udfc_fit": "mse", "threads": 1}
    assert c["dfq"]().to_dict() == c["udfc"]().to_dict() == datafree
    assert c["squant"]().to_dict() == {**datafree, "rounding": "squant", "bias_correction": False}
    assert c["calib"]().to_dict() == {"w_observer": "minmax", "a_observer": "minmax", "calib_batch": 256,
                                      "sequential": False}
    assert c["pre:dfq"]().to_dict() == {"cle": True, "cle_iters": 100, "absorb": True, "absorb_sigma": 3.0,
                                        "absorb_padded": False, "relu6": "skip", "threads": 1}


def test_config_round_trips_through_json():
    import json

    for cls in set(_configs().values()):
        c = cls()
        assert cls.from_dict(json.loads(json.dumps(c.to_dict()))) == c, cls.__name__


def test_config_unknown_key_and_bad_value_are_one_line_errors():
    c = _configs()
    with pytest.raises(BadValueError, match=r"^DataFreeConfig has no setting 'udfc_clp': did you mean udfc_clip\b"):
        c["udfc"].from_dict({"udfc_clp": False})
    with pytest.raises(BadValueError, match=r"^setting udfc_clip expects true or false, got 'maybe'$"):
        c["udfc"].from_dict({"udfc_clip": "maybe"})
    with pytest.raises(BadValueError, match="setting rounding must be one of .*did you mean squant-k"):
        c["squant"].from_dict({"rounding": "squant_k"})
    with pytest.raises(BadValueError, match="setting calib_batch must be >= 1"):
        c["calib"].from_hparams({"calib_batch": 0})


def test_quantizers_read_strings_as_their_type_without_the_api():
    """A QuantContext built without zsq.api (hparams unchecked) reads the same: "false" is False (``bool("false")``
    is True: the data-free quantizers and the dfq pre-step ran with the flag on before); other owners' keys
    are left to them."""
    c = _configs()
    assert c["udfc"].from_hparams({"udfc_clip": "false", "cle": "0"}).udfc_clip is False
    assert c["pre:dfq"].from_hparams({"cle": "0", "absorb_sigma": "2.5", "rounding": "squant"}) == \
        c["pre:dfq"](cle=False, absorb_sigma=2.5)
    assert c["calib"].from_hparams({"calib_batch": "64", "sequential": "yes"}) == c["calib"](calib_batch=64,
                                                                                             sequential=True)
    assert resolve("udfc", hparams={"udfc_clip": "false"}).hparams["udfc_clip"] is False


@pytest.mark.parametrize("text,value", [("yes", True), ("on", True), ("1", True), ("TRUE", True), ("no", False),
                                        ("off", False), ("0", False), ("False", False)])
def test_one_bool_reading_everywhere(text, value):
    """--set, --synth-set, QATConfig, GenConfig and the generator games read booleans alike (the games
    refused "yes" / "on" before)."""
    from zsq.config import to_bool
    from zsq.gen.loop import GenConfig
    from zsq.gen.objectives import get_game
    from zsq.qat.engine import QATConfig
    from zsq.synth import get_synthesizer

    assert to_bool(text, "x") is value
    assert get_game("qimera", {"mapping": text}).mapping is value
    assert QATConfig(augment=text).augment is value
    assert GenConfig(ait=text).ait is value
    assert get_synthesizer("zeroq", "smoke", {"channels_last": text}).config.channels_last is value
    assert resolve("squant", hparams={"bias_correction": text}).hparams["bias_correction"] is value


def test_recorded_zsq_json_settings_still_read():
    """zsq.json files written before the configs: the recipe part of every run record under bench/runs (a
    copy of its zsq.json's) passes the settings table and the configs (``zsq report`` re-runs the pre-step
    from it)."""
    import json

    from zsq.settings import check_hparams, settings_table

    table, configs, n = settings_table(), _configs(), 0
    for f in sorted((REPO / "bench" / "runs").rglob("*.json")):
        try:
            rows = json.loads(f.read_text())
        except ValueError:
            continue
        for row in rows if isinstance(rows, list) else [rows]:
            rec = (row.get("zsq") or {}).get("recipe") if isinstance(row, dict) else None
            if not isinstance(rec, dict) or "hparams" not in rec:
                continue
            hp, owners = rec["hparams"] or {}, [rec.get("quant"), f"pre:{rec.get('pre')}"]
            for o in owners:
                if o in configs:
                    configs[o].from_hparams(hp)
            owners = [o for o in owners if o in table]
            check_hparams({k: v for k, v in hp.items() if any(k in table[o] for o in owners)}, owners)
            n += 1
    assert n > 100


# -------------------------------------------------------------------------------------------------
# the command line: exit 2, one line, nothing written, nothing synthesized

CLI_BAD = {
    "w_observer-bogus": ("zeroq", "w_observer=bogus", ["setting w_observer", "bogus"]),
    "w_observer-MSE": ("zeroq", "w_observer=MSE", ["setting w_observer", "did you mean mse?"]),
    "a_observer-bogus": ("zeroq", "a_observer=bogus", ["setting a_observer", "bogus"]),
    "squant-bias_correction": ("squant", "bias_correction=maybe", ["setting bias_correction", "true or false"]),
    "dfq-pre-relu6": ("dfq", "relu6=Replace", ["setting relu6", "did you mean replace?"]),
    "genie-precision": ("genie", "precision=fp16", ["setting precision", "fp32, bf16"]),
    "qat-kd_reduction": ("qat-zeroq", "kd_reduction=sum", ["setting kd_reduction", "batchmean"]),
    "gdfq-lr_schedule": ("gdfq", "lr_schedule=step", ["setting lr_schedule", "did you mean multistep?"]),
}


@pytest.fixture(scope="module")
def cli_bad_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings_cli")

    def one(case):
        recipe, kv, _ = CLI_BAD[case]
        d = root / case
        d.mkdir()
        env = {**os.environ, "CI": "true", "COLUMNS": "80", "ZSQ_CACHE": str(d / "cache")}
        r = subprocess.run([sys.executable, "-m", "zsq", "quantize", "cifar10_resnet20", "--recipe", recipe,
                            "--budget", "smoke", "--threads", "1", "-q", "--set", kv, "-o", str(d / "out")],
                           capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        return r, d

    with ThreadPoolExecutor(max_workers=2) as ex:
        return dict(zip(CLI_BAD, ex.map(one, CLI_BAD)))


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_setting_exits_2_one_line_before_any_work(case, cli_bad_runs):
    r, d = cli_bad_runs[case]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in CLI_BAD[case][2]:
        assert n in lines[0], (n, lines[0])
    assert not (d / "out").exists(), "a refused run wrote OUT"
    assert not (d / "cache" / "synthetic").exists(), "a refused run synthesized images"


# -------------------------------------------------------------------------------------------------
# zsq methods: the settings a run uses, per budget, readable at 100 columns

def _render(renderable, width: int) -> list[str]:
    from rich.console import Console

    c = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    c.print(renderable)
    return c.export_text().splitlines()


def _methods_at(width: int, monkeypatch, *args: str) -> list[str]:
    """``zsq methods ARGS`` in-process with stdout a ``width``-column console."""
    from rich.console import Console

    from zsq import cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "out_console", Console(width=width, file=buf, color_system=None))
    with pytest.raises(SystemExit) as e:
        cli.main(["methods", *args])
    assert e.value.code == 0
    return buf.getvalue().splitlines()


def test_methods_table_shows_default_budget_settings_readable_at_100_columns(monkeypatch):
    from zsq.views import setting_text

    lines = _methods_at(100, monkeypatch)
    assert max(len(ln) for ln in lines) <= 100
    text = "\n".join(lines)
    assert "…" not in text  # nothing cut
    names = [m.group(1) for ln in lines if (m := re.match(r"^│ (\S+) +│ (PTQ|QAT) +│", ln))]
    assert names == list(RECIPES._items), "every recipe on its own row, its name whole"
    for name in RECIPES._items:
        # the recipe's rows: from its name to the next separator
        start = next(i for i, ln in enumerate(lines) if re.match(rf"^│ {re.escape(name)} +│", ln))
        end = next(i for i in range(start, len(lines)) if lines[i].startswith(("├", "└")))
        row = [ln.split("│")[3].strip() for ln in lines[start:end]]
        for k, v in resolve(name, budget="default").hparams.items():
            token = f"{k}={setting_text(v)}"
            assert any(token in ln for ln in row), (name, token, row)  # whole on one line
        assert RECIPES[name].paper.split()[0] in " ".join(row), name
    zeroq = lines[next(i for i, ln in enumerate(lines) if re.match(r"^│ zeroq +│", ln)):][:6]
    assert "w_observer=mse" in "\n".join(zeroq)  # the default budget's weight observer, not the paper's minmax


def test_methods_recipe_lists_every_budget(monkeypatch):
    lines = _methods_at(100, monkeypatch, "zeroq")
    assert max(len(ln) for ln in lines) <= 100
    row = {b: next(ln for ln in lines if ln.startswith(f"--budget {b}")) for b in BUDGETS}
    assert "w_observer=mse, a_observer=minmax" in row["smoke"]
    assert "w_observer=mse, a_observer=minmax" in row["default"]
    assert "w_observer=minmax, a_observer=minmax" in row["paper"]
    text = "\n".join(lines)
    assert "w_observer=minmax|percentile|mse" in text and "calib_batch=int>=1" in text
    lines = _methods_at(100, monkeypatch, "qat-zeroq")
    text = "\n".join(lines)
    assert "steps_per_epoch=4" in text and "steps_per_epoch=250" in text  # smoke, default
    assert "n_images=5120" in text  # the default budget's synthesizer override


def test_methods_every_recipe_renders(monkeypatch):
    from zsq.views import recipe_details

    for name in RECIPES._items:
        lines = _render(recipe_details(name), 100)
        assert max(len(ln) for ln in lines) <= 100, name
        assert sum(ln.startswith("--budget ") for ln in lines) == 3, name


# -------------------------------------------------------------------------------------------------
# zsq bench list: one clean line per suite

def test_bench_list_lines_are_clean():
    from zsq.bench.suites import DESCRIPTIONS, SUITES

    assert set(DESCRIPTIONS) == set(SUITES)
    env = {**os.environ, "CI": "true", "COLUMNS": "100"}
    r = subprocess.run([sys.executable, "-m", "zsq", "bench", "list"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == list(SUITES)
    for ln in lines:
        assert len(ln) <= 100, ln
        assert "`" not in ln and not re.search(r"\bIssues? \d", ln), ln  # no RST, no internal issue numbers
        assert ln.count("(") == ln.count(")"), ln  # not cut mid-sentence
        assert not re.search(r"\b(the|a|of|on|and|to|for|with|then)$", ln), ln
