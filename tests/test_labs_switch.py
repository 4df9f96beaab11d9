"""ql.labs: the switch that turns qlab's versions of a lab's functions off, in lab notebooks and in the sandbox."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qlab as ql
from autograder import spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def switched_off():
    yield ql.labs.forbid("lab1")
    ql.labs.allow_all()


def test_forbid_raises_with_the_sandbox_message_and_reference_brings_them_back(switched_off):
    x = torch.tensor([1.0, -0.5, 0.25])
    with pytest.raises(RuntimeError, match=r"^ql\.choose_qparams is disabled while grading lab1: write it yourself$"):
        ql.choose_qparams(x, ql.int8, ql.PerTensor())
    from qlab import quantize  # an alias is the same function object: off too

    with pytest.raises(RuntimeError, match="ql.quantize is disabled"):
        quantize(x, torch.tensor(0.1), 0, ql.int8)
    with ql.labs.reference():
        scale, zero_point = ql.choose_qparams(x, ql.int8, ql.PerTensor(), symmetric=True)
    assert float(scale) == pytest.approx(1.0 / 127)  # by hand: max |x| / qmax
    with pytest.raises(RuntimeError, match="disabled"):
        ql.metrics.sqnr_db(x, x)
    assert ql.labs.forbid("lab1") == switched_off  # twice is harmless
    reference_ql = ql.labs.oracle()
    assert float(reference_ql.metrics.sqnr_db(torch.ones(3), torch.ones(3) * 1.1)) == pytest.approx(20.0, abs=1e-4)
    assert reference_ql.PerTensor is ql.PerTensor  # classes and values pass through
    with pytest.raises(RuntimeError, match="disabled"):  # the oracle's call did not switch anything on for good
        ql.metrics.sqnr_db(x, x)


def test_unknown_names_and_labs_are_refused():
    with pytest.raises(ValueError, match="unknown lab 'lab99'"):
        ql.labs.forbid("lab99")
    with pytest.raises(ValueError, match="qlab has no 'metrics.no_such' to switch off"):
        ql.labs.forbid("lab1", ("metrics.no_such",))


def test_specs_switch_off_what_the_labs_module_lists():
    for lab, names in ql.labs.DISABLED.items():
        assert tuple(spec.load(lab).DISABLED) == names, lab


def test_irreversible_switch_keeps_nothing_to_restore():
    program = textwrap.dedent("""
        import torch, qlab as ql
        ql.labs.forbid("lab1", ("quantize",), reversible=False)
        with ql.labs.reference():
            try:
                ql.quantize(torch.ones(2), torch.tensor(1.0), 0, ql.int8)
            except RuntimeError as error:
                print("still off:", error)
        ql.labs.allow_all()
        try:
            ql.quantize(torch.ones(2), torch.tensor(1.0), 0, ql.int8)
        except RuntimeError:
            print("off for good")
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "still off: ql.quantize is disabled while grading lab1" in proc.stdout and "off for good" in proc.stdout


def test_other_packages_functions_and_imports_are_switched_off_too():
    import numpy as np

    gguf = pytest.importorskip("gguf")
    pytest.importorskip("bitsandbytes")
    try:
        ql.labs.forbid("lab8")
        ql.labs.forbid("lab6")
        with pytest.raises(RuntimeError, match=r"^gguf\.quants\.quantize is disabled while grading lab8: write it yourself$"):
            gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
        with pytest.raises(ImportError, match="bitsandbytes may not be used in lab6: write it yourself with torch"):
            import bitsandbytes  # noqa: F401
        with ql.labs.reference():  # a test cell's expected values: both back on for the block
            codes = gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
            import bitsandbytes  # noqa: F401,F811
        assert codes.shape == (1, 34)  # by hand: one block = float16 scale + 32 int8 codes
        with pytest.raises(ImportError, match="may not be used"):
            import bitsandbytes.functional  # noqa: F401
    finally:
        ql.labs.allow_all()
    import bitsandbytes  # noqa: F401,F811
    assert gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0).shape == (1, 34)
