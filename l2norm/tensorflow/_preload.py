"""Import order between TensorFlow and Triton.

TensorFlow and Triton each link their own copy of LLVM, and whichever loads second
registers LLVM's command-line options again: when Triton comes second the process aborts
("LLVM ERROR: inconsistency in registered CommandLine options"), and Triton comes second
whenever ``torch.compile`` or l2norm's Triton lowering runs after TensorFlow was imported
(torch imports Triton lazily). Loaded first, Triton leaves TensorFlow working. So every
module of l2norm that imports TensorFlow or Keras calls :func:`triton_before_tensorflow`
first, or imports this module ahead of them (importing it does the same); it costs about
0.2 s, and only where Triton is installed.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["triton_before_tensorflow"]


def triton_before_tensorflow() -> None:
    """Import Triton now if it is installed and TensorFlow is not loaded yet."""
    if "tensorflow" in sys.modules or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None:
        return
    import triton  # noqa: F401


triton_before_tensorflow()
