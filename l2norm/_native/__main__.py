"""``python -m l2norm._native``: build the native CPU kernel now (``scripts/setup`` runs it),
the C-ABI library and, where JAX is installed, its XLA custom calls; exit status 1 if a
build fails."""

from __future__ import annotations

import importlib.util
import sys

from l2norm._native import BuildError, build


def main() -> int:
    wanted = [("capi", ())]
    if importlib.util.find_spec("jax") is not None:
        import jax.ffi

        wanted.append(("xla", (jax.ffi.include_dir(),)))
    status = 0
    for name, includes in wanted:
        try:
            print(f"l2norm native kernel ({name}): {build(name, includes)}")
        except BuildError as err:
            print(f"l2norm native kernel ({name}) failed: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
