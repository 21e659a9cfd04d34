"""docs/deploy.md names only what exists: every `ddq.…` dotted name in it resolves as written, by attribute
access after importing the package (as a reader would type it). `ddq.deploy.export` is the function
`export`, which shadows the submodule of that name, so `ddq.deploy.export.use_lut_levels` does not."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
DOTTED_NAMES = sorted(set(re.findall(r"`(ddq(?:\.\w+)+)", DOC.read_text())))


def resolve(dotted: str):
    """Import the longest module prefix of dotted, then walk the whole name by getattr from `ddq`."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:end]))
            break
        except ModuleNotFoundError:
            continue
    target = importlib.import_module(parts[0])
    for part in parts[1:]:
        target = getattr(target, part)
    return target


def test_the_doc_names_some():
    assert "ddq.deploy.use_lut_levels" in DOTTED_NAMES


@pytest.mark.parametrize("dotted", DOTTED_NAMES)
def test_dotted_name_resolves(dotted):
    resolve(dotted)


def test_the_lut_levels_spelling_runs():
    from ddq.nn import DDQLinear

    model = DDQLinear(4, 2)
    assert resolve("ddq.deploy.use_lut_levels")(model) == 2
    assert model.weight_quantizer.lut_levels and model.input_quantizer.lut_levels
