"""The ``zsq`` command line (typer + rich). Every user error prints one line and exits 2."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="zsq: zero-shot quantization. Quantize a pretrained model to 8/4/3/2 bits without its training data.",
)
console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 200)

MODEL_HELP = "zoo name (see `zsq zoo`), tv:NAME, timm:NAME or path/to/file.py:factory"
PROTOCOL_NAMES = "ptq | qat | fixed | genie-native | vit-ptq | deploy"
DATA_HELP = "ImageFolder directory, a .tar of one, or CIFAR-10 python batches"
LIMIT_HELP = "evaluate on the first N/classes images of each class (e.g. 1000 on CIFAR-10: 100 per class)"
THREADS_HELP = "torch CPU threads (default: torch's own choice)"
WEIGHTS_HELP = "weights file (state_dict) for MODEL"
INPUT_SIZE_HELP = ("input size C,H,W of MODEL, e.g. 3,224,224: needed for a file.py:factory model that does not "
                   "declare it (zoo, tv: and timm: models know theirs)")
MEAN_HELP = "evaluation normalisation mean, e.g. 0.5,0.5,0.5 (user models; default: ImageNet's)"
STD_HELP = "evaluation normalisation std, e.g. 0.5,0.5,0.5"
RESIZE_HELP = "evaluation resize: short side in pixels, before the crop"
CROP_HELP = "evaluation centre crop in pixels (also the input size when --input-size is not given)"
INTERP_HELP = "resize interpolation: bilinear | bicubic | nearest"
QUIET_HELP = "no progress bars or progress lines"
MP_BITS_HELP = "candidate weight bits of the mixed-precision search"
MP_SENS_HELP = "kl (ZeroQ's output KL) | hessian (Hutchinson trace, HAWQ-v2)"
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: CUDA when available, cuda:LOCAL_RANK under torchrun, else cpu)"


def _alias(value, old, flag: str, old_flag: str):
    """The value of ``flag`` or of its hidden old spelling ``old_flag`` (both given: they must agree)."""
    if old is None:
        return value
    if value is not None and value != old:
        from .errors import BadValueError

        raise BadValueError(f"{old_flag} is the old name of {flag}: give one of them")
    return old


def _print_metrics(r: dict, limit: Optional[int]) -> None:
    """Results on stdout: the ``top1 XX.XX`` line scripts read, then top-5 and how many images gave them."""
    out_console.print(f"top1 {r['top1']:.2f}")
    subset = f", a subset: --eval-limit {limit}" if limit else ""
    out_console.print(f"top5 {r['top5']:.2f}  (n={r['n']}{subset})")


def _model(model: str, weights, mean, std, resize, crop, interpolation, input_size=None):
    from .models import load_model
    from .models.preprocess import Preprocess, parse_floats

    pre = None
    if any(v is not None for v in (mean, std, resize, crop, interpolation)):
        base = None
        if model.startswith("tv:"):
            from .models.zoo import tv_preprocess

            base = tv_preprocess(model[3:])
        elif not (model.startswith("timm:") or ".py:" in model):
            from .models.zoo import ZOO

            base = ZOO[model].preprocess
        base = base or Preprocess()
        pre = Preprocess(
            mean=parse_floats(mean, "--mean") if mean else base.mean,
            std=parse_floats(std, "--std") if std else base.std,
            resize=resize if resize is not None else base.resize,
            crop=crop if crop is not None else base.crop,
            interpolation=interpolation or base.interpolation,
            input_size=crop or base.input_size,
        )
    return load_model(model, weights=weights, preprocess=pre, input_size=input_size)


def _threads(threads: Optional[int]):
    if threads is not None:
        import torch

        if threads < 1:
            from .errors import BadValueError

            raise BadValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _check_eval_path(path: Optional[str]):
    if path is not None and not Path(path).exists():
        from .errors import DataError

        raise DataError(f"eval data {path} does not exist")


def _check_policy(model, policy) -> None:
    """--keep-fp / --layer-bits patterns that match no Conv2d/Linear layer are an error (a typo would do nothing)."""
    from torch import nn

    names = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    bad = policy.unmatched(names)
    if bad:
        from .errors import BadValueError

        raise BadValueError(f"--keep-fp/--layer-bits pattern(s) match no layer: {', '.join(bad)} "
                            f"(layers are e.g. {', '.join(names[:3])})")


def _parse_sets(items: List[str], flag: str = "--set") -> dict:
    """``KEY=VALUE`` strings -> hparams; VALUE is read as JSON (numbers, true/false, lists) or
    else kept as a string."""
    import json

    from .errors import BadValueError

    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise BadValueError(f"{flag} expects KEY=VALUE, got '{it}'")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@app.command()
def quantize(
    model: str = typer.Argument("cifar10_resnet20", help=MODEL_HELP),
    recipe: str = typer.Option(..., "--recipe", "-r", help="method, see `zsq methods`"),
    out: Path = typer.Option(..., "-o", "--out", help="output directory (qmodel.pt + zsq.json)"),
    pre: Optional[str] = typer.Option(None, help="synthesis-free pre-step (e.g. dfq); 'none' disables"),
    synth: Optional[str] = typer.Option(None, help="override the recipe's synthesizer"),
    quant: Optional[str] = typer.Option(None, help="override the recipe's quantizer"),
    protocol: Optional[str] = typer.Option(None, help=f"{PROTOCOL_NAMES} (default: the recipe's native one)"),
    w: Optional[int] = typer.Option(None, "--w", help="weight bits (2..8 or 16; default 4)"),
    a: int = typer.Option(4, "--a", help="activation bits (2..8 or 16)"),
    budget: str = typer.Option("default", help="smoke | default | paper"),
    seed: int = typer.Option(0, help="seed of every random draw"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    synthetic: Optional[str] = typer.Option(None, help="reuse a synthetic set directory"),
    calib: Optional[str] = typer.Option(None, help="calibrate on REAL images from this folder/tar (baseline)"),
    calib_n: int = typer.Option(256, "--calib-n", help="number of real calibration images"),
    eval_path: Optional[str] = typer.Option(None, "--eval-data", help="evaluate on this labelled set after quantizing: "
                                            + DATA_HELP),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help=LIMIT_HELP),
    eval_old: Optional[str] = typer.Option(None, "--eval", hidden=True),
    keep_fp: List[str] = typer.Option([], "--keep-fp", help="layer name/glob kept in FP (repeatable)"),
    layer_bits: List[str] = typer.Option([], "--layer-bits", help="NAME=WxAy per-layer bits (repeatable)"),
    wbits_avg: Optional[float] = typer.Option(None, "--wbits-avg", help="mixed precision instead of --w: search "
                                              "each unpinned layer's weight bits for this parameter-weighted "
                                              "average (4 = uniform W4's weight memory)"),
    size_mb: Optional[float] = typer.Option(None, "--size", help="mixed precision instead of --w: the quantized "
                                            "model's total weight memory in MB (10^6 bytes)"),
    bops: Optional[float] = typer.Option(None, "--bops", help="mixed precision instead of --w, activation bits "
                                         "too: the searched layers' giga bit-operations (MACs x weight bits x "
                                         "input bits) at most this; --a stays the bits of the other activations"),
    mp_bits: str = typer.Option("2,3,4,6,8", "--mp-bits", help=MP_BITS_HELP),
    mp_abits: Optional[str] = typer.Option(None, "--mp-abits", help="candidate input-activation bits of a --bops "
                                           "search (default 4,6,8)"),
    mp_sensitivity: str = typer.Option("kl", "--mp-sensitivity", help=MP_SENS_HELP),
    resume: bool = typer.Option(False, help="continue an interrupted run from OUT/.ckpt"),
    overwrite: bool = typer.Option(False, help="replace a finished result in OUT"),
    strict: bool = typer.Option(False, help="error on layers zsq cannot quantize instead of keeping them FP"),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
    std: Optional[str] = typer.Option(None, help=STD_HELP),
    resize: Optional[int] = typer.Option(None, help=RESIZE_HELP),
    crop: Optional[int] = typer.Option(None, help=CROP_HELP),
    interpolation: Optional[str] = typer.Option(None, help=INTERP_HELP),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE quantizer hparam override (repeatable), "
                                   "e.g. w_observer=mse (defaults: `zsq methods`)"),
    synth_set: List[str] = typer.Option([], "--synth-set", help="KEY=VALUE synthesizer setting on top of the "
                                        "budget (repeatable), e.g. iters=600 or n_images=512"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Quantize MODEL with a recipe; write OUT/qmodel.pt and OUT/zsq.json (last)."""
    from . import api
    from .hardware import resolve_device
    from .spec import LayerPolicy, check_bits

    eval_path = _alias(eval_path, eval_old, "--eval-data", "--eval")
    dev = resolve_device(device)
    mixed_cfg = None
    if mp_abits is not None and bops is None:
        from .errors import BadValueError

        raise BadValueError("--mp-abits sets the activation candidates of a --bops search: give --bops G")
    if wbits_avg is not None or size_mb is not None or bops is not None:  # mixed precision: the search replaces --w
        if w is not None:
            from .errors import BadValueError

            flag = "--wbits-avg" if wbits_avg is not None else "--size" if size_mb is not None else "--bops"
            raise BadValueError(f"--w and {flag} both set the weight bits: give one of them")
        mixed_cfg = api.mixed_config({"wbits_avg": wbits_avg, "size_mb": size_mb, "bops_g": bops, "candidates": mp_bits,
                                      "sensitivity": mp_sensitivity,
                                      **({"act_candidates": mp_abits} if mp_abits is not None else {})})
        w = mixed_cfg.w_bits()
    w = 4 if w is None else w
    check_bits(w, "--w"), check_bits(a, "--a")
    _threads(threads)
    hparams = _parse_sets(set_)
    synth_overrides = _parse_sets(synth_set, "--synth-set") or None
    res = api.resolve(recipe, pre=pre, synth=synth, quant=quant, protocol=protocol, budget=budget, hparams=hparams)
    if synth_overrides:
        from .errors import BadValueError

        if calib is not None or synthetic is not None:
            raise BadValueError("--synth-set sets the synthesizer; it has no effect with --calib or --synthetic")
        api.synth_settings(res, synth_overrides)
    if not overwrite:
        api.check_output_dir(out, False)
    _check_eval_path(eval_path)
    if calib is not None and not Path(calib).exists():
        from .errors import DataError

        raise DataError(f"--calib data {calib} does not exist")
    policy = LayerPolicy(tuple(keep_fp), LayerPolicy.parse_layer_bits(layer_bits))
    m = _model(model, weights, mean, std, resize, crop, interpolation, input_size)
    # every user error is found before the long part (synthesis, quantization) and before an old
    # result in OUT is retired (check_output_dir with --overwrite removes its zsq.json)
    _check_policy(m, policy)
    if eval_path:
        from .data.eval import open_dataset
        from .record import model_info

        open_dataset(eval_path, model_info(m).preprocess, limit=eval_limit)  # layout and --eval-limit
    from .distributed import world

    rank = world()[0]  # under torchrun: rank 0 alone writes OUT and evaluates; the others only train
    if rank == 0:
        from .paths import check_writable

        # OUT takes the checkpoints and qmodel.pt (at least the FP parameters): a read-only, unwritable or
        # too full OUT is a one-line error now, not after the work (and before an old result is retired)
        check_writable(out, need_bytes=sum(p.numel() * p.element_size() for p in m.parameters()))
        api.check_output_dir(out, overwrite)
    qmodel = api.quantize(m, recipe, w, a, protocol=protocol, pre=pre, synth=synth, quant=quant, budget=budget,
                          seed=seed, synthetic=synthetic, calib=calib, calib_n=calib_n, policy=policy,
                          hparams=hparams, strict=strict, progress=not quiet and rank == 0, mixed=mixed_cfg,
                          ckpt_dir=out / ".ckpt", resume=resume, synth_overrides=synth_overrides, device=dev)
    if rank != 0:
        return
    metrics = None
    if eval_path:
        metrics = api.evaluate(qmodel, eval_path, limit=eval_limit, progress=not quiet)
    api.save(qmodel, out, metrics=metrics, eval_path=eval_path, overwrite=True)
    # OUT is complete (zsq.json is written last): its resume state would only be stale, and large
    shutil.rmtree(out / ".ckpt", ignore_errors=True)
    from .record import record_of

    r = record_of(qmodel).result
    wl = f"W{r['mixed']['wbits_avg']:g}(avg)" if r.get("mixed") else f"W{w}"
    al = f"A(mixed), {r['mixed']['bops']['g']:.4g} GBOPs" if (r.get("mixed") or {}).get("bops") else f"A{a}"
    console.print(f"[green]saved[/] {out}  ({r['recipe']['name']}, {r['protocol']}, {wl}{al}, {r['wall_s']:.1f} s)")
    if metrics:
        _print_metrics(metrics, eval_limit)


