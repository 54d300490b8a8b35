"""`python -m experiments`: list the experiment modules, one line each."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types

SKIP = {"tour", "bench"}


def discover() -> list[types.ModuleType]:
    """Every experiment module of this package, in tour order (``TOUR_ORDER``, then name).

    Skips ``tour``, ``bench``, private names and subpackages. A module that fails to import
    is reported on stderr and left out, so one broken experiment cannot hide the others.
    """
    import experiments

    mods = []
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.ispkg or info.name.startswith("_") or info.name in SKIP:
            continue
        try:
            mod = importlib.import_module(f"experiments.{info.name}")
        except Exception as e:  # noqa: BLE001 - listed as broken, not fatal
            print(
                f"experiments.{info.name}: import failed: {type(e).__name__}: {e}", file=sys.stderr
            )
            continue
        if hasattr(mod, "Config") and hasattr(mod, "run"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "TOUR_ORDER", 100), m.__name__))


def describe(mod: types.ModuleType) -> str:
    """First line of the module docstring."""
    doc = (mod.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else "(no description)"


def main() -> None:
    mods = discover()
    width = max((len(m.__name__.rsplit(".", 1)[-1]) for m in mods), default=0)
    for m in mods:
        name = m.__name__.rsplit(".", 1)[-1]
        print(f"{name:<{width}}  {describe(m)}")
    print(
        "\nrun one: python -m experiments.NAME [--quick] [--help]; all: python -m experiments.tour"
    )


if __name__ == "__main__":
    main()
