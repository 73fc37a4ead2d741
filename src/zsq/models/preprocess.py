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
    input_size: int = 32  # spatial size the network sees (synthesis makes images of this size)

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BadValueError("--mean/--std need 3 comma-separated values")
        if any(s <= 0 for s in self.std):
            raise BadValueError("--std values must be > 0")
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


CIFAR10 = Preprocess()
IMAGENET_TV = Preprocess(resize=256, crop=224, input_size=224)


def parse_floats(text: str, what: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BadValueError(f"{what} expects 3 comma-separated numbers, got '{text}'") from None
    if len(vals) != 3:
        raise BadValueError(f"{what} expects 3 comma-separated numbers, got '{text}'")
    return vals  # type: ignore[return-value]
