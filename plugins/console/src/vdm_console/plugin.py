"""vdm-console's plugin module: registers the ``console`` device type (``--console``, ``[console]``).

``--console serial`` (the default kind) puts a 16550A UART on a legacy PC port through the
hypervisor's port I/O hook -- the guest's ttyS0; ``--console virtio`` makes a virtio-console
device -- hvc0. ``backend=`` chooses where it goes (``stdio``, ``pty``, ``socket:PATH``,
``file:PATH``, ``null``).
"""

from __future__ import annotations

from typing import Any, Callable

from vdm import hookimpl
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType

from .config import ConsoleConfig, parse_extra_ports

VDM_API = 2


def create(config: ConsoleConfig, ctx: DeviceContext) -> Any:
    """Build the console: a registered UART, or a VirtioConsole for the caller to attach."""
    from .backends import open_backend

    if config.kind == "serial":
        from .uart import attach_uart

        if ctx.vmm is None:
            raise UserError("--console serial needs a hypervisor with port I/O (use --console virtio)")
        backend = open_backend(config.backend, input_buffer=config.input_buffer)
        try:
            return attach_uart(ctx.vmm, backend, config.port, config.irq)
        except BaseException:
            backend.close()
            raise

    from .virtio import VirtioConsole

    opened = []
    try:
        console = open_backend(config.backend, input_buffer=config.input_buffer)
        opened.append(console)
        extra = []
        for name, spec in parse_extra_ports(config.ports):
            b = open_backend(spec, input_buffer=config.input_buffer)
            opened.append(b)
            extra.append((name, b))
        return VirtioConsole(console, extra, multiport=config.multiport, legacy_resize=config.legacy_resize)
    except BaseException:
        for b in opened:
            b.close()
        raise


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="console",
            config=ConsoleConfig,
            create=create,
            cli_flag="--console",
            positional="kind",
            toml_key="console",
            help="the guest's console: serial (16550A UART, ttyS0) or virtio (virtio-console, hvc0)",
            virtio_id=3,
            virtio_options="kind=virtio",
        )
    )
