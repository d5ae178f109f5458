"""Conformance cases on the Triton lowering (``torch-triton``), against the reference.

With a GPU every case runs on CUDA. Without one the kernels run in Triton's interpreter,
about a second a case: there a pairwise-covering subset runs (every pair of values of a
case's layout, option set, every eps placement included, scale kind, dtype and data:
about 100 of the 800 cases), and ``l2norm check --backends torch-triton --full`` runs all
of them. A file of its own, as the suite's workers take a file at a time.
"""

from __future__ import annotations

import pytest
import torch
from _conformance_rows import check_case, pairwise_cases  # tests/_conformance_rows.py

from l2norm import conformance

ALL_CASES = list(conformance.cases())
CASES = ALL_CASES if torch.cuda.is_available() else pairwise_cases(ALL_CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conformance_case(case):
    check_case("torch-triton", case)
