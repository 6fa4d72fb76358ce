"""Tests of the patch engine (Patcher, Integration) on fake packages (no sglang/verl needed).

Every test writes a fresh package with a unique name into a temporary
directory on sys.path, so tests never share modules:

    <pkg>/__init__.py        re-exports f from .utils (like sglang.srt.utils)
    <pkg>/utils.py           defines f (the function to replace)
    <pkg>/a.py               from <pkg>.utils import f
    <pkg>/b.py               from <pkg>.utils import f as g; keeps `utils` too
    <pkg>/sub/c.py           from <pkg> import f          (through the re-export)
    <pkg>/unrelated.py       its own, different function named f
    <pkg>/lazy.py            a module-level __getattr__ that must never run
    <pkg>/later*.py          imported only after patch()
    <pkg>/utils2.py          defines h (a second function, for Integration)
    <pkg>/broken_later.py    raises while being imported
    <pkg>_other/holder.py    from <pkg>.utils import f    (outside the prefixes)
"""
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from fastbcast.integrations import Integration, Patcher


def _write(root, pkg, rel, text):
    """Write root/rel with `{pkg}` in text replaced by the package name."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).format(pkg=pkg))


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """Name of a freshly written fake package (its modules are not imported yet)."""
    name = "fakepkg_" + uuid.uuid4().hex[:12]
    _write(tmp_path, name, f"{name}/__init__.py", "from .utils import f\n")
    _write(tmp_path, name, f"{name}/utils.py", """
        def f(data, rank, dist_group=None, src=0):
            return ("original", data)
        """)
    _write(tmp_path, name, f"{name}/a.py", "from {pkg}.utils import f\n")
    _write(tmp_path, name, f"{name}/b.py", "from {pkg} import utils\nfrom {pkg}.utils import f as g\n")
    _write(tmp_path, name, f"{name}/sub/__init__.py", "")
    _write(tmp_path, name, f"{name}/sub/c.py", "from {pkg} import f\n\ndef call(x):\n    return f(x, 0)\n")
    _write(tmp_path, name, f"{name}/unrelated.py", "def f(*args):\n    return 'unrelated'\n")
    _write(tmp_path, name, f"{name}/lazy.py", """
        def __getattr__(name):
            raise RuntimeError("a scan must not trigger module __getattr__ (asked for %s)" % name)
        """)
    # Gets the original from a module the patcher does not cover (the one
    # case a scan cannot see; see _patch's docstring).
    _write(tmp_path, name, f"{name}/later.py", "from {pkg}_other.holder import f\n")
    # Copies the (already rebound) name from the patched defining module.
    _write(tmp_path, name, f"{name}/later2.py", "from {pkg}.utils import f\n")
    _write(tmp_path, name, f"{name}/later3.py", "from {pkg}_other.holder import f\n")
    _write(tmp_path, name, f"{name}/broken_later.py",
           "from {pkg}_other.holder import f\nraise RuntimeError('broken on purpose')\n")
    _write(tmp_path, name, f"{name}/utils2.py", "def h():\n    return 'h'\n")
    _write(tmp_path, name, f"{name}/uses_h.py", "from {pkg}.utils2 import h\n")
    _write(tmp_path, name, f"{name}_other/__init__.py", "")
    _write(tmp_path, name, f"{name}_other/holder.py", "from {pkg}.utils import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")
                or m == name + "_other" or m.startswith(name + "_other.")]:
        del sys.modules[mod]


@pytest.fixture
def loaded(pkg):
    """The fake package with its early modules imported, before any patch."""
    mods = {}
    for short in ("utils", "a", "b", "sub.c", "unrelated", "lazy"):
        mods[short] = importlib.import_module(f"{pkg}.{short}")
    mods["pkg"] = sys.modules[pkg]
    mods["holder"] = importlib.import_module(f"{pkg}_other.holder")
    return mods


def replacement(data, rank, dist_group=None, src=0):
    return ("replacement", data)


def _make(pkg, **kw):
    return Patcher(f"{pkg}.utils", "f", replacement, (pkg,), **kw)


@pytest.fixture
def patcher(pkg):
    p = _make(pkg)
    yield p
    p.unpatch()


def _snapshot(pkg):
    """Every (module, attribute) -> value under the package, for exactness checks."""
    snap = {}
    for name, mod in list(sys.modules.items()):
        if name == pkg or name.startswith(pkg + "."):
            for attr, value in vars(mod).items():
                snap[(name, attr)] = value
    return snap


def test_patch_rebinds_every_binding_of_the_original(loaded, patcher, pkg):
    original = loaded["utils"].f
    names = patcher.patch()
    assert patcher.original is original
    assert loaded["utils"].f is replacement          # the defining module
    assert loaded["pkg"].f is replacement            # the package re-export
    assert loaded["a"].f is replacement              # from ... import f
    assert loaded["b"].g is replacement              # an alias, found by identity
    assert loaded["sub.c"].f is replacement          # via the re-export
    assert loaded["sub.c"].call("x") == ("replacement", "x")
    assert loaded["unrelated"].f() == "unrelated"    # same name, other function: untouched
    assert loaded["holder"].f is original            # outside the prefixes: untouched
    expected = tuple(sorted([pkg, f"{pkg}.utils", f"{pkg}.a", f"{pkg}.b", f"{pkg}.sub.c"]))
    assert names == expected
    assert patcher.patched_modules() == expected
    assert (f"{pkg}.b", "g") in patcher.bindings()
    assert patcher.is_patched


def test_unpatch_restores_exactly(loaded, patcher, pkg):
    before = _snapshot(pkg)
    meta_path_before = list(sys.meta_path)
    patcher.patch()
    assert _snapshot(pkg) != before
    restored = patcher.unpatch()
    after = _snapshot(pkg)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] is value, key
    assert restored == tuple(sorted([pkg, f"{pkg}.utils", f"{pkg}.a", f"{pkg}.b", f"{pkg}.sub.c"]))
    assert sys.meta_path == meta_path_before
    assert patcher.patched_modules() == ()
    assert not patcher.is_patched


def test_unpatch_leaves_bindings_changed_by_someone_else(loaded, patcher):
    original = loaded["utils"].f

    def someone_elses(*a, **k):
        return "theirs"

    patcher.patch()
    loaded["a"].f = someone_elses
    patcher.unpatch()
    assert loaded["a"].f is someone_elses
    assert loaded["utils"].f is original
    assert loaded["b"].g is original


def test_patch_twice_and_unpatch_twice_are_harmless(loaded, patcher, pkg, caplog):
    original = loaded["utils"].f
    with caplog.at_level(logging.INFO, logger="fastbcast"):
        first = patcher.patch()
        second = patcher.patch()
    assert first == second
    assert loaded["a"].f is replacement
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "patched" in r.getMessage()]
    assert len(infos) == 1
    patcher.unpatch()
    patcher.unpatch()
    assert loaded["a"].f is original and loaded["utils"].f is original
    # and it can be applied again afterwards
    patcher.patch()
    assert loaded["a"].f is replacement


def test_patch_logs_module_names_once_at_info(loaded, patcher, pkg, caplog):
    with caplog.at_level(logging.INFO, logger="fastbcast"):
        patcher.patch()
    records = [r for r in caplog.records if r.name == "fastbcast" and r.levelno == logging.INFO]
    assert len(records) == 1
    message = records[0].getMessage()
    for mod in (f"{pkg}.utils", f"{pkg}.a", f"{pkg}.b", f"{pkg}.sub.c"):
        assert mod in message
    assert f"{pkg}.utils.f" in message


def test_modules_imported_later_hold_the_replacement_and_are_restored(loaded, patcher, pkg):
    original = loaded["utils"].f
    meta_path = list(sys.meta_path)
    patcher.patch()
    assert sys.meta_path == meta_path                          # no import hook
    later2 = importlib.import_module(f"{pkg}.later2")          # copied the rebound name
    later = importlib.import_module(f"{pkg}.later")            # copied it from an uncovered module
    assert later2.f is replacement
    assert later.f is original                                 # the documented limit of a scan
    assert f"{pkg}.later2" in patcher.patched_modules()
    patcher.unpatch()
    assert later2.f is original  # it would have copied the original had we not patched
    later3 = importlib.import_module(f"{pkg}.later3")
    assert later3.f is original


def test_hook_ignores_modules_outside_the_prefixes(pkg, tmp_path):
    importlib.import_module(f"{pkg}.utils")
    p = _make(pkg)
    p.patch()
    try:
        holder = importlib.import_module(f"{pkg}_other.holder")  # imported while patched
        assert holder.f is replacement   # it copied the rebound name...
        assert f"{pkg}_other.holder" not in p.patched_modules()  # ...but is not ours to manage
    finally:
        p.unpatch()


def test_failing_later_import_propagates_unchanged(loaded, patcher, pkg):
    patcher.patch()
    with pytest.raises(RuntimeError, match="broken on purpose"):
        importlib.import_module(f"{pkg}.broken_later")
    assert f"{pkg}.broken_later" not in sys.modules
    assert loaded["a"].f is replacement
    patcher.unpatch()
    assert loaded["a"].f is loaded["holder"].f


def test_patch_imports_the_defining_module_itself(pkg):
    assert f"{pkg}.utils" not in sys.modules
    p = _make(pkg)
    try:
        p.patch()
        assert sys.modules[f"{pkg}.utils"].f is replacement
        assert sys.modules[pkg].f is replacement   # the parent package imported along
        a = importlib.import_module(f"{pkg}.a")    # imported later: copies the rebound name
        assert a.f is replacement
    finally:
        p.unpatch()
    assert sys.modules[f"{pkg}.utils"].f is a.f
    assert a.f(1, 0) == ("original", 1)


def test_context_manager(loaded, pkg):
    original = loaded["utils"].f
    with _make(pkg) as p:
        assert loaded["a"].f is replacement
        assert p.is_patched
    assert loaded["a"].f is original


def test_missing_package_raises_clear_importerror():
    name = "no_such_pkg_" + uuid.uuid4().hex[:8]
    p = Patcher(f"{name}.srt.utils", "broadcast_pyobj", replacement, (name,), pip_name="no-such-dist")
    with pytest.raises(ImportError) as info:
        p.patch()
    message = str(info.value)
    assert "no-such-dist" in message and "pip install no-such-dist" in message
    assert not p.is_patched


def test_missing_dependency_of_the_package_is_named(pkg, tmp_path):
    _write(tmp_path, pkg, f"{pkg}/needs_dep.py", "import {pkg}_missing_dependency\ndef f():\n    pass\n")
    p = Patcher(f"{pkg}.needs_dep", "f", replacement, (pkg,))
    with pytest.raises(ImportError) as info:
        p.patch()
    assert f"{pkg}_missing_dependency" in str(info.value)
    assert f"{pkg}.needs_dep" in str(info.value)


def test_missing_attribute_is_an_importerror(pkg):
    p = Patcher(f"{pkg}.utils", "no_such_function", replacement, (pkg,))
    with pytest.raises(ImportError, match="no_such_function"):
        p.patch()
    assert not p.is_patched


def test_importing_fastbcast_integrations_imports_no_target_package():
    code = ("import sys, fastbcast.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'verl')))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_two_patchers_on_one_target_conflict(loaded, patcher, pkg):
    patcher.patch()
    other = Patcher(f"{pkg}.utils", "f", lambda *a, **k: None, (pkg,))
    with pytest.raises(RuntimeError, match="already patched"):
        other.patch()
    assert loaded["a"].f is replacement


def _h_repl():
    return "h-repl"


def _integration(pkg, **kw):
    return Integration("fake-dist", {(f"{pkg}.utils", "f"): replacement, (f"{pkg}.utils2", "h"): _h_repl},
                       (pkg,), trusted=(f"{pkg}.schemas",), **kw)


def test_integration_patches_all_functions_and_withdraws_trust(loaded, pkg):
    integ = _integration(pkg)
    assert integ.options() == {"allow_pickle": None, "trusted": ()}
    uses_h = importlib.import_module(f"{pkg}.uses_h")
    try:
        names = integ.patch(allow_pickle=False)
        assert loaded["a"].f is replacement and uses_h.h is _h_repl
        assert f"{pkg}.uses_h" in names and f"{pkg}.a" in names
        assert integ.options() == {"allow_pickle": False, "trusted": (f"{pkg}.schemas",)}
        integ.patch()                     # again: only the policy changes
        assert integ.options()["allow_pickle"] is None and integ.is_patched()
    finally:
        restored = integ.unpatch()
    assert f"{pkg}.uses_h" in restored and uses_h.h() == "h" and loaded["a"].f(1, 0) == ("original", 1)
    assert integ.options() == {"allow_pickle": None, "trusted": ()}   # trust withdrawn
    assert not integ.is_patched() and integ.original("h") is sys.modules[f"{pkg}.utils2"].h


def test_integration_is_all_or_nothing(loaded, pkg, tmp_path):
    integ = Integration("fake-dist", {(f"{pkg}.utils", "f"): replacement, (f"{pkg}.utils2", "nope"): _h_repl},
                        (pkg,))
    with pytest.raises(ImportError, match="nope"):
        integ.patch()
    assert loaded["a"].f is sys.modules[f"{pkg}.utils"].f is not replacement   # the first was undone
    assert not integ.is_patched()


def test_integration_skips_an_optional_function_an_old_release_lacks(loaded, pkg):
    key = (f"{pkg}.utils2", "nope")
    integ = Integration("fake-dist", {(f"{pkg}.utils", "f"): replacement, key: _h_repl}, (pkg,), optional=[key])
    try:
        integ.patch()
        assert loaded["a"].f is replacement
    finally:
        integ.unpatch()
    # an optional function whose module is missing is still an error
    integ = Integration("fake-dist", {(f"{pkg}.utils", "f"): replacement, (f"{pkg}.gone", "x"): _h_repl},
                        (pkg,), optional=[(f"{pkg}.gone", "x")])
    with pytest.raises(ImportError):
        integ.patch()
    assert loaded["a"].f is not replacement


def test_empty_prefixes_cover_every_module(loaded, pkg):
    p = Patcher(f"{pkg}.utils", "f", replacement, ())
    try:
        p.patch()
        assert loaded["holder"].f is replacement
        assert f"{pkg}_other.holder" in p.patched_modules()
    finally:
        p.unpatch()
    assert loaded["holder"].f is loaded["a"].f


def test_lazy_module_getattr_is_never_triggered(loaded, patcher, pkg):
    patcher.patch()   # the fixture's lazy module raises from __getattr__ if touched
    assert f"{pkg}.lazy" not in patcher.patched_modules()


def test_bad_arguments():
    with pytest.raises(TypeError):
        Patcher("", "f", replacement)
    with pytest.raises(TypeError):
        Patcher("x.y", "not a name", replacement)
    with pytest.raises(TypeError):
        Patcher("x.y", "f", None)
    assert Patcher("x.y", "f", replacement).module_prefixes == ("x",)
    assert Patcher("x.y", "f", replacement, "x.y").module_prefixes == ("x.y",)
