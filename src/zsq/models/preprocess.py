"""Evaluation preprocessing carried by every model."""

from __future__ import annotations

from dataclasses import dataclass, asdict

from ..errors import BadValueError


@dataclass(frozen=True)
class Preprocess:
    """Image -> tensor recipe. ``resize`` is the short side (None = keep), ``crop`` a centre crop."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"
    #: spatial size the network sees (square; synthesis makes images of this size); ``None`` = not known
    #: yet: :func:`zsq.models.load_model` fills it from the crop, the model or ``--input-size``
    input_size: int | None = None

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BadValueError("--mean/--std need 3 comma-separated values")
        if any(s <= 0 for s in self.std):
            raise BadValueError("--std values must be > 0")
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size < 1):
            raise BadValueError(f"input size must be a positive integer, got {self.input_size!r}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise BadValueError(f"--interpolation must be bilinear, bicubic or nearest, got '{self.interpolation}'")

    def to_dict(self):
        return asdict(self)

    def transform(self):
        """A torchvision transform PIL image -> normalized float tensor."""
        from torchvision import transforms as T

        interp = {
            "bilinear": T.InterpolationMode.BILINEAR,
            "bicubic": T.InterpolationMode.BICUBIC,
            "nearest": T.InterpolationMode.NEAREST,
        }[self.interpolation]
        steps = []
        if self.resize:
            steps.append(T.Resize(self.resize, interpolation=interp))
        if self.crop:
            steps.append(T.CenterCrop(self.crop))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


CIFAR10 = Preprocess(input_size=32)
IMAGENET_TV = Preprocess(resize=256, crop=224, input_size=224)


def parse_floats(text: str, what: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BadValueError(f"{what} expects 3 comma-separated numbers, got '{text}'") from None
    if len(vals) != 3:
        raise BadValueError(f"{what} expects 3 comma-separated numbers, got '{text}'")
    return vals  # type: ignore[return-value]


def parse_input_size(value: str | int | tuple | list | None, what: str = "--input-size") -> int | None:
    """``C,H,W`` (or ``H,W`` or ``S``) -> the square spatial size ``S``. zsq feeds models square RGB images,
    so ``C`` must be 3 and ``H`` equal ``W``; anything else is a one-line :class:`BadValueError`."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            vals = [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise BadValueError(f"{what} expects C,H,W (e.g. 3,224,224), got '{value}'") from None
    elif isinstance(value, int):
        vals = [value]
    else:
        try:
            vals = [int(v) for v in value]
        except (TypeError, ValueError):
            raise BadValueError(f"{what} expects C,H,W (e.g. 3,224,224), got {value!r}") from None
    if len(vals) not in (1, 2, 3) or any(v < 1 for v in vals):
        raise BadValueError(f"{what} expects C,H,W (e.g. 3,224,224), got {value!r}")
    if len(vals) == 3 and vals[0] != 3:
        raise BadValueError(f"{what}: zsq quantizes RGB image models (3 channels), got {vals[0]} channels")
    h, w = vals[-2:] if len(vals) > 1 else (vals[0], vals[0])
    if h != w:
        raise BadValueError(f"{what}: zsq synthesizes square images; got {h}x{w} (use a square size, e.g. 3,{h},{h})")
    return int(h)
