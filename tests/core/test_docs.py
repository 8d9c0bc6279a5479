"""The docs name only what exists: every module, class, method and attribute they show in code.

What is checked, in docs/*.md, README.md, lab/README.md and plugins/*/README.md:

* an inline code span that is a dotted path from a vdm distribution (``vdm.transport.common``,
  ``vdm_kvm.vmm.KvmVmm``, ``vdm.virtqueue.Virtqueue.set_size``) imports and resolves;
* ``Class.member`` where ``Class`` is a class some vdm module exports (``Vmm.ops``,
  ``VirtioDevice.serve_on``) has that member;
* ``name()`` is a function, or a method or attribute of some vdm class;
* in a fenced python block, each ``def`` under a ``class X:`` whose name is a vdm class exists on
  that class (the architecture page's API listings).

A name that a page shows on purpose although it no longer exists (the old side of "Changes in API
2", an entry-point group, a placeholder) is listed in :data:`NOT_CODE` with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [
        *REPO.glob("docs/*.md"),
        REPO / "README.md",
        REPO / "lab" / "README.md",
        *REPO.glob("plugins/*/README.md"),
    ]
)
#: the installed vdm packages (core, plugins, vdm_lab, examples): the names the docs may show
ROOTS = tuple(sorted(m.name for m in pkgutil.iter_modules() if m.name == "vdm" or m.name.startswith("vdm_")))

#: shown on purpose though not importable as code, and why
NOT_CODE = {
    "vdm_NAME": "placeholder for a plugin's package",
    "vdm_blk.plugins": "an entry-point group, not a module",
    "opener(uri, *, read_only, options)": "the signature a protocol's opener has (any name)",
    "vdm.pci": "removed in API 2 (the page says where it went)",
    "vdm_kvm.vmm.KvmBackend": "API-1 name of KvmVmm (the page says so)",
    "vdm_xen.backend": "API-1 module of XenVmm (the page says so)",
    "vdm_vhost_user.backend": "API-1 module of VhostUserHandler (the page says so)",
}

SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
DOTTED = re.compile(r"(?:{})(?:\.\w+)*(?:\([^()]*\))?".format("|".join(ROOTS)))
MEMBER = re.compile(r"([A-Z]\w*)\.(\w+)(?:\([^()]*\))?")
CALL = re.compile(r"([a-z_]\w*)\([^()]*\)")


@cache
def modules() -> dict[str, object]:
    """Every importable module of the vdm distributions (every one imports on this machine today; one
    that stops importing makes the names the docs show under it fail, which is what we want)."""
    found: dict[str, object] = {}
    with warnings.catch_warnings():  # deprecated aliases (vdm.hypervisor) import with a warning
        warnings.simplefilter("ignore", DeprecationWarning)
        _import_all(found)
    return found


def _import_all(found: dict[str, object]) -> None:
    for root in ROOTS:
        try:
            pkg = importlib.import_module(root)
        except ImportError:
            continue
        found[root] = pkg
        for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), root + "."):
            if info.name.endswith(".__main__"):
                continue  # a command line, not an API
            try:
                found[info.name] = importlib.import_module(info.name)
            except Exception:  # reported through the names that no longer resolve
                continue


@cache
def classes() -> dict[str, list[type]]:
    """Class name -> the vdm classes of that name (defined in a vdm module)."""
    by_name: dict[str, list[type]] = {}
    for mod in modules().values():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__.split(".")[0] in ROOTS:
                if obj not in by_name.setdefault(name, []):
                    by_name[name].append(obj)
    return by_name


@cache
def callables() -> frozenset[str]:
    """Names of every callable of a vdm module (functions, pytest fixtures...) and every member
    of a vdm class."""
    names: set[str] = set()
    for mod in modules().values():
        for name, obj in vars(mod).items():
            if callable(obj) and not inspect.isclass(obj):
                names.add(name)
    for group in classes().values():
        for cls in group:
            names.update(dir(cls))
    return frozenset(names)


def resolve_dotted(path: str) -> bool:
    parts = path.split("(")[0].split(".")
    for cut in range(len(parts), 0, -1):
        mod = modules().get(".".join(parts[:cut]))
        if mod is None:
            continue
        obj = mod
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def has_member(cls_name: str, member: str) -> bool | None:
    group = classes().get(cls_name)
    if not group:
        return None  # not a vdm class (a Python one, a placeholder): not ours to check
    return any(
        hasattr(cls, member)
        or member in getattr(cls, "__dataclass_fields__", {})
        or member in instance_attrs(cls)
        for cls in group
    )


@cache
def instance_attrs(cls: type) -> frozenset[str]:
    """Attributes the class's own methods assign on ``self`` (``self.ops = ...``)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=", source))


