"""vdm_kvm's pre-parsed KVM ABI (``python3 -m vdm_kvm.abi_build``): the same declarations as the
parse it replaces, used when current, and the parse used when the cache is absent, stale or broken.

No /dev/kvm needed: these load declarations and compare cffi's types; nothing is called.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from vdm_kvm import abi_build, kvm_abi

PACKAGE = Path(kvm_abi.__file__).resolve().parent


def _layout(ffi: Any) -> dict[str, Any]:
    """Every declared type's size, alignment and fields (name, C type, offset), by name."""
    typedefs, structs, unions = ffi.list_types()
    out: dict[str, Any] = {}
    for name in typedefs:
        out[name] = (ffi.sizeof(name), ffi.alignof(name))
    for kind, names in (("struct", structs), ("union", unions)):
        for name in names:
            t = ffi.typeof(f"{kind} {name}")
            fields = [(f, ft.type.cname, ft.offset, ft.bitsize) for f, ft in t.fields]
            out[f"{kind} {name}"] = (ffi.sizeof(t), ffi.alignof(t), fields)
    return out


def _functions(ffi: Any, names: tuple[str, ...]) -> dict[str, str]:
    lib = ffi.dlopen(None)
    return {n: ffi.typeof(getattr(lib, n)).cname for n in names}


@pytest.fixture
def cache_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A freshly built cache, importable under a name of its own (no clash with other tests')."""
    built = abi_build.build(tmp_path)
    name = f"kvm_abi_cache_{uuid.uuid4().hex}"
    built.rename(tmp_path / f"{name}.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_cache_holds_the_same_declarations_as_the_parse(cache_module: str) -> None:
    cached, cached_fixed, source = kvm_abi.load_declarations(cache_module)
    assert source == "cache"
    parsed, parsed_fixed, parsed_source = kvm_abi.load_declarations(f"no_such_module_{uuid.uuid4().hex}")
    assert parsed_source == "cdef"
    layout = _layout(parsed)
    assert "struct kvm_run" in layout and len(layout) > 30  # (the comparison below covers something)
    assert _layout(cached) == layout
    assert _layout(cached_fixed) == _layout(parsed_fixed)
    assert _functions(cached, ("ioctl", "pthread_kill")) == _functions(parsed, ("ioctl", "pthread_kill"))
    assert _functions(cached_fixed, ("ioctl",)) == _functions(parsed_fixed, ("ioctl",)) == {
        "ioctl": "int(*)(int, unsigned long, unsigned long)"
    }
    # the figures the ioctl numbers are computed from, both ways
    for name in ("struct kvm_run", "struct kvm_sregs", "struct kvm_irq_routing_entry", "struct kvm_cpuid2"):
        assert cached.sizeof(name) == parsed.sizeof(name)
    assert cached.offsetof("struct kvm_run", "io") == parsed.offsetof("struct kvm_run", "io") == 32


def test_stale_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_module: str) -> None:
    """A cache built from other declarations (or another cffi) says so by its DIGEST: not used."""
    text = (tmp_path / f"{cache_module}.py").read_text()
    stale = f"kvm_abi_stale_{uuid.uuid4().hex}"
    old = text.replace(f"DIGEST = {kvm_abi.cdef_digest()!r}", "DIGEST = 'built-from-older-declarations'")
    assert old != text
    (tmp_path / f"{stale}.py").write_text(old)
    ffi, _fixed, source = kvm_abi.load_declarations(stale)
    assert source == "cdef"
    assert ffi.sizeof("struct kvm_run") == 2352


def test_broken_or_absent_cache_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = f"kvm_abi_broken_{uuid.uuid4().hex}"
    (tmp_path / f"{broken}.py").write_text("import _cffi_backend\nffi = _cffi_backend.FFI('x', _version=1)\n")
    for name in (broken, f"kvm_abi_absent_{uuid.uuid4().hex}"):
        ffi, _fixed, source = kvm_abi.load_declarations(name)
        assert source == "cdef"
        assert ffi.sizeof("struct kvm_sregs") == 312


def _start(pythonpath: Path) -> list[str]:
    """What a fresh ``import vdm_kvm.kvm_abi`` from ``pythonpath`` reports: SOURCE and the parser's use."""
    code = (
        "import sys, vdm_kvm.kvm_abi as a; "
        "print(a.SOURCE, a.__file__, 'pycparser' in sys.modules, a.ffi.sizeof('struct kvm_run'))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_a_start_uses_the_installed_cache_without_the_parser(tmp_path: Path) -> None:
    """The package as installed (a copy here): with the cache next to kvm_abi, importing it loads no
    pycparser; with the cache removed, or from older declarations, it parses as before."""
    pkg = tmp_path / "vdm_kvm"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", abi_build.CACHE_FILE))
    source, where, parser, size = _start(tmp_path)
    assert (source, parser, size) == ("cdef", "True", "2352")
    assert Path(where).parent == pkg  # (the copy, not the editable install, was imported)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vdm_kvm.abi_build as b; sys.exit(b.main())"],
        capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stdout.startswith("kvm ABI cache built: "), out.stdout + out.stderr
    assert (pkg / abi_build.CACHE_FILE).is_file()
    assert _start(tmp_path)[::2] == ["cache", "False"]
    cache = pkg / abi_build.CACHE_FILE
    cache.write_text(cache.read_text().replace("DIGEST = '", "DIGEST = 'x"))
    assert _start(tmp_path)[::2] == ["cdef", "True"]


def test_build_says_why_in_one_line_when_it_cannot_write(tmp_path: Path) -> None:
    """A read-only package folder: one line, exit 0 (an install does not fail over a cache)."""
    pkg = tmp_path / "vdm_kvm"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", abi_build.CACHE_FILE))
    (pkg / (abi_build.CACHE_FILE[:-3] + ".tmp")).mkdir()  # the partial file's name is taken by a folder
    out = subprocess.run(
        [sys.executable, "-m", "vdm_kvm.abi_build"], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvm ABI cache not built: "), out.stdout + out.stderr
    assert not (pkg / abi_build.CACHE_FILE).exists()
