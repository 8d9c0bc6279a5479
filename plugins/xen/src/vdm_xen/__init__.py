"""vdm-xen: serve vdm's virtio devices to a Xen guest as an IOREQ server (``vdm dm-only``).

Modules, bottom up:

* :mod:`vdm_xen.sonames`, :mod:`vdm_xen.abi` -- the libraries and their C declarations (cffi ABI
  mode, checked against libxen-dev's headers by the tests);
* :mod:`vdm_xen.bindings` -- loading them by soname into one namespace (:class:`~vdm_xen.bindings.XenLib`);
* :mod:`vdm_xen.probe` -- is Xen usable here, and if not, exactly why (cheap, silent);
* :mod:`vdm_xen.ioreq` -- the IOREQ server and its state machine;
* :mod:`vdm_xen.memory`, :mod:`vdm_xen.irq` -- guest memory (foreign and grant mappings) and
  interrupt lines;
* :mod:`vdm_xen.vmm` -- the :class:`vdm.hookspecs.VmmSpec` hooks for one guest;
* :mod:`vdm_xen.xenstore` -- what libxl 4.17 writes for a standalone virtio disk, and the handshake;
* :mod:`vdm_xen.dm_only` -- the command; :mod:`vdm_xen.plugin` -- the plugin hooks;
* :mod:`vdm_xen.sim` -- a simulated Xen at the binding boundary, for tests and fuzzing.
"""
