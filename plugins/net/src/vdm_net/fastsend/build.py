"""Build vdm-net's optional compiled transmit step (cffi API mode) into this package: ``_send*.so``.

    python3 -m vdm_net.fastsend.build        # what scripts/install.sh runs

Needs cffi, a C compiler and the Python headers; without one of them it prints one line,
``vdm-net transmit step not built: <why>``, and exits 0 (vdm-net then transmits every frame in
Python). The C source is send.c next to this file. Invariant: CDEF declares what send.c defines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vdm.fastpath.build import compile_module, report

__all__ = ["CDEF", "build", "main"]

HERE = Path(__file__).resolve().parent

CDEF = """
struct vdm_net_tx {
    int fd;
    int csum, tso4, tso6, ecn, ufo, uso;
    int64_t mtu;
    uint64_t bytes;
    int err;
};
int vdm_net_tx_send(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);
"""


def build(target_dir: Path = HERE) -> Path:
    """Compile send.c into ``target_dir``; return the module's path. Raises on any failure."""
    return compile_module("vdm_net.fastsend._send", CDEF, HERE / "send.c", target_dir)


def main() -> int:
    return report(build, "vdm-net transmit step", "vdm-net transmits in Python")


if __name__ == "__main__":
    sys.exit(main())
