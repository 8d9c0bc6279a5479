"""Transports: how a driver reaches a device's features, status, queues and config space.

Transports live in the core, between a :class:`~vdm.device.VirtioDevice` and a hypervisor's I/O
registration; a device never knows which one carries it.
"""
