"""What the simulated Xen keeps: domains, ioreq servers, event-channel handles, xenstore connections."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field


@dataclass
class SimServer:
    id: int
    domid: int
    emulator: int  # the domain that created it
    ports: list[int]  # Xen-side port per vCPU
    page_fd: int
    page: mmap.mmap
    enabled: bool = False
    mmio: list[tuple[int, int]] = field(default_factory=list)  # inclusive (start, end)
    pio: list[tuple[int, int]] = field(default_factory=list)
    legacy_gfn: int | None = None


@dataclass
class SimDomain:
    domid: int
    nr_vcpus: int
    alive: bool = True
    grants: dict[int, tuple[int, bool]] = field(default_factory=dict)  # gref -> (pfn, readonly)
    grant_maps: dict[int, int] = field(default_factory=dict)  # gref -> times mapped


class SimEvtchn:
    """One /dev/xen/evtchn open: a pipe of 4-byte port numbers."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.bound: dict[int, tuple[int, int]] = {}  # local port -> (domid, remote port)
        self.masked: set[int] = set()
        self.pending: set[int] = set()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class SimXsConn:
    """One xenstore connection: its watches and the pipe its watch events come through."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.watches: list[tuple[str, str]] = []
        self.queue: list[tuple[str, str]] = []

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
