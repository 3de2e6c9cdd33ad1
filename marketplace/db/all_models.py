"""Imports every model module (``marketplace/db/models*.py``) so ``Base.metadata`` knows every table."""

from __future__ import annotations

import importlib
import pkgutil

import marketplace.db as _db

for _m in sorted(pkgutil.iter_modules(_db.__path__)):
    if _m.name.startswith("models"):
        importlib.import_module(f"marketplace.db.{_m.name}")
