"""Rebinding a function everywhere a package bound it by name.

SGLang and verl do not call ``broadcast_pyobj`` through one attribute: dozens
of modules run ``from ... import broadcast_pyobj`` and hold their own binding
of the function object. Replacing the attribute in the defining module alone
changes nothing for them. A :class:`Patcher` therefore

1. imports the defining module and remembers the original function object;
2. rebinds every module attribute whose value *is* that object (found by
   identity, so a same-named but different function is left alone, and an
   alias such as ``from x import f as g`` is found too) in the defining module
   and in every loaded module under the given name prefixes;
3. installs an import hook, so modules under those prefixes that are imported
   later are rebound as soon as their code has run;
4. undoes exactly that on :meth:`Patcher.unpatch`: each binding it changed goes
   back to the original, but only where the value is still the replacement (a
   binding someone else changed since is left as they set it).

A module imported while patched that copies the name from an already rebound
module holds the replacement without ever having seen the original; the hook
records such bindings too, so unpatching restores them to the original as
well. Modules outside the prefixes are not scanned (that keeps patching cheap
with thousands of modules loaded); pass a wider prefix to cover them.

Module namespaces are read through ``module.__dict__`` and never through
``getattr``: lazily-importing modules (a module-level ``__getattr__``, as in
transformers) are never triggered by a scan.

Nothing here imports the target package until :meth:`Patcher.patch` runs.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Iterable

__all__ = ["Patcher", "check_pickle_policy"]


def check_pickle_policy(allow_pickle: Any) -> None:
    """TypeError unless allow_pickle is None (the drop-in's default), True or False."""
    if allow_pickle is not None and not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be None, True or False, got {allow_pickle!r}")

logger = logging.getLogger("fastbcast")

# One lock for the state of all patchers. It is never held while importing,
# and the import hook reads `_active` without it.
_lock = threading.RLock()
# (defining module, attribute name) -> the Patcher currently applied there.
_active: dict[tuple[str, str], "Patcher"] = {}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _namespace(module: Any) -> dict | None:
    """A module's namespace dict, or None for placeholders in sys.modules."""
    try:
        ns = object.__getattribute__(module, "__dict__")
    except AttributeError:
        return None
    return ns if isinstance(ns, dict) else None


def _distribution_version(pip_name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(pip_name)
    except PackageNotFoundError:
        return None


class _HookLoader:
    """Runs the real loader, then lets the active patchers see the module.

    It stands in for the real loader only until the module's code starts: the
    module's ``__loader__`` and ``__spec__.loader`` are set back to the real one
    before it runs, so the module, and everything that inspects it later
    (inspect, importlib.resources, pytest), sees its own loader. Any other
    attribute is read from the real loader.
    """

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        _after_import(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """The one ``sys.meta_path`` entry shared by all active patchers.

    For a module under some active patcher's prefixes it asks the finders that
    follow it for the spec and wraps that spec's loader; it never finds a
    module on its own, and it returns None for every other name, so the import
    system carries on as if it were not there.
    """

    def find_spec(self, fullname, path=None, target=None):
        # No lock here: this runs inside other threads' imports (see patch()).
        if not any(p._covers(fullname) for p in tuple(_active.values())):
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _ImportHook):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module") or isinstance(loader, _HookLoader):
            return spec  # namespace package (no code to run) or already wrapped
        spec.loader = _HookLoader(loader)
        return spec

    def invalidate_caches(self):
        pass


_hook: _ImportHook | None = None


def _install_hook() -> None:
    global _hook
    if _hook is None:
        _hook = _ImportHook()
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def _remove_hook() -> None:
    if _hook is not None:
        while _hook in sys.meta_path:
            sys.meta_path.remove(_hook)


def _after_import(module: ModuleType) -> None:
    name = getattr(module, "__name__", None)
    if not isinstance(name, str):
        return
    for p in [p for p in tuple(_active.values()) if p._covers(name)]:
        try:
            p._adopt_later(module)
        except Exception:  # never break the user's import because of us
            logger.warning("could not patch %s.%s into %s", p.defining_module, p.name,
                           name, exc_info=True)


class Patcher:
    """Replaces one function in a package, in every module that bound it.

    Arguments:
        defining_module: the module that defines the function, e.g.
            ``"sglang.srt.utils.common"``.
        name: the function's attribute name there, e.g. ``"broadcast_pyobj"``.
        replacement: what every binding of the original becomes.
        module_prefixes: modules whose bindings are rebound: each module named
            a prefix, or inside it (``"sglang"`` covers ``sglang.srt.utils``).
            The defining module is always covered. Default: the defining
            module's top-level package. An empty tuple covers every module.
        pip_name: the distribution to name in the ImportError raised when the
            package is missing. Default: the top-level package name.

    ``patch()`` and ``unpatch()`` may each be called any number of times; only
    the first call of each in a row does anything. A Patcher is also a context
    manager: ``with Patcher(...):`` patches on entry and unpatches on exit.
    Only one Patcher may be applied to a given (module, name) at a time.
    """

    def __init__(self, defining_module: str, name: str, replacement: Callable,
                 module_prefixes: Iterable[str] | None = None, *, pip_name: str | None = None):
        if not isinstance(defining_module, str) or not defining_module:
            raise TypeError("defining_module must be a non-empty module name")
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"name must be an attribute name, got {name!r}")
        if replacement is None:
            raise TypeError("replacement must not be None")
        top = defining_module.split(".")[0]
        prefixes = (top,) if module_prefixes is None else module_prefixes
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        self.defining_module = defining_module
        self.name = name
        self.replacement = replacement
        self.module_prefixes: tuple[str, ...] = tuple(prefixes)
        self.pip_name = pip_name or top
        self._original: Any = None
        # (module name, attribute) -> module object, for every binding this
        # patcher made hold the replacement (and will restore on unpatch).
        self._bindings: dict[tuple[str, str], ModuleType] = {}
        self._applied = False

    # -- public API ---------------------------------------------------------

    @property
    def original(self) -> Any:
        """The function that was replaced (None before the first patch())."""
        return self._original

    @property
    def is_patched(self) -> bool:
        return self._applied

    def patch(self) -> tuple[str, ...]:
        """Apply the replacement; returns the names of the modules rebound.

        Raises ImportError, naming the pip package, when the defining module
        cannot be imported; nothing is changed then. A second call while
        applied does nothing and returns the same names.
        """
        key = (self.defining_module, self.name)
        with _lock:
            if self._applied:
                return self.patched_modules()
            self._check_free(key)
        # Imported without holding the lock: another thread importing a module
        # (which runs the hook, which takes the lock) must never wait on us
        # while we wait on its module's import lock.
        module = self._import_defining_module()
        with _lock:
            if self._applied:  # another thread patched meanwhile
                return self.patched_modules()
            self._check_free(key)
            ns = _namespace(module)
            if ns is None or self.name not in ns:
                version = _distribution_version(self.pip_name)
                raise ImportError(
                    f"{self.defining_module} has no attribute {self.name!r}"
                    + (f" (installed {self.pip_name} {version})" if version else "")
                    + "; this version is not supported")
            original = ns[self.name]
            if original is self.replacement:
                raise RuntimeError(
                    f"{self.defining_module}.{self.name} already holds the replacement, so the "
                    "original cannot be recovered (was an earlier patch never undone?)")
            self._original = original
            self._bindings = {}
            _active[key] = self
            self._applied = True
            # Hook first, then the scan: a module imported by another thread
            # in between is seen by one or the other (rebinding twice is a
            # no-op).
            _install_hook()
            for mod_name, mod in list(sys.modules.items()):
                if isinstance(mod_name, str) and self._covers(mod_name):
                    self._rebind(mod_name, mod, adopt_copies=False)
            names = self.patched_modules()
        logger.info("patched %s.%s in %d module(s): %s", self.defining_module,
                    self.name, len(names), ", ".join(names))
        return names

    def unpatch(self) -> tuple[str, ...]:
        """Restore every binding this patcher changed; returns their modules.

        A binding whose value is no longer the replacement (someone rebound it
        since) is left alone. The import hook goes away with the last active
        patcher. Calling it while not applied does nothing.
        """
        with _lock:
            if not self._applied:
                return ()
            restored, skipped = [], []
            for (mod_name, attr), mod in self._bindings.items():
                ns = _namespace(mod)
                if ns is not None and ns.get(attr) is self.replacement:
                    setattr(mod, attr, self._original)
                    restored.append(mod_name)
                else:
                    skipped.append(f"{mod_name}.{attr}")
            self._bindings = {}
            self._applied = False
            _active.pop((self.defining_module, self.name), None)
            if not _active:
                _remove_hook()
            names = tuple(sorted(set(restored)))
        logger.info("restored %s.%s in %d module(s)", self.defining_module, self.name,
                    len(names))
        if skipped:
            logger.debug("left alone (rebound by someone else since): %s",
                         ", ".join(sorted(skipped)))
        return names

    def patched_modules(self) -> tuple[str, ...]:
        """Names of the modules that now hold the replacement through this patcher."""
        with _lock:
            return tuple(sorted({mod_name for mod_name, _ in self._bindings}))

    def bindings(self) -> tuple[tuple[str, str], ...]:
        """(module name, attribute name) of every binding this patcher changed."""
        with _lock:
            return tuple(sorted(self._bindings))

    def __enter__(self) -> "Patcher":
        self.patch()
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = f"patched in {len(self.patched_modules())} module(s)" if self._applied else "not patched"
        return f"<Patcher {self.defining_module}.{self.name}: {state}>"

    # -- internals ----------------------------------------------------------

    def _check_free(self, key: tuple[str, str]) -> None:
        if _active.get(key) is not None:
            raise RuntimeError(
                f"{self.defining_module}.{self.name} is already patched by another Patcher; "
                "unpatch that one first")

    def _covers(self, module_name: str) -> bool:
        if module_name == self.defining_module:
            return True
        if not self.module_prefixes:
            return True
        return any(_under(module_name, p) for p in self.module_prefixes)

    def _import_defining_module(self) -> ModuleType:
        try:
            return importlib.import_module(self.defining_module)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing and _under(self.defining_module, missing):
                top = self.defining_module.split(".")[0]
                if missing == top or _distribution_version(self.pip_name) is None:
                    raise ImportError(
                        f"fastbcast's {top} integration needs the {self.pip_name!r} package, which is "
                        f"not installed (pip install {self.pip_name})", name=missing) from e
                raise ImportError(
                    f"{self.pip_name} {_distribution_version(self.pip_name)} has no module "
                    f"{missing!r}; this version is not supported", name=missing) from e
            raise ImportError(
                f"importing {self.defining_module} (from {self.pip_name!r}) failed because the module "
                f"{missing!r} it needs is not installed: {e}", name=missing) from e
        except ImportError as e:
            version = _distribution_version(self.pip_name)
            raise ImportError(
                f"importing {self.defining_module} from {self.pip_name}"
                + (f" {version}" if version else "") + f" failed: {e}", name=e.name) from e

    def _rebind(self, mod_name: str, module: Any, adopt_copies: bool) -> list[str]:
        """Rebind the original in one module; returns the attribute names changed.

        With adopt_copies, attributes that already hold the replacement are
        recorded too (a module imported while patched copied it from a
        rebound module; unpatching must give it the original).
        """
        ns = _namespace(module)
        if ns is None:
            return []
        original, replacement = self._original, self.replacement
        changed = []
        for attr, value in list(ns.items()):
            if value is original:
                setattr(module, attr, replacement)
            elif not (adopt_copies and value is replacement):
                continue
            self._bindings[(mod_name, attr)] = module
            changed.append(attr)
        return changed

    def _adopt_later(self, module: ModuleType) -> None:
        with _lock:
            if not self._applied:
                return
            changed = self._rebind(module.__name__, module, adopt_copies=True)
        if changed:
            logger.debug("patched %s.%s into later-imported module %s (%s)",
                         self.defining_module, self.name, module.__name__, ", ".join(changed))
