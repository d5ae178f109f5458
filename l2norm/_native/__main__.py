"""``python -m l2norm._native``: make the native CPU kernel ready now (``scripts/setup`` runs
it): each library (the one built at install where it fits, else one built here), the XLA
custom calls only where JAX is installed; exit status 1 if a build fails."""

from __future__ import annotations

import importlib.util
import sys

from l2norm._native import BuildError, build, installed


def main() -> int:
    status = 0
    wanted: list[tuple[str, str | None]] = [("capi", None)]
    if importlib.util.find_spec("jax") is not None:
        import jax.ffi

        wanted.append(("xla", jax.ffi.include_dir()))
    for name, include_dir in wanted:
        prebuilt = installed(name, include_dir)
        if prebuilt is not None:
            print(f"l2norm native kernel ({name}): {prebuilt} (built at install)")
            continue
        try:
            path = build(name, (include_dir,) if include_dir else ())
            print(f"l2norm native kernel ({name}): {path}")
        except BuildError as err:
            print(f"l2norm native kernel ({name}) failed: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
