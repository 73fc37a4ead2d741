"""Synthesis's ``precision="auto"``: bf16 only where the CPU computes it natively, resolved before keying."""

import pytest

from zsq import hardware
from zsq.errors import BadValueError


@pytest.fixture
def flags(monkeypatch):
    """Set this CPU's flags for the test (and no ZSQ_PRECISION)."""
    monkeypatch.delenv("ZSQ_PRECISION", raising=False)

    def set_flags(*names):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))

    return set_flags


def test_auto_is_bf16_only_with_native_bf16(flags):
    flags("avx2", "fma")
    assert hardware.resolve_precision("auto") == "fp32"
    flags("avx512f", "avx512_bf16")
    assert hardware.resolve_precision("auto") == "bf16"
    flags("amx_bf16")
    assert hardware.resolve_precision("auto") == "bf16"
    assert hardware.resolve_precision("fp32") == "fp32"  # explicit values are left alone


def test_env_fixes_auto_and_bad_env_is_refused(flags, monkeypatch):
    flags("avx2")
    monkeypatch.setenv("ZSQ_PRECISION", "BF16")
    assert hardware.resolve_precision("auto") == "bf16"
    assert hardware.resolve_precision("fp32") == "fp32"
    monkeypatch.setenv("ZSQ_PRECISION", "fp16")
    with pytest.raises(BadValueError, match="ZSQ_PRECISION"):
        hardware.resolve_precision("auto")


def test_synth_config_holds_the_resolved_precision(flags):
    """The config (its cache key and record) names what ran, never "auto"."""
    from zsq.synth import get_synthesizer
    from zsq.synth.base import synthetic_key
    from zsq.synth.genie import GenieConfig
    from zsq.synth.zeroq import ZeroQConfig

    flags("avx2")
    z, g = ZeroQConfig.for_budget("smoke"), GenieConfig.for_budget("smoke")
    assert (z.precision, g.precision) == ("fp32", "fp32")
    assert GenieConfig.for_budget("paper").precision == "fp32"
    flags("avx512_bf16")
    assert ZeroQConfig.for_budget("smoke").precision == "bf16"
    assert ZeroQConfig.for_budget("smoke", precision="fp32").precision == "fp32"
    key_bf16 = synthetic_key({"id": "m"}, get_synthesizer("zeroq", "smoke"), "smoke", 0, (3, 32, 32))
    flags("avx2")
    key_fp32 = synthetic_key({"id": "m"}, get_synthesizer("zeroq", "smoke"), "smoke", 0, (3, 32, 32))
    assert key_fp32 != key_bf16
    with pytest.raises(BadValueError, match="precision"):
        ZeroQConfig.for_budget("smoke", precision="fp16")


def test_this_machine_reads_its_flags():
    if not hardware.cpu_flags():
        pytest.skip("no /proc/cpuinfo flags here")
    assert hardware.native_bf16() == bool({"avx512_bf16", "amx_bf16"} & hardware.cpu_flags())
