"""A simulated Xen, sitting exactly at the binding boundary (for tests and fuzzing; never for users).

:class:`SimXen` is the hypervisor plus dom0's kernel drivers; :meth:`SimXen.lib` returns a
:class:`SimLib`, a stand-in for :class:`vdm_xen.bindings.XenLib` with the same function names and
C signatures (arguments are converted and range-checked exactly as cffi converts them for the real
functions; results have the declared C types). Behind it:

* the shared ioreq page is real shared memory (a memfd page mapped twice: once by the "hypervisor",
  once by ``xenforeignmemory_map_resource`` with libc ``mmap``), laid out exactly as ``ioreq_t``;
* event channels are real file descriptors (a pipe per ``xenevtchn`` handle carrying port numbers,
  as ``/dev/xen/evtchn`` does), with Linux's mask-until-unmask delivery;
* guest RAM is a memfd; foreign and grant mappings are real ``mmap`` s of its pages;
* xenstore is an in-memory tree with watches delivered through a pipe fd; results are "malloc'ed"
  and must be given back with ``free``.

It checks the rules real Xen enforces and records every breach in :attr:`SimXen.violations` (a
guest-crashing one also raises :class:`GuestCrashed` in the guest's thread): no backward ioreq state
transition and no unknown state (Xen: "Weird HVM ioreq state transition" -> domain crash); a slot not
NONE when a new request comes ("device model set bad IO state"); one bound port per vCPU, bound to
the ``vp_eport`` Xen wrote at *enable*; MMIO ranges claimed (end inclusive) before the guest touches
them; ``map_resource`` only by the domain that created the server; every mapping, port, handle and
server released at exit (:meth:`SimXen.leaks`).

The guest side: :meth:`SimXen.mmio_read` / :meth:`SimXen.mmio_write` (a vCPU's access, blocking
until the device model answers), :meth:`SimXen.invalidate`, :attr:`SimXen.ram` (a
:class:`vdm.testing.memory.GuestRam` over the memfd), :meth:`SimXen.grant_range`, and the toolstack:
:meth:`SimXen.libxl_add_virtio_disk`, :meth:`SimXen.destroy_domain`.

Modules: :mod:`.xen` (:class:`SimXen`), :mod:`.guest` and :mod:`.toolstack` (its guest and
toolstack sides), :mod:`.lib` (:class:`SimLib`) with one module per library (:mod:`.devicemodel`,
:mod:`.foreignmemory`, :mod:`.evtchn`, :mod:`.gnttab`, :mod:`.xenstore`) over :mod:`.calls` and
:mod:`.signatures`, :mod:`.memory` (:class:`SimGuestRam`), :mod:`.state`, :mod:`.libc`, :mod:`.errors`.
"""

from __future__ import annotations

from .errors import GuestCrashed, UnclaimedAccess
from .lib import SimLib
from .memory import SimGuestRam
from .signatures import SIGNATURES
from .xen import SimXen

__all__ = ["SIGNATURES", "GuestCrashed", "SimGuestRam", "SimLib", "SimXen", "UnclaimedAccess"]