@app.command()
def pareto(
    model: str = typer.Argument("cifar10_resnet20", help=MODEL_HELP),
    recipe: str = typer.Option(..., "--recipe", "-r", help="method, see `zsq methods`"),
    out: Path = typer.Option(..., "-o", "--out", help="output directory (pareto.json + pareto.png); the same "
                             "command resumes an interrupted run there"),
    protocol: Optional[str] = typer.Option(None, help=f"{PROTOCOL_NAMES} (default: the recipe's native one)"),
    a: int = typer.Option(8, "--a", help="activation bits of every point (2..8 or 16)"),
    bits: str = typer.Option("2,3,4,6,8", "--bits", help="uniform points: weight bits (comma-separated; none: no "
                             "uniform points)"),
    wbits_avg_list: str = typer.Option("2.5,3,4,6", "--wbits-avg-list", help="mixed points: --wbits-avg budgets "
                                       "(comma-separated; none: no mixed points)"),
    mp_bits: str = typer.Option("2,3,4,6,8", "--mp-bits", help=MP_BITS_HELP),
    mp_sensitivity: str = typer.Option("kl", "--mp-sensitivity", help=MP_SENS_HELP),
    mp_images: int = typer.Option(128, "--mp-images", help="images the sensitivities read (the first of the "
                                  "synthetic set; seeded Gaussian inputs for synthesis-free recipes)"),
    budget: str = typer.Option("default", help="smoke | default | paper"),
    seed: int = typer.Option(0, help="seed of every random draw"),
    eval_path: Optional[str] = typer.Option(None, "--eval-data", help="labelled set every point is evaluated on "
                                            "(required): " + DATA_HELP),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help=LIMIT_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Trace the accuracy-size frontier: quantize MODEL at uniform --w points and mixed --wbits-avg points,
    evaluate each; write OUT/pareto.json (after every point: resumable) and OUT/pareto.png."""
    from . import api
    from .errors import BadValueError
    from .hardware import resolve_device
    from .pareto import parse_list, trace
    from .spec import check_bits

    if eval_path is None:
        raise BadValueError("zsq pareto needs the labelled images to evaluate every point on: --eval-data PATH")
    dev = resolve_device(device)
    uniform = [check_bits(b, "--bits") for b in parse_list(bits, "--bits", int)]
    mixed = parse_list(wbits_avg_list, "--wbits-avg-list")
    if not uniform and not mixed:
        raise BadValueError("zsq pareto has no points: give --bits and/or --wbits-avg-list")
    mp = {"candidates": mp_bits, "sensitivity": mp_sensitivity, "n_images": mp_images}
    cands = api.mixed_config({"wbits_avg": 8, **mp}).candidates
    for b in mixed:  # each budget checked now, before any point runs
        api.mixed_config({"wbits_avg": b, **mp})
        if b < cands[0]:
            raise BadValueError(f"--wbits-avg-list {b:g} is below the smallest candidate bit width "
                                f"{cands[0]} (--mp-bits)")
    check_bits(a, "--a")
    _threads(threads)
    res = api.resolve(recipe, protocol=protocol, budget=budget)
    _check_eval_path(eval_path)
    m = _model(model, weights, None, None, None, None, None, input_size)
    from .data.eval import open_dataset
    from .paths import check_writable
    from .record import model_info

    open_dataset(eval_path, model_info(m).preprocess, limit=eval_limit)  # layout and --eval-limit
    check_writable(out)
    settings = {"model": model, "weights": weights, "recipe": res.name, "protocol": res.protocol, "a": a,
                "budget": res.budget, "seed": seed, "eval_data": eval_path, "eval_limit": eval_limit,
                "mp_bits": list(cands), "mp_sensitivity": mp_sensitivity,
                "mp_images": mp_images}
    doc = trace(m, recipe, out, uniform=uniform, mixed=mixed, a_bits=a, eval_path=eval_path, eval_limit=eval_limit,
                protocol=res.protocol, budget=res.budget, seed=seed,
                candidates=cands, sensitivity=mp_sensitivity, mp_images=mp_images,
                settings=settings, progress=not quiet, device=dev, log=lambda s: console.print(s, highlight=False))
    t = Table("point", "weight bytes", "top-1", "top-5", "wall s")
    for p in sorted(doc["points"], key=lambda p: p["q_bytes"]):
        t.add_row(p["id"], f"{p['q_bytes']:,}", f"{p['top1']:.2f}", f"{p['top5']:.2f}", f"{p['wall_s']:.1f}")
    out_console.print(t)
    console.print(f"[green]wrote[/] {out / 'pareto.json'} and {out / 'pareto.png'}")


@app.command()
def synthesize(
    model: str = typer.Argument("cifar10_resnet20", help=MODEL_HELP),
    recipe: str = typer.Option(..., "--recipe", "-r", help="recipe whose synthesizer to run"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="write the set here (default: ZSQ_CACHE)"),
    synth: Optional[str] = typer.Option(None, help="override the recipe's synthesizer"),
    budget: str = typer.Option("default", help="smoke | default | paper"),
    seed: int = typer.Option(0, help="seed of every random draw"),
    n_images: Optional[int] = typer.Option(None, "--n-images", help="override the budget's image count"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    synth_set: List[str] = typer.Option([], "--synth-set", help="KEY=VALUE synthesizer setting on top of the "
                                        "budget (repeatable), e.g. iters=600"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Make a synthetic calibration set (cached; reusable with `quantize --synthetic DIR`)."""
    from . import api
    from .hardware import resolve_device, set_backend_flags
    from .synth import synthesize as _synth

    dev = resolve_device(device)
    _threads(threads)
    res = api.resolve(recipe, synth=synth, budget=budget)
    if not res.synth:
        from .errors import BadValueError

        raise BadValueError(f"recipe {recipe} has no synthesizer")
    overrides, n = api.synth_settings(res, _parse_sets(synth_set, "--synth-set") or None)
    n, overrides = n_images or n, overrides or None
    m = _model(model, weights, None, None, None, None, None, input_size)
    set_backend_flags(dev)
    m = m.to(dev)  # the synthesizer runs where the model is
    from .distributed import is_distributed, synthesize_sharded, world

    if is_distributed():  # under torchrun: this rank makes every WORLD_SIZE-th batch
        s = synthesize_sharded(m, res.synth, budget=budget, seed=seed, n_images=n, out_dir=out,
                               progress=not quiet, overrides=overrides)
        if world()[0] != 0:
            return
    else:
        s = _synth(m, res.synth, budget=budget, seed=seed, n_images=n, out_dir=out, progress=not quiet,
                   overrides=overrides)
    out_console.print(f"{s.n_images} images in {s.dir} (sha256 {s.sha256[:12]})")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help=MODEL_HELP + ", a zsq output directory, or OUT/model.onnx (ONNX Runtime)"),
    data: Optional[str] = typer.Option(None, "--eval-data", help="labelled evaluation set (required): " + DATA_HELP),
    limit: Optional[int] = typer.Option(None, "--eval-limit", help=LIMIT_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    input_size: Optional[str] = typer.Option(None, "--input-size", help=INPUT_SIZE_HELP),
    mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
    std: Optional[str] = typer.Option(None, help=STD_HELP),
    resize: Optional[int] = typer.Option(None, help=RESIZE_HELP),
    crop: Optional[int] = typer.Option(None, help=CROP_HELP),
    interpolation: Optional[str] = typer.Option(None, help=INTERP_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    data_old: Optional[str] = typer.Option(None, "--data", hidden=True),
    limit_old: Optional[int] = typer.Option(None, "--limit", hidden=True),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + "; an .onnx model runs in ONNX Runtime "
                               "on the CPU"),
):
    """Print top-1 and top-5 of a model, a quantized output or an exported .onnx on a labelled image set."""
    from . import api
    from .hardware import resolve_device

    dev = resolve_device(device)

    data = _alias(data, data_old, "--eval-data", "--data")
    limit = _alias(limit, limit_old, "--eval-limit", "--limit")
    if data is None:
        from .errors import BadValueError

        raise BadValueError("zsq eval needs the labelled images to evaluate on: --eval-data PATH")
    _threads(threads)
    _check_eval_path(data)
    looks_like_path = ("/" in model or os.sep in model) and ".py:" not in model and not model.startswith(("tv:", "timm:"))
    if Path(model).is_dir() or (looks_like_path and not model.endswith(".onnx")):
        if not Path(model).is_dir():
            from .errors import DataError

            raise DataError(f"no such result directory: {model} (MODEL is a zoo name, tv:NAME, timm:NAME, "
                            "file.py:factory, a zsq output directory or OUT/model.onnx)")
        m = api.load(model)
    elif model.endswith(".onnx"):  # an exported model, run by ONNX Runtime with its output's preprocessing
        from .errors import DataError
        from .export.onnx import OrtModel

        if not Path(model).is_file():
            raise DataError(f"{model} does not exist")
        m = OrtModel(model, threads=threads, like=api.load(Path(model).parent))
    else:
        m = _model(model, weights, mean, std, resize, crop, interpolation, input_size)
    r = api.evaluate(m, data, limit=limit, progress=not quiet, device=None if model.endswith(".onnx") else dev)
    _print_metrics(r, limit)


