"""Build vdm-blk's optional compiled serve step (cffi API mode) into this package: ``_serve*.so``.

    python3 -m vdm_blk.fastserve.build        # what scripts/install.sh runs

Needs cffi, a C compiler and the Python headers; without one of them it prints one line,
``vdm-blk serve step not built: <why>``, and exits 0 (vdm-blk then serves every request in
Python). The C source is serve.c next to this file. Invariant: CDEF declares what serve.c defines.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["CDEF", "build", "main"]

HERE = Path(__file__).resolve().parent

CDEF = """
struct vdm_blk {
    int fd;
    int reads;
    int read_flags;
    int writes;
    int write_flags;
    uint64_t capacity;
    uint64_t write_max;
};
int vdm_blk_serve(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);
"""


def build(target_dir: Path = HERE) -> Path:
    """Compile serve.c into ``target_dir``; return the module's path. Raises on any failure."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "vdm_blk.fastserve._serve",
        (HERE / "serve.c").read_text(),
        extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wall", "-Werror"],
    )
    with tempfile.TemporaryDirectory(prefix="vdm-blk-serve-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target = target_dir / built.name
        partial = target.with_suffix(".tmp")
        shutil.copyfile(built, partial)
        partial.replace(target)  # (atomic: a running vdm keeps the module it loaded)
    return target


def main() -> int:
    try:
        path = build()
    except ImportError as e:
        print(f"vdm-blk serve step not built: cffi is not installed ({e}); vdm-blk serves in Python")
        return 0
    except Exception as e:  # (no compiler, no headers: one line, never a failed install)
        why = " ".join(str(e).split())[:300]
        print(f"vdm-blk serve step not built: {type(e).__name__}: {why}; vdm-blk serves in Python")
        return 0
    print(f"vdm-blk serve step built: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
