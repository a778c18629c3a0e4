"""Every Formance spec case under ../shared/conformance/numscript must pass.

The files are not copied into the repository (they are Formance's, MIT): the test reads
them from beside the checkout and is skipped, with the reason, when they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledger.numscript.specs import check_specs

REPO = Path(__file__).resolve().parents[3]
CONFORMANCE = REPO.parent / "shared" / "conformance" / "numscript"
OWN_SPECS = Path(__file__).resolve().parent / "specs"


def _cases(root: Path) -> list:
    if not root.is_dir():
        return []
    params = []
    for script in sorted(root.rglob("*.num")):
        specs_path = script.with_name(script.name + ".specs.json")
        if not specs_path.is_file():
            continue
        specs = json.loads(specs_path.read_text())
        for index, case in enumerate(specs["testCases"]):
            name = f"{script.relative_to(root)}::{case.get('it', index)}"
            params.append(pytest.param(script, index, id=name))
    return params


def _run_case(script: Path, index: int) -> None:
    specs = json.loads(script.with_name(script.name + ".specs.json").read_text())
    # Run the whole file (merging file-level inputs) and look at the one case.
    result = check_specs(script.read_text(), specs)[index]
    assert not result.skipped, f"{result.it}: marked skip/focus"
    assert result.passed, "; ".join(result.failures)


@pytest.mark.skipif(
    not CONFORMANCE.is_dir(),
    reason=f"Formance's conformance files are not at {CONFORMANCE} (they are never copied into the repo)",
)
@pytest.mark.parametrize("script, index", _cases(CONFORMANCE))
def test_formance_conformance_case(script, index):
    """Formance's own interpreter specs: the behaviour we promise to reproduce exactly."""
    _run_case(script, index)


def test_conformance_suite_is_complete_when_present():
    """Guard against a silently shrinking suite (e.g. a glob that stops matching)."""
    if not CONFORMANCE.is_dir():
        pytest.skip(f"Formance's conformance files are not at {CONFORMANCE}")
    assert len(_cases(CONFORMANCE)) >= 120


@pytest.mark.parametrize("script, index", _cases(OWN_SPECS))
def test_own_spec_case(script, index):
    """Our spec files for behaviour beyond (or around) Formance's: colors, scaling, save…"""
    _run_case(script, index)
