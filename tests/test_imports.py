"""Every module imports on its own (no hidden import cycles, no import-time side effects that fail)."""

import importlib
import pkgutil

import preftune


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(preftune.__path__, prefix="preftune.")]
    assert "preftune.train" in names and "preftune.losses" in names
    for name in names:
        if name == "preftune.__main__":
            continue
        importlib.import_module(name)
