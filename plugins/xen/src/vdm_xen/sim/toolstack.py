"""The simulated Xen as the toolstack sees it: the xenstore tree, libxl adding a virtio disk (4.17)
or a generic virtio device (4.18+), a domain dying.
"""

from __future__ import annotations

import time


class Toolstack:
    """xenstore writes and domain life cycle; mixed into :class:`~vdm_xen.sim.xen.SimXen`."""

    # ---- xenstore, as the toolstack sees it -------------------------------------------------------

    def xs_write(self, path: str, value: str) -> None:
        with self.lock:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                self.store.setdefault("/" + "/".join(parts[:i]), "")
            self.store[path] = value
            self.xs_writes.append((path, value))
            hooks = list(self.on_xs_write)
            fire = self._watchers(path)
        for hook in hooks:
            hook(path, value)
        for c, p, t in fire:
            self.fire_watch(c, p, t)

    def xs_rm(self, path: str) -> bool:
        with self.lock:
            gone = [k for k in self.store if k == path or k.startswith(path + "/")]
            for k in gone:
                del self.store[k]
            fire = self._watchers(path)
        for c, p, t in fire:
            self.fire_watch(c, p, t)
        return bool(gone)

    def xs_children(self, path: str) -> list[str] | None:
        with self.lock:
            if path not in self.store:
                return None
            pre = path.rstrip("/") + "/"
            return sorted({k[len(pre) :].split("/")[0] for k in self.store if k.startswith(pre)})

    def libxl_add_virtio_disk(
        self, devid: int, params: str, *, base: int, irq: int, mode: str = "w", be_domid: int = 0
    ) -> str:
        """Write what Xen 4.17's libxl writes for ``backendtype=standalone,specification=virtio``."""
        fe = self.domid
        be_path = f"/local/domain/{be_domid}/backend/virtio_disk/{fe}/{devid}"
        fe_path = f"/local/domain/{fe}/device/virtio_disk/{devid}"
        for k, v in {
            "backend-id": str(be_domid),
            "state": "1",
            "virtual-device": str(devid),
            "device-type": "disk",
            "backend": be_path,
        }.items():
            self.xs_write(f"{fe_path}/{k}", v)
        for k, v in {
            "frontend": fe_path,
            "frontend-id": str(fe),
            "online": "1",
            "removable": "0",
            "bootable": "1",
            "dev": "xvda",
            "type": "standalone",
            "mode": mode,
            "device-type": "disk",
            "discard-enable": "0",
            "specification": "virtio",
            "transport": "mmio",
            "base": str(base),
            "irq": str(irq),
            "params": params,
            "state": "1",
        }.items():
            self.xs_write(f"{be_path}/{k}", v)
        return be_path

    def libxl_add_virtio(
        self,
        devid: int,
        vtype: str,
        *,
        base: int,
        irq: int,
        grant_usage: bool = False,
        be_domid: int = 0,
    ) -> str:
        """Write what Xen 4.18+ libxl writes for ``virtio = [ "type=<vtype>, transport=mmio, ..." ]``
        (libxl_virtio.c: ``base`` in 0x hex, ``irq`` decimal); returns the backend directory."""
        fe = self.domid
        be_path = f"/local/domain/{be_domid}/backend/virtio/{fe}/{devid}"
        fe_path = f"/local/domain/{fe}/device/virtio/{devid}"
        for k, v in {"backend-id": str(be_domid), "state": "1", "backend": be_path}.items():
            self.xs_write(f"{fe_path}/{k}", v)
        for k, v in {
            "frontend": fe_path,
            "frontend-id": str(fe),
            "online": "1",
            "state": "1",
            "irq": str(irq),
            "base": f"{base:#x}",
            "type": vtype,
            "transport": "mmio",
            "grant_usage": "1" if grant_usage else "0",
        }.items():
            self.xs_write(f"{be_path}/{k}", v)
        return be_path

    def wait_xs(self, path: str, value: str, timeout: float | None = None) -> None:
        """Wait (as libxl does) until ``path`` holds ``value``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.store.get(path) != value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} is {self.store.get(path)!r}, never {value!r}")
            time.sleep(0.002)

    def destroy_domain(self, domid: int | None = None) -> None:
        """The guest dies: Xen frees its servers and ports; @releaseDomain fires."""
        domid = self.domid if domid is None else domid
        with self.lock:
            self.domains[domid].alive = False
            fire = self._watchers("@releaseDomain")
        for c, p, t in fire:
            self.fire_watch(c, p, t)