@app.command()
def export(
    out: Path = typer.Argument(..., help="a finished zsq output directory (qmodel.pt + zsq.json)"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (QDQ, opset 21)"),
    check: Optional[str] = typer.Option(None, "--eval-data", help="evaluate the PyTorch model and the exported one "
                                        "(ONNX Runtime) on this labelled set: " + DATA_HELP),
    check_limit: Optional[int] = typer.Option(None, "--eval-limit", help=LIMIT_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    int8_weights: str = typer.Option("s8", "--int8-weights", help="container of symmetric 5-8-bit weights: s8 "
                                     "(fastest; ONNX Runtime's u8 x s8 kernels can saturate on CPUs without VNNI) "
                                     "or u8 (codes + 128, zero point 128: exact everywhere, slower)"),
    int4_weights: str = typer.Option("qdq", "--int4-weights", help="how <=4-bit weights of Linear layers are "
                                     "written: qdq (INT4 + DequantizeLinear, standard ONNX, run in float) or "
                                     "matmulnbits (ONNX Runtime's com.microsoft MatMulNBits 4-bit kernels, "
                                     "same weight values)"),
    check_old: Optional[str] = typer.Option(None, "--check", hidden=True),
    check_limit_old: Optional[int] = typer.Option(None, "--check-limit", hidden=True),
):
    """Write OUT/model.onnx: integer weights + DequantizeLinear, Q/DQ at every activation quantizer."""
    from . import api
    from .errors import BadValueError

    check = _alias(check, check_old, "--eval-data", "--check")
    check_limit = _alias(check_limit, check_limit_old, "--eval-limit", "--check-limit")

    if fmt != "onnx":
        raise BadValueError(f"--format must be onnx, got '{fmt}'")
    if int4_weights not in ("qdq", "matmulnbits"):  # zsq.export.onnx.INT4_WEIGHTS (not imported before the checks)
        raise BadValueError(f"--int4-weights must be qdq or matmulnbits, got '{int4_weights}'")
    _threads(threads)
    if check:
        _check_eval_path(check)
    q = api.load(out)
    from .paths import check_writable

    check_writable(out)  # read-only / full OUT: one line before the export and the evaluations
    from .export.onnx import OrtModel, export_onnx

    if int8_weights not in ("s8", "u8"):
        raise BadValueError(f"--int8-weights must be s8 or u8, got '{int8_weights}'")
    path = export_onnx(q, Path(out) / "model.onnx", weights=int8_weights, int4_weights=int4_weights)
    from .export.onnx import integer_kernel_note, record_export

    summary = record_export(out, path)  # zsq.json's export.onnx: size, protocol, integer-kernel op count
    console.print(f"[green]wrote[/] {path}")
    if (note := integer_kernel_note(summary)) is not None:
        console.print(note, highlight=False, soft_wrap=True)
    if check:
        r_t = api.evaluate(q, check, limit=check_limit, progress=not quiet)
        r_o = api.evaluate(OrtModel(path, threads=threads, like=q), check, limit=check_limit, progress=not quiet)
        out_console.print(f"top1 pytorch {r_t['top1']:.2f}  onnxruntime {r_o['top1']:.2f}  (n={r_o['n']})")


@app.command()
def report(
    out: Path = typer.Argument(..., help="a finished zsq output directory (or a `zsq pareto` directory)"),
    bench: Optional[Path] = typer.Option(None, "--bench", help="benchmark runs folder for the accuracy-vs-bits plot"),
    pareto: Optional[Path] = typer.Option(None, "--pareto", help="a `zsq pareto` directory whose accuracy-size "
                                          "frontier (pareto.json) the report draws (default: OUT's own, if any)"),
):
    """Write OUT/report/ (report.md, index.html, PNGs): synthetic images, losses, per-layer SQNR, accuracy,
    and the accuracy-size frontier of a pareto.json in OUT or --pareto DIR."""
    from .paths import check_writable, writing
    from .report import write_report

    if Path(out).is_dir():  # read-only / full OUT: one line before the work (a missing OUT is write_report's error)
        check_writable(out)
    with writing(Path(out) / "report"):
        p = write_report(out, bench, pareto)
    out_console.print(f"wrote {p} and {p.with_name('index.html')}")


@app.command()
def zoo():
    """List the zoo models."""
    from .models import zoo_table

    t = Table("name", "dataset", "FP top-1", "eval set", "source", "licence")
    for r in zoo_table():
        t.add_row(r["name"], r["dataset"], f"{r['top1']:.2f}" if r["top1"] is not None else "-", r["eval_set"],
                  r["source"], r["licence"])
    out_console.print(t)


@app.command()
def methods(recipe: Optional[str] = typer.Argument(None, help="show one recipe in full: every budget's settings")):
    """List every recipe: type, parts, native protocol, family, paper and the settings a run uses at the
    default budget (`zsq methods R`: every budget and every --set key of R)."""
    from .views import methods_table, recipe_details

    out_console.print(recipe_details(recipe) if recipe is not None else methods_table())


bench_app = typer.Typer(help="Benchmarks: resumable runs -> bench/runs/*.json -> docs/results.md", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("run")
def bench_run(
    suite: str = typer.Argument(..., help="suite name (see `zsq bench list`)"),
    runs_dir: Path = typer.Option(Path("bench/runs"), help="one JSON per finished run"),
    threads: int = typer.Option(2, help="torch CPU threads of each run"),
    only: Optional[str] = typer.Option(None, "--only", help="run only run-ids containing this text"),
    force: bool = typer.Option(False, help="recompute finished runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and exit"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (passed to each run's `zsq quantize`)"),
):
    """Run a suite; finished runs (their JSON exists) are skipped and an interrupted run continues from its
    checkpoints (ZSQ_CACHE/bench-work), so an interrupted suite resumes."""
    from .bench.runner import run_suite
    from .bench.suites import SUITES
    from .hardware import resolve_device
    from .registry import Registry

    resolve_device(device)  # a device this machine lacks: one line before any run

    reg = Registry("bench suite")
    for k, v in SUITES.items():
        reg.add(k, v)
    runs = reg[suite]()
    if only:
        runs = [r for r in runs if only in r.run_id]
    if dry_run:
        for r in runs:
            out_console.print(r.run_id)
        return
    try:
        recs = run_suite(runs, runs_dir, threads, force, device=device)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the quantize process got SIGINT and saved its checkpoint
        console.print("interrupted: the unfinished run keeps its checkpoints in ZSQ_CACHE/bench-work; "
                      "the same `zsq bench run` continues it")
        sys.exit(130)
    if len(recs) < len(runs):  # a failed run is reported by run_suite and makes the exit status non-zero
        console.print(f"[red]{len(runs) - len(recs)} of {len(runs)} runs failed[/]")
        raise typer.Exit(1)


def _checkout_bench_script(name: str, start: Path | None = None) -> Path:
    """``bench/<name>`` of the zsq checkout at ``start`` (the working directory) or a folder above it: the
    results generator and the runs it reads live in the checkout, not in the installed package."""
    from .errors import ZsqError

    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / "bench" / name).is_file():
            return d / "bench" / name
    raise ZsqError(f"no bench/{name} in {start} or a folder above it: run this in a zsq checkout (the results "
                   f"generator and bench/runs/ are not part of the installed package)")


@bench_app.command("report")
def bench_report(runs_dir: Optional[Path] = typer.Option(None, help="folder of the runs' JSON files "
                                                                    "(default: the checkout's bench/runs)"),
                 out: Optional[Path] = typer.Option(None, help="the Markdown file to write "
                                                               "(default: the checkout's docs/results.md)")):
    """Regenerate docs/results.md from bench/runs/*.json: runs `python bench/report.py` of the zsq checkout
    here or in a folder above."""
    import subprocess

    argv = [sys.executable, str(_checkout_bench_script("report.py"))]
    argv += ["--runs-dir", str(runs_dir)] if runs_dir is not None else []
    argv += ["--out", str(out)] if out is not None else []
    rc = subprocess.call(argv)
    if rc:
        raise typer.Exit(rc)


@bench_app.command("list")
def bench_list():
    """List the benchmark suites."""
    from rich.markup import escape

    from .bench.suites import SUITES, describe

    for k in SUITES:
        out_console.print(f"{k}: {escape(describe(k))}", highlight=False)


def _click_error_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error types, abort types) of click and of typer's vendored copy (typer >= 0.2x has no click)."""
    usage, abort = [], []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            m = __import__(mod, fromlist=["_"])
        except ImportError:
            continue
        usage += [m.ClickException] if hasattr(m, "ClickException") else []
        abort += [m.Abort] if hasattr(m, "Abort") else []
    return tuple(usage), tuple(abort)


def main(argv: list[str] | None = None) -> None:
    from rich.markup import escape

    from .errors import ZsqError

    warnings.filterwarnings("default")
    try:
        # typer >= 0.2x turns Ctrl-C (and typer.Exit) into a returned exit code when not standalone
        rc = app(args=argv, standalone_mode=False)
    except ZsqError as e:
        # one line, whatever the terminal width; the message is text, not rich markup
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command with --resume to continue")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors
        usage, abort = _click_error_types()
        if usage and isinstance(e, usage):
            e.show()
            sys.exit(2)
        if abort and isinstance(e, abort):  # click turns Ctrl-C into Abort
            console.print("interrupted: rerun the same command with --resume to continue")
            sys.exit(130)
        raise
    if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
        if rc == 130:
            console.print("interrupted: rerun the same command with --resume to continue")
        sys.exit(rc)
    sys.exit(0)
