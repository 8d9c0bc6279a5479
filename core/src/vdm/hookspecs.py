"""The hooks a vdm plugin implements. These docstrings are the plugin author's manual.

There are two sets.

**Plugin hooks** (:class:`PluginSpec`, marker :data:`hookimpl`) are called once when vdm loads
plugins. They use the *register* style: the hook receives a ``register`` callable and hands it
objects; a plugin never mutates vdm's state. A plugin module implements them as plain functions::

    from vdm import hookimpl
    from vdm.registry import DeviceType

    @hookimpl
    def vdm_register_devices(register):
        register(DeviceType(name="rng", config=RngConfig, create=make_rng, cli_flag="--rng"))

**VMM hooks** (:class:`VmmSpec`, marker :data:`vmmimpl`) are the hypervisor operations a device
needs -- the ``vmm_impl`` of the kvmtool-for-Xen proposal. A hypervisor plugin implements them on
an object (one per running VM) and registers that object with a :class:`vdm.vmm.Vmm`; device
setup code calls them through the ``Vmm``. They are setup-time operations: the objects they
return (guest memory, IRQ lines) are then used directly on hot paths. Each is ``firstresult``:
the first implementation that returns something other than ``None`` answers; ``None`` means "this
hypervisor cannot do that" and vdm falls back (for example to plain MMIO exits without ioeventfd).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .interrupts import IrqLine
    from .iorange import IoHandler
    from .memory import GuestMemory
    from .registry import Command, DeviceType, HypervisorType, ServerType

__all__ = ["PluginSpec", "VmmSpec", "hookimpl", "hookspec", "vmmimpl", "vmmspec"]

PROJECT = "vdm"
VMM_PROJECT = "vdm_vmm"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin module's implementation of a :class:`PluginSpec` hook.
hookimpl = pluggy.HookimplMarker(PROJECT)
vmmspec = pluggy.HookspecMarker(VMM_PROJECT)
#: Marks a hypervisor backend object's implementation of a :class:`VmmSpec` hook.
vmmimpl = pluggy.HookimplMarker(VMM_PROJECT)


class PluginSpec:
    """Hooks called once per process when plugins are loaded.

    vdm imports the plugin module and calls these hooks in a worker thread, each within the
    plugin time bound (``--plugin-timeout`` or ``VDM_PLUGIN_TIMEOUT``, default 10 s); what the
    plugin prints goes to stderr. An exception of any kind (``SystemExit`` and
    ``KeyboardInterrupt`` included), a hook that does not return in time, or an invalid object
    handed to ``register`` fails that plugin alone: it is listed as ``failed`` and provides nothing.
    """

    @hookspec
    def vdm_register_devices(self, register: Callable[[DeviceType], None]) -> None:
        """Contribute device types (``blk``, ``net``, ``console``, ...).

        :param register: call it with one :class:`vdm.registry.DeviceType` per device type. The
            type names its configuration dataclass (parsed from CLI options such as
            ``--disk path,ro`` and from a TOML VM file's tables) and a factory that builds the
            device -- a :class:`vdm.device.VirtioDevice`, or a platform device such as a UART.
            Each object is checked when registered: a ``DeviceType`` with a short ``name``
            (letters, digits, ``_.-``), a dataclass as ``config``, a callable ``create``,
            ``cli_flag`` like ``--name``, ``cli_short`` like ``-x``, ``positional`` naming a field
            and a bare ``toml_key``.
        :returns: nothing; return values are ignored.

        Called when vdm loads plugins, before any command runs. Keep it cheap: import heavy
        modules inside the factory, not at module level, so ``vdm list-plugins`` stays fast.
        """

    @hookspec
    def vdm_register_hypervisors(self, register: Callable[[HypervisorType], None]) -> None:
        """Contribute hypervisors (``kvm``, ``xen``, ...): VMs driven through the VMM hooks.

        :param register: call it with one :class:`vdm.registry.HypervisorType` per hypervisor.
            A way of serving devices that implements no VMM hook (vhost-user) is a server:
            see :meth:`vdm_register_servers`.
            Its ``check`` callable says whether the hypervisor is usable here: it returns ``None``
            when available, or a one-line reason ("Xen libraries not installed (...)"). ``check``
            runs when ``vdm list-plugins`` shows the plugin and before a command uses it; it must
            be fast, must not print, and may raise only by mistake (vdm reports the exception).
            A check that raises, does not answer within the plugin time bound or returns
            anything but ``None`` or a string makes the hypervisor unavailable with that reason.
        :returns: nothing.

        Called when vdm loads plugins.
        """

    @hookspec
    def vdm_register_servers(self, register: Callable[[ServerType], None]) -> None:
        """Contribute servers (``vhost-user``, ...): ways of serving devices that are no hypervisor.

        :param register: call it with one :class:`vdm.registry.ServerType` per server. A server
            owns its transport (a vhost-user frontend drives the rings over a socket) and
            implements no VMM hook. Its ``check`` works as a hypervisor's: ``None`` when usable
            here, else a one-line reason. The command that runs it is registered separately
            (:meth:`vdm_register_commands`).
        :returns: nothing.

        Called when vdm loads plugins (plugin API 2; an API-1 plugin that registered such a
        server as a ``HypervisorType`` is still listed as a hypervisor, with a deprecation).
        """

    @hookspec
    def vdm_register_commands(self, register: Callable[[Command], None]) -> None:
        """Contribute subcommands of ``vdm`` (``run``, ``vhost-user``, ``dm-only``, ...).

        :param register: call it with one :class:`vdm.registry.Command` per subcommand. A command
            may carry an ``available`` check: while it returns a reason, ``vdm --help`` lists
            the command as unavailable, ``vdm COMMAND --help`` shows its options and that
            reason, and invoking it prints the reason instead of running. ``add_arguments`` gets
            the command's parser, whose default ``plugin_set`` is the loaded
            :class:`vdm.plugins.PluginSet` (``parser.get_default("plugin_set")``). The name
            must be short (letters, digits, ``_.-``, not starting with ``-``); ``add_arguments``
            and ``run`` must be callable.
        :returns: nothing.

        Called when vdm loads plugins, before the command line is parsed.
        """


class VmmSpec:
    """Hypervisor operations for one running VM, implemented by a hypervisor backend object."""

    @vmmspec(firstresult=True)
    def vmm_guest_memory(self) -> GuestMemory | None:
        """Return the :class:`vdm.memory.GuestMemory` devices use for this VM.

        A hypervisor with guest RAM mapped in advance (KVM, vhost-user) returns a
        :class:`vdm.memory.FlatGuestMemory`. A hypervisor that maps on demand may instead
        implement :meth:`vmm_map_guest` and :meth:`vmm_unmap_guest`; vdm-core then builds an
        :class:`vdm.memory.OnDemandGuestMemory` over them.

        Called once per device at attach time.
        """

    @vmmspec(firstresult=True)
    def vmm_map_guest(self, first_page: int, count: int, writable: bool) -> memoryview | None:
        """Map ``count`` guest pages starting at guest page number ``first_page``.

        :returns: a writable (if ``writable``) view of ``count * 4096`` bytes, or ``None`` if this
            hypervisor maps all memory in advance. Raise :class:`vdm.memory.GuestMemoryError`
            when the pages are not guest RAM.

        Called by the on-demand guest memory whenever a request touches pages it has not mapped.
        """

    @vmmspec(firstresult=True)
    def vmm_unmap_guest(self, view: memoryview, count: int) -> bool | None:
        """Release a mapping made by :meth:`vmm_map_guest` (``count`` pages). Return True."""

    @vmmspec(firstresult=True)
    def vmm_allocate_irq(self, owner: str) -> int | None:
        """Allocate an interrupt line for device ``owner``; return its number (GSI or SPI).

        Called once per device at attach time, unless the device's configuration fixes the line.
        """

    @vmmspec(firstresult=True)
    def vmm_allocate_mmio(self, size: int, owner: str) -> int | None:
        """Allocate ``size`` bytes of guest-physical MMIO space for ``owner``; return the base.

        Called once per MMIO device at attach time, unless the configuration fixes the base.
        """

    @vmmspec(firstresult=True)
    def vmm_register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> bool | None:
        """Route guest MMIO accesses to ``[base, base + size)`` to ``handler``.

        :param handler: an :class:`vdm.iorange.IoHandler`; it gets offsets relative to ``base``.
        :returns: True once routed. Raise ``ValueError`` if the range overlaps another.

        Called at attach time; accesses may arrive from any vCPU or I/O thread afterwards.
        """

    @vmmspec(firstresult=True)
    def vmm_register_pio(self, port: int, count: int, handler: IoHandler, owner: str) -> bool | None:
        """Route guest port I/O to ports ``[port, port + count)`` to ``handler`` (x86 only).

        :returns: True once routed, ``None`` if the hypervisor has no port I/O.
        """

    @vmmspec(firstresult=True)
    def vmm_set_irq_level(self, irq: int, level: bool) -> bool | None:
        """Drive interrupt line ``irq`` to ``level`` (inject, raise or lower). Return True.

        Called from device threads whenever an interrupt is raised or lowered.
        """

    @vmmspec(firstresult=True)
    def vmm_irq_line(self, irq: int) -> IrqLine | None:
        """Return an :class:`vdm.interrupts.IrqLine` for ``irq``.

        Optional: vdm-core provides a default built on :meth:`vmm_set_irq_level`. Implement it to
        give devices a faster line (for example one backed by an irqfd).
        """

    @vmmspec(firstresult=True)
    def vmm_send_msi(self, address: int, data: int) -> bool | None:
        """Deliver a message-signalled interrupt (MSI/MSI-X) as programmed by the guest.

        :returns: True if delivered, ``None`` if the hypervisor has no MSI.
        """

    @vmmspec(firstresult=True)
    def vmm_ioeventfd(self, addr: int, size: int, datamatch: int | None, fd: int, pio: bool) -> bool | None:
        """Make guest writes of ``datamatch`` to ``addr`` signal eventfd ``fd`` without an exit.

        This is the notify path for a virtqueue kick (QueueNotify: a ``size``-byte write of the
        queue index). ``datamatch`` None matches any value.

        :returns: True if installed; ``None`` if unsupported (vdm then handles the write in the
            MMIO/PIO handler).
        """

    @vmmspec(firstresult=True)
    def vmm_irqfd(self, irq: int, fd: int) -> bool | None:
        """Make a write to eventfd ``fd`` raise interrupt line ``irq`` in the hypervisor.

        :returns: True if installed; ``None`` if unsupported (vdm then uses
            :meth:`vmm_set_irq_level`).
        """