def span_problem(span: str) -> str | None:
    """Why the inline code ``span`` names something that does not exist, or None."""
    span = span.strip()
    if span in NOT_CODE:
        return None
    if DOTTED.fullmatch(span):
        return None if resolve_dotted(span) else "no such module or attribute"
    m = MEMBER.fullmatch(span)
    if m:
        found = has_member(*m.groups())
        return "no such member" if found is False else None
    m = CALL.fullmatch(span)
    if m:
        return None if m.group(1) in callables() else "no vdm function or method of that name"
    return None


def fence_problems(code: str) -> list[str]:
    """``def`` lines under ``class X:`` in a python block, checked against the vdm class X."""
    problems = []
    current: str | None = None
    for line in code.splitlines():
        m = re.match(r"class (\w+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s+def ([\w/]+)", line)
        if m and current is not None:
            first, *more = m.group(1).split("/")  # "read_u16/u32/u64" lists three methods
            prefix = first[: first.rfind("_") + 1]
            for name in [first, *(prefix + rest for rest in more)]:
                if has_member(current, name) is False:
                    problems.append(f"{current}.{name}")
    return problems


def page_problems(page: Path) -> list[str]:
    text = page.read_text()
    problems = []
    for lang, code in FENCE.findall(text):
        if lang in ("python", "py"):
            problems += [f"```python: {p} does not exist" for p in fence_problems(code)]
    prose = FENCE.sub("", text)
    for span in SPAN.findall(prose):
        why = span_problem(span)
        if why:
            problems.append(f"`{span}`: {why}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_what_exists(page):
    assert page_problems(page) == []


ROLE = re.compile(r":(?:mod|class|meth|func|attr|data|exc):`~?\.?([\w.]+)`")


def reference_resolves(module: str, target: str) -> bool:
    """Whether a Sphinx cross-reference ``target`` written in ``module`` names something: as an
    absolute path, relative to the module or its package, or as a member of a vdm class (a method
    named bare, ``Class.member``); a standard-library name (``string.Template``) counts too."""
    parts = target.split(".")
    package = module.rsplit(".", 1)[0]
    if any(resolve_dotted(p + target) for p in ("", module + ".", package + ".", "vdm.")):
        return True
    if len(parts) >= 2 and has_member(parts[-2], parts[-1]):
        return True
    if len(parts) == 1 and (
        target in classes()
        or target in callables()
        or any(target in instance_attrs(c) for group in classes().values() for c in group)
    ):
        return True
    try:
        obj = importlib.import_module(parts[0])
        for attr in parts[1:]:
            obj = getattr(obj, attr)
        return True
    except (ImportError, AttributeError, ValueError):
        return False


def test_core_docstrings_refer_to_what_exists():
    """``:meth:`...``` and the other roles in vdm-core's docstrings and comments name real things."""
    dangling = []
    for name, mod in sorted(modules().items()):
        if name != "vdm" and not name.startswith("vdm."):
            continue
        path = Path(inspect.getfile(mod))
        if path.suffix != ".py":
            continue  # a compiled module (vdm.fastpath._ring): its source is ring.c
        source = path.read_text()
        dangling += [f"{name}: {t}" for t in ROLE.findall(source) if not reference_resolves(name, t)]
    assert dangling == []


def test_the_check_catches_names_that_do_not_exist():
    assert span_problem("vdm.transport.common.CommonConfig") is None
    assert span_problem("vdm.device.VirtioDevice.on_reset()") is None
    assert span_problem("vdm.transport.nonesuch") == "no such module or attribute"
    assert span_problem("vdm.device.VirtioDevice.activate_queues") == "no such module or attribute"
    assert span_problem("VirtioDevice.config_space") is None
    assert span_problem("Virtqueue.set_nonsense") == "no such member"
    assert span_problem("config_space()") is None
    assert span_problem("read_config_space()") == "no vdm function or method of that name"
    assert fence_problems("class Virtqueue:\n    def pop(self): ...\n    def popall(self): ...\n") == [
        "Virtqueue.popall"
    ]
    assert fence_problems("class GuestMemory:\n    def read_u16/u32/u64(addr)\n") == []
    assert reference_resolves("vdm.device", "Virtqueue.set_size")
    assert reference_resolves("vdm.transport.mmio", "common")
    assert not reference_resolves("vdm.device", "VirtioDevice.read_config_space")
    assert not reference_resolves("vdm.device", "vdm.nonesuch")


def test_not_code_lists_only_names_that_really_are_not_code():
    for name in NOT_CODE:
        assert not resolve_dotted(name), f"{name} exists now: drop it from NOT_CODE"
        if "." in name:
            assert has_member(*name.split(".", 1)) is not True, f"{name} exists now: drop it from NOT_CODE"
