"""Every conformance case on the Triton lowering (``torch-triton``: CUDA where there is a
GPU, Triton's interpreter on the CPU otherwise), against the reference. A file of its
own: interpreted, these rows take minutes, and the suite's workers take a file at a time."""

from __future__ import annotations

import pytest
from _conformance_rows import check_case  # tests/_conformance_rows.py

from l2norm import conformance


@pytest.mark.parametrize("case", list(conformance.cases()), ids=lambda c: c.id)
def test_conformance_case(case):
    check_case("torch-triton", case)
