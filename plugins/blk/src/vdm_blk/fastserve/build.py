"""Build vdm-blk's optional compiled serve step (cffi API mode) into this package: ``_serve*.so``.

    python3 -m vdm_blk.fastserve.build        # what scripts/install.sh runs

Needs cffi, a C compiler and the Python headers; without one of them it prints one line,
``vdm-blk serve step not built: <why>``, and exits 0 (vdm-blk then serves every request in
Python). The C source is serve.c next to this file. Invariant: CDEF declares what serve.c defines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vdm.fastpath.build import compile_module, report

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
    uint64_t defer_min;
    uint64_t deferred;
    int read_seen;
};
int vdm_blk_serve(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);
struct vdm_blk_q2 {
    struct vdm_blk d;
    uint64_t *map;
    uint64_t slots;
    uint32_t slot_bits;
    uint32_t cbits;
    int enabled;
    int busy;
};
int vdm_blk_serve_qcow2(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);
void vdm_blk_q2_remember(struct vdm_blk_q2 *q, uint64_t gc, uint64_t count, uint64_t host);
void vdm_blk_q2_block(struct vdm_blk_q2 *q);
void vdm_blk_q2_unblock(struct vdm_blk_q2 *q);
"""


def build(target_dir: Path = HERE) -> Path:
    """Compile serve.c into ``target_dir``; return the module's path. Raises on any failure."""
    return compile_module("vdm_blk.fastserve._serve", CDEF, HERE / "serve.c", target_dir)


def main() -> int:
    return report(build, "vdm-blk serve step", "vdm-blk serves in Python")


if __name__ == "__main__":
    sys.exit(main())
