"""Every cell of the conformance matrix (see tests/conformance.py), and docs/conformance.md in step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conformance import EGRESSES, INGRESSES, SCENARIOS, cells, egress_gateway, render, run_cell

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


@pytest.fixture(scope="module", params=list(EGRESSES))
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    async with egress_gateway(request.param) as url:
        yield request.param, url


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("ingress", INGRESSES)
async def test_cell(gateway: tuple[str, str], ingress: str, scenario: str) -> None:
    _, url = gateway
    await run_cell(ingress, scenario, url)


def test_the_document_lists_every_cell_green() -> None:
    assert DOC.read_text() == render(dict.fromkeys(cells())), (
        "run scripts/conformance to regenerate docs/conformance.md"
    )
