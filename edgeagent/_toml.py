"""tomllib on Python >= 3.11, the tomli backport before."""

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

__all__ = ["tomllib"]
