"""Every registered dataset against :func:`mmgrow.testing.dataset_conformance.dataset_checks`."""

from __future__ import annotations

import pytest

import mmgrow
from mmgrow.testing.conformance import run_checks


@pytest.mark.parametrize("name", mmgrow.available("datasets"))
def test_dataset_conformance(name: str) -> None:
    results = run_checks("datasets", mmgrow.load_plugin("datasets", name))
    failed = [f"{r.name}: {r.message}" for r in results if not r.passed]
    assert [r.name for r in results][:1] == ["dataset_contract"], "the dataset suite did not run"
    assert not failed, "\n".join(failed)
