"""Build vdm's optional compiled fast path (cffi API mode) into this package: ``vdm/fastpath/_ring*.so``.

    python3 -m vdm.fastpath.build        # what scripts/install.sh runs

Needs cffi, a C compiler and the Python headers. Without one of them it prints one line,
``fast path not built: <why>``, and exits 0: vdm then runs its pure-Python path (``vdm --version``
says which path is active). The C source is ring.c next to this file; the built module is
gitignored (``*.so``). Invariant: the declarations below are the ones ring.c defines.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["CDEF", "build", "compile_module", "main", "report"]

HERE = Path(__file__).resolve().parent

CDEF = """
#define VDM_FASTPATH_ABI ...
struct vdm_ring {
    const uint8_t *desc;
    const uint16_t *avail16;
    uint16_t *used16;
    const uint8_t *held;
    uint32_t held_len;
    uint32_t size;
    uint32_t limit;
    uint32_t avail_event16;
    int event_idx;
    int indirect;
    uint64_t flat_base;
    uint64_t flat_size;
    uint32_t used_event16;
    uint64_t *counts;
};
int vdm_walk(const struct vdm_ring *r, uint32_t head, uint64_t *st);
int vdm_walk_indirect(const struct vdm_ring *r, const uint8_t *table, uint32_t count, uint64_t *st);
int vdm_pop(const struct vdm_ring *r, uint32_t last, uint64_t *st);
typedef int (*vdm_serve_fn)(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);
struct vdm_batch {
    uint8_t *base;
    const uint64_t *regions;
    uint32_t nregions;
    uint32_t max;
    uint64_t room;
};
int vdm_serve_batch(const struct vdm_ring *r, const struct vdm_batch *b, vdm_serve_fn serve, void *ctx,
                    uint64_t *st, uint64_t *io);
int vdm_fill(const struct vdm_ring *r, const struct vdm_batch *b, uint8_t *data, uint64_t len, uint32_t last,
             uint32_t used_idx, uint64_t budget, uint32_t max, uint64_t min_len, uint64_t count_at,
             uint64_t *st);
"""


def compile_module(name: str, cdef: str, source: Path, target_dir: Path) -> Path:
    """Compile ``source`` (C) as the cffi API-mode module ``name`` declaring ``cdef`` into
    ``target_dir``; return its path. Raises on any failure. The file is replaced atomically: a
    running vdm keeps the module it loaded. (Plugins build their own compiled steps with it.)"""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    flags = ["-O2", "-fno-strict-aliasing", "-Wall", "-Werror"]
    ffi.set_source(name, source.read_text(), extra_compile_args=flags)
    with tempfile.TemporaryDirectory(prefix=name.replace(".", "-") + "-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target = target_dir / built.name
        partial = target.with_suffix(".tmp")
        shutil.copyfile(built, partial)
        partial.replace(target)
    return target


def report(build: Callable[[], Path], what: str, otherwise: str) -> int:
    """Run an install-time ``build`` and print one line: ``<what> built: <path>`` or ``<what> not
    built: <why>; <otherwise>``. Always 0: a missing compiler or cffi never fails an install."""
    try:
        path = build()
    except ImportError as e:
        print(f"{what} not built: {e.name or 'a module'} is not installed ({e}); {otherwise}")
        return 0
    except Exception as e:  # (no compiler, no headers, a read-only folder)
        why = " ".join(str(e).split())[:300]
        print(f"{what} not built: {type(e).__name__}: {why}; {otherwise}")
        return 0
    print(f"{what} built: {path}")
    return 0


def build(target_dir: Path = HERE) -> Path:
    """Compile ring.c into ``target_dir``; return the module's path. Raises on any failure."""
    return compile_module("vdm.fastpath._ring", CDEF, HERE / "ring.c", target_dir)


def main() -> int:
    return report(build, "fast path", "vdm uses its Python path")


if __name__ == "__main__":
    sys.exit(main())
