"""What ``zsq methods`` prints: rich renderables built from the recipe registry, laid out to stay readable
in a 100-column terminal (the long text wraps inside one wide column instead of being cut into narrow
cells). The settings shown are the ones a run uses: the recipe's hparams with its budget's quantizer
overrides (:func:`zsq.api.resolve`), written as ``--set KEY=VALUE`` takes them."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

BUDGETS = ("smoke", "default", "paper")


def setting_text(value: Any) -> str:
    """A value as ``--set KEY=VALUE`` takes it: strings bare, anything else compact JSON (one word)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def settings_line(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={setting_text(v)}" for k, v in hparams.items()) or "(the quantizer's own defaults)"


def _parts(r) -> str:
    parts = ([f"pre {r.pre}"] if r.pre else []) + ([f"synth {r.synth}"] if r.synth else []) + [f"quant {r.quant}"]
    return " -> ".join(parts)


def methods_table() -> Table:
    """Every recipe: type, what runs (pre-step, synthesizer, quantizer), native protocol, family, paper and
    the settings of the ``default`` budget."""
    from .api import resolve
    from .recipes import RECIPES

    t = Table("recipe", "type", "what runs, paper, settings at --budget default (all budgets: zsq methods RECIPE)",
              show_lines=True)
    for r in RECIPES._items.values():
        body = Text()
        body.append(f"{_parts(r)}; protocol {r.protocol}; {r.family}", style="bold")
        body.append("\n" + r.paper, style="italic")
        body.append("\n" + settings_line(resolve(r.name, budget="default").hparams))
        t.add_row(r.name, r.kind, body)
    return t


def recipe_details(name: str) -> Group:
    """One recipe in full: its parts, the settings and synthesizer preset of each budget, every ``--set``
    key with the values it takes, and its documentation."""
    from .api import resolve, synth_settings
    from .recipes import HPARAM_KEYS, RECIPES
    from .settings import settings_table

    r = RECIPES[name]
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column()
    # every cell is Text: values such as [number, number] or a paper's [code: ...] are not rich markup
    g.add_row("recipe", Text(f"{r.name} ({r.kind}, {r.family})"))
    g.add_row("paper", Text(r.paper))
    g.add_row("protocol", Text(f"{r.protocol} (native; --protocol overrides)"))
    for k in ("pre", "synth", "quant"):
        g.add_row(k, Text(getattr(r, k) or "-"))
    for b in BUDGETS:
        res = resolve(name, budget=b)
        cell = Text(settings_line(res.hparams))
        if res.synth:
            overrides, n = synth_settings(res)
            extra = {**({"n_images": n} if n is not None else {}), **overrides}
            cell.append(f"\nsynth {res.synth}: its {b} preset" + (f", {settings_line(extra)}" if extra else ""),
                        style="dim")
        g.add_row(f"--budget {b}", cell)
    table = settings_table()
    owners = [o for o in (r.quant, f"pre:{r.pre}" if r.pre else None) if o in table]
    keys = sorted((set(r.hparams) | set(HPARAM_KEYS.get(r.quant, ())) | set(HPARAM_KEYS.get(f"pre:{r.pre}", ())))
                  - {"stop_at"})  # stop_at: a test hook
    decl = {k: next((table[o][k] for o in owners if k in table[o]), None) for k in keys}
    g.add_row("--set", Text(", ".join(f"{k}={d.short()}" if d else k for k, d in decl.items())))
    return Group(g, Text(""), Text(r.doc))
