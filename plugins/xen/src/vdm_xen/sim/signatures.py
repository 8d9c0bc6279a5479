"""The C signatures of the simulated library calls, and cffi's argument conversion for them.

The signatures come from the same declarations the real bindings load (:mod:`vdm_xen.abi`), so a
call the simulation accepts is one cffi would accept for the real function.
"""

from __future__ import annotations

import re
from typing import Any

from ..abi import LIBRARIES, ffi
from ..bindings import declared_functions

_DECL = re.compile(r"\s+")


def _signatures() -> dict[str, Any]:
    """Function name -> cffi function-pointer ctype, from the same declarations the bindings use."""
    out = {}
    for soname, decls in LIBRARIES.items():
        names = declared_functions(soname)
        parts = [d for d in decls.split(";") if "(" in d]
        for name, decl in zip(names, parts):
            flat = _DECL.sub(" ", decl).strip()
            ptr = flat.replace(f"{name}(", "(*)(", 1)
            out[name] = ffi.typeof(ptr)
    return out


SIGNATURES = _signatures()


def check_arg(name: str, i: int, ctype: Any, value: Any) -> Any:
    """Convert/check one argument the way cffi would for the real function."""
    if ctype.kind == "primitive" or ctype.kind == "enum":
        if ctype.cname == "_Bool":
            return bool(value)
        if isinstance(value, ffi.CData):
            raise TypeError(f"{name}() argument {i + 1}: an integer is required, not {ffi.typeof(value)}")
        ffi.new(ctype.cname + " *", value)  # raises OverflowError / TypeError exactly as cffi does
        return int(value)
    if ctype.kind == "pointer":
        if isinstance(value, bytes) and ctype.item.cname in ("char", "void"):
            return value
        if value is None:
            raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got None")
        if not isinstance(value, ffi.CData):
            raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got {type(value).__name__}")
        t = ffi.typeof(value)
        if value == ffi.NULL or t is ctype or ctype.item.cname == "void" or t.cname == "void *":
            return value
        if t.kind in ("pointer", "array") and t.item is ctype.item:
            return value
        if t.kind in ("pointer", "array") and t.item.cname == ctype.item.cname:
            return value
        raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got {t.cname}")
    return value
