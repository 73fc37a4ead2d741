"""zsq: zero-shot quantization — accurate low-bit networks without the training data.

>>> import zsq
>>> model = zsq.load_model("cifar10_resnet20")
>>> qmodel = zsq.quantize(model, recipe="zeroq", w_bits=4, a_bits=8, protocol="ptq")  # doctest: +SKIP
"""

from ._version import __version__  # noqa: E402
from .errors import ZsqError  # noqa: E402
from .models import load_model  # noqa: E402
from .api import evaluate, list_methods, load, quantize, save  # noqa: E402


def synthesize(model, recipe: str = "zeroq", device="auto", **kw):
    """Make (or reuse from ``ZSQ_CACHE``) the synthetic image set of ``recipe``'s synthesizer, on ``device``
    (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; the model is moved there, in place)."""
    from .api import resolve, synthetic_data
    from .hardware import resolve_device, set_backend_flags

    dev = resolve_device(device)
    if isinstance(model, str):
        model = load_model(model)
    set_backend_flags(dev)
    model = model.to(dev)
    budget = kw.pop("budget", "default")
    seed = kw.pop("seed", 0)
    res = resolve(recipe, synth=kw.pop("synth", None), budget=budget)
    return synthetic_data(model, res, seed, **kw)


__all__ = ["ZsqError", "load_model", "quantize", "synthesize", "evaluate", "save", "load", "list_methods"]
