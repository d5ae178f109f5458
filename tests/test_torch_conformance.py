"""Every conformance case on the torch lowerings but Triton's: the native CPU kernel
(``torch``) and the ladder in torch ops (``torch-ops``), against the reference (the
Triton rows: ``test_triton_conformance.py``; the other torch tests: ``test_torch.py``)."""

from __future__ import annotations

import pytest
import torch
from _conformance_rows import check_case  # tests/_conformance_rows.py

from l2norm import conformance

BACKEND_NAMES = ["torch", "torch-ops"] + (["torch-cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("case", list(conformance.cases()), ids=lambda c: c.id)
def test_conformance_case(case, backend):
    check_case(backend, case)
