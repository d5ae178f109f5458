"""``python -m l2norm._native``: make the native CPU kernel ready now (``scripts/setup`` runs
it): the C-ABI library (the one built at install, else one built here) and, where JAX is
installed, its XLA custom calls; exit status 1 if a build fails."""

from __future__ import annotations

import importlib.util
import sys

from l2norm._native import BuildError, build, installed_capi


def main() -> int:
    status = 0
    wanted: list[tuple[str, tuple[str, ...]]] = []
    prebuilt = installed_capi()
    if prebuilt is not None:
        print(f"l2norm native kernel (capi): {prebuilt} (built at install)")
    else:
        wanted.append(("capi", ()))
    if importlib.util.find_spec("jax") is not None:
        import jax.ffi

        wanted.append(("xla", (jax.ffi.include_dir(),)))
    for name, includes in wanted:
        try:
            print(f"l2norm native kernel ({name}): {build(name, includes)}")
        except BuildError as err:
            print(f"l2norm native kernel ({name}) failed: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
