"""console plugin of vdm: the guest's terminal, as a 16550A UART (ttyS0) or virtio-console (hvc0).

Modules:

* :mod:`vdm_console.backends` -- the host endpoints, one module each (stdio with its raw terminal
  and Ctrl-A escape, pty, unix socket, file, null, memory) on :mod:`vdm_console.backends.base`'s
  interface (output, bounded pull-model input); ``open_backend``;
* :mod:`vdm_console.uart` -- the 16550A UART (a PIO handler) and ``attach_uart``;
* :mod:`vdm_console.virtio` -- virtio-console with MULTIPORT, SIZE and EMERG_WRITE;
* :mod:`vdm_console.config` -- ``ConsoleConfig`` (``--console`` options, ``[console]`` table);
* :mod:`vdm_console.plugin` -- registers the ``console`` device type.
"""
