"""One VM's hypervisor operations, and attaching devices to it through a transport.

A hypervisor plugin builds a backend object implementing the :class:`~vdm.hookspecs.VmmSpec`
hooks and hands it to :class:`Vmm`. Setup code (``vdm run``, ``vdm dm-only``) then attaches
devices with :meth:`Vmm.attach_mmio`; the device itself only ever sees guest memory and its
transport.

Invariant: nothing per interrupt or per mapping goes through pluggy's dispatch. The hook
implementations are resolved once, when the :class:`Vmm` is made (:class:`ResolvedHooks`), to
plain calls of the backends' bound methods in pluggy's order with its ``firstresult`` meaning;
``Vmm.hook`` (pluggy's relay) stays for setup-time calls. Backends are therefore given to the
constructor; one registered on ``Vmm.pm`` later needs :meth:`Vmm.resolve_hooks`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol

import pluggy

from .device import VirtioDevice
from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from .eventloop import EventLoop, drain_eventfd
from .hookspecs import VMM_PROJECT, VmmSpec, vmmimpl
from .interrupts import CallbackIrqLine, IrqLine
from .iorange import IoHandler
from .memory import GuestMemory, GuestMemoryError, OnDemandGuestMemory
from .transport.mmio import MMIO_WINDOW_SIZE, MmioTransport, Reg
from .transport.pci import BAR_SIZE, NOTIFY_OFFSET, VirtioPciTransport


class PciBus(Protocol):
    """The part of a PCI bus :meth:`Vmm.attach_pci` uses (vdm-kvm's ``vdm_kvm.pci_bus.PciBus``)."""

    def add(self, function: VirtioPciTransport, slot: int | None = None) -> int:
        """Put ``function`` in a free slot (or ``slot``) and return the slot number."""
        ...

__all__ = ["ResolvedHooks", "Vmm", "VmmError"]

log = logging.getLogger(__name__)


class VmmError(RuntimeError):
    """The hypervisor backend cannot do what device setup asked for."""


def _first_result(caller: pluggy.HookCaller) -> Callable[..., Any]:
    """``caller``'s implementations as one plain function (keyword arguments, as pluggy takes them).

    Same answer as ``caller(**kwargs)`` for a ``firstresult`` hook: the implementations in pluggy's
    call order (last registered first, ``tryfirst``/``trylast`` honoured), each given only the
    arguments it names, the first non-``None`` result wins, none is ``None``. A hook with a wrapper
    implementation keeps pluggy's dispatch (a wrapper's semantics are pluggy's to keep).
    """
    impls = list(reversed(caller.get_hookimpls()))
    if any(i.hookwrapper or getattr(i, "wrapper", False) for i in impls):
        return lambda **kwargs: caller(**kwargs)
    spec = caller.spec
    spec_args = tuple(spec.argnames) if spec is not None else ()
    calls = [(i.function, tuple(i.argnames)) for i in impls]
    if not calls:
        return lambda **kwargs: None
    if len(calls) == 1 and calls[0][1] == spec_args:
        return calls[0][0]  # the backend's bound method itself

    def first(**kwargs: Any) -> Any:
        for fn, names in calls:
            result = fn(*[kwargs[n] for n in names])
            if result is not None:
                return result
        return None

    return first


class ResolvedHooks:
    """Every :class:`~vdm.hookspecs.VmmSpec` hook of one plugin manager as a plain callable.

    ``ResolvedHooks(pm).vmm_send_msi(address=a, data=d)`` answers as ``pm.hook.vmm_send_msi(...)``
    would at the time it was made, without pluggy's dispatch.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        for name in dir(VmmSpec):
            if name.startswith("vmm_"):
                setattr(self, name, _first_result(getattr(pm.hook, name)))

    def __getattr__(self, name: str) -> Callable[..., Any]:  # for type checkers: set in __init__
        raise AttributeError(name)


class _HookMapper:
    """A PageMapper over the vmm_map_guest / vmm_unmap_guest hooks (resolved when used first)."""

    def __init__(self, vmm: Vmm) -> None:
        self._vmm = vmm

    def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
        view = self._vmm.ops.vmm_map_guest(first_page=first_page, count=count, writable=writable)
        if view is None:
            raise GuestMemoryError("the hypervisor backend cannot map guest memory")
        return view

    def unmap_pages(self, view: memoryview, count: int) -> None:
        self._vmm.ops.vmm_unmap_guest(view=view, count=count)


class _CoreDefaults:
    """Fallback implementations vdm-core provides on top of the backend's hooks."""

    def __init__(self, vmm: Vmm) -> None:
        self._vmm = vmm

    @vmmimpl(trylast=True)
    def vmm_irq_line(self, irq: int) -> IrqLine:
        set_irq_level = self._vmm.ops.vmm_set_irq_level  # resolved: no pluggy call per interrupt
        return CallbackIrqLine(lambda level: set_irq_level(irq=irq, level=level))

    @vmmimpl(trylast=True)
    def vmm_guest_memory(self) -> GuestMemory:
        return OnDemandGuestMemory(_HookMapper(self._vmm))


class Vmm:
    """The hypervisor operations of one VM, through its backend's hooks."""

    def __init__(self, *backends: object, name: str = "vdm") -> None:
        self.name = name
        self.pm = pluggy.PluginManager(VMM_PROJECT)
        self.pm.add_hookspecs(VmmSpec)
        self.pm.register(_CoreDefaults(self), name="vdm-core-defaults")
        for backend in backends:
            self.pm.register(backend)
        self.pm.check_pending()
        #: pluggy's relay, for setup-time calls; per-event paths use :attr:`ops`
        self.hook = self.pm.hook
        self.ops = ResolvedHooks(self.pm)
        self.events = EventLoop(f"{name}-events")
        self._memory: GuestMemory | None = None
        self._fds: list[int] = []
        self.transports: list[MmioTransport | VirtioPciTransport] = []

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            self._memory = self.hook.vmm_guest_memory()
        assert self._memory is not None
        return self._memory

    # ---- thin wrappers that fail loudly when the backend cannot ---------------------------------

    def allocate_irq(self, owner: str) -> int:
        irq = self.hook.vmm_allocate_irq(owner=owner)
        if irq is None:
            raise VmmError(f"{owner}: the hypervisor backend cannot allocate an interrupt line")
        return irq

    def allocate_mmio(self, size: int, owner: str) -> int:
        base = self.hook.vmm_allocate_mmio(size=size, owner=owner)
        if base is None:
            raise VmmError(f"{owner}: the hypervisor backend cannot allocate MMIO space")
        return base

    def register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> None:
        if not self.hook.vmm_register_mmio(base=base, size=size, handler=handler, owner=owner):
            raise VmmError(f"{owner}: the hypervisor backend cannot route MMIO")

    def register_pio(self, port: int, count: int, handler: IoHandler, owner: str) -> None:
        if not self.hook.vmm_register_pio(port=port, count=count, handler=handler, owner=owner):
            raise VmmError(f"{owner}: the hypervisor backend has no port I/O")

    def irq_line(self, irq: int) -> IrqLine:
        return self.hook.vmm_irq_line(irq=irq)

    def send_msi(self, address: int, data: int) -> bool:
        """Deliver an MSI (per interrupt: the resolved implementation, not pluggy's dispatch)."""
        return bool(self.ops.vmm_send_msi(address=address, data=data))

    def resolve_hooks(self) -> None:
        """Resolve the hooks again, after a backend was registered on :attr:`pm` directly.

        Interrupt lines and memory handed out before keep the implementations they were made with.
        """
        self.pm.check_pending()
        self.ops = ResolvedHooks(self.pm)

    # ---- devices ---------------------------------------------------------------------------------

    def attach_mmio(
        self, device: VirtioDevice, base: int | None = None, irq: int | None = None
    ) -> MmioTransport:
        """Put ``device`` behind a virtio-mmio window: MMIO space, an IRQ, and kick eventfds."""
        owner = f"{device.name}"
        if base is None:
            base = self.allocate_mmio(MMIO_WINDOW_SIZE, owner)
        if irq is None:
            irq = self.allocate_irq(owner)
        transport = MmioTransport(device, self.memory, self.irq_line(irq), base=base, irq_number=irq)
        self.register_mmio(base, MMIO_WINDOW_SIZE, transport, owner)
        for q in device.queues:
            self._kick_eventfd(device, q.index, base + Reg.QUEUE_NOTIFY, pio=False)
        self._bound_kicks(device)
        self.transports.append(transport)
        return transport

    def attach_pci(self, device: VirtioDevice, bus: PciBus, *, intx: bool = True) -> VirtioPciTransport:
        """Put ``device`` on ``bus`` as a virtio-pci function: a memory BAR, MSI-X, INTx, kick eventfds."""
        owner = f"{device.name}"
        bar = self.allocate_mmio(BAR_SIZE, owner)
        irq = self.allocate_irq(owner) if intx else None
        transport = VirtioPciTransport(
            device,
            self.memory,
            msi=self,
            intx=self.irq_line(irq) if irq is not None else None,
            bar_address=bar,
            irq_line=irq or 0,
        )
        transport.slot = bus.add(transport)
        self.register_mmio(bar, BAR_SIZE, transport, owner)
        for q in device.queues:
            # the driver writes the queue index as 16 bits at the queue's own notify address
            self._kick_eventfd(device, q.index, bar + NOTIFY_OFFSET + 4 * q.index, pio=False, size=2)
        self._bound_kicks(device)
        self.transports.append(transport)
        return transport

    def _bound_kicks(self, device: VirtioDevice) -> None:
        """Each kick (ioeventfd or MMIO handler) walks a bounded slice; the rest runs on the loop."""
        device.serve_on(self.events)
        self.events.start()

    def _kick_eventfd(self, device: VirtioDevice, index: int, addr: int, pio: bool, size: int = 4) -> bool:
        """Route guest kicks of queue ``index`` (the index written at ``addr``) to an eventfd."""
        fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if not self.hook.vmm_ioeventfd(addr=addr, size=size, datamatch=index, fd=fd, pio=pio):
            os.close(fd)
            return False
        self._fds.append(fd)

        def on_kick() -> None:
            if drain_eventfd(fd):
                device.kick(index)

        self.events.add_reader(fd, on_kick)
        self.events.start()
        return True

    def close(self) -> None:
        """Stop device work and release what attach_* made."""
        for t in self.transports:
            t.device.reset()
            t.device.stop_serving()
        if self.events.started:
            self.events.stop()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
