"""The patch engine: rebinding functions everywhere a package bound them by name.

SGLang and verl do not call ``broadcast_pyobj`` through one attribute: dozens
of modules run ``from ... import broadcast_pyobj`` and hold their own binding
of the function object. Replacing the attribute in the defining module alone
changes nothing for them. So:

* A :class:`Patcher` replaces one function. ``patch()`` imports the defining
  module, remembers the original, and rebinds every module attribute whose
  value *is* the original (found by identity, so a same-named but different
  function is left alone and an alias is found too) in the defining module
  and every loaded module under the given prefixes. A module imported later
  copies the name from an already rebound module, so it holds the
  replacement without any import hook. ``unpatch()`` scans again and gives
  every covered binding that holds the replacement the original back
  (including those copied while patched); one that someone else changed
  since is left as they set it.
* An :class:`Integration` is the declaration of one package: the functions to
  replace, the prefixes to scan, the module prefixes whose classes receivers
  may rebuild while patched, and the pickle policy. The ``sglang`` and
  ``verl`` modules only declare one; this module does the work.

Trust is not granted globally: the replacements pass :meth:`Integration.options`
(``allow_pickle``, ``trusted``) on each call, so ``unpatch()`` withdraws it.

The one thing a scan cannot see is a covered module that, while patched,
imports the original from a module *outside* the prefixes; SGLang and verl
bind the function only from their own modules, and a wider prefix covers any
other case.

Module namespaces are read through ``module.__dict__`` and never through
``getattr``: lazily-importing modules (a module-level ``__getattr__``, as in
transformers) are never triggered by a scan. Nothing here imports the target
package until ``patch()`` runs.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Patcher", "Integration", "check_pickle_policy"]

logger = logging.getLogger("fastbcast")

# One lock for the state of all patchers; never held while importing.
_lock = threading.RLock()
# (defining module, attribute name) -> the Patcher currently applied there.
_active: dict[tuple[str, str], "Patcher"] = {}


def check_pickle_policy(allow_pickle: Any) -> None:
    """TypeError unless allow_pickle is None (the drop-in's default), True or False."""
    if allow_pickle is not None and not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be None, True or False, got {allow_pickle!r}")


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
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pip_name)
    except PackageNotFoundError:
        return None


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
    manager. Only one Patcher may be applied to a given (module, name) at a time.
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
        self._applied = False

    @property
    def original(self) -> Any:
        """The function that was replaced (None before the first patch())."""
        return self._original

    @property
    def is_patched(self) -> bool:
        return self._applied

    def patch(self) -> tuple[str, ...]:
        """Apply the replacement; returns the names of the modules that hold it.

        Raises ImportError, naming the pip package, when the defining module
        cannot be imported or lacks the function; nothing is changed then. A
        second call while applied does nothing and returns the same names.
        """
        key = (self.defining_module, self.name)
        with _lock:
            if self._applied:
                return self.patched_modules()
            self._check_free(key)
        # Imported without the lock: another thread's import must never wait
        # on us while we wait on its module's import lock.
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
            self._swap(original, self.replacement)
            _active[key] = self
            self._applied = True
            names = self.patched_modules()
        logger.info("patched %s.%s in %d module(s): %s", self.defining_module,
                    self.name, len(names), ", ".join(names))
        return names

    def unpatch(self) -> tuple[str, ...]:
        """Give every covered binding that holds the replacement the original
        back; returns their modules. A binding someone rebound since is left
        alone. Calling it while not applied does nothing."""
        with _lock:
            if not self._applied:
                return ()
            names = self._swap(self.replacement, self._original)
            self._applied = False
            _active.pop((self.defining_module, self.name), None)
        logger.info("restored %s.%s in %d module(s)", self.defining_module, self.name, len(names))
        return names

    def bindings(self) -> tuple[tuple[str, str], ...]:
        """(module name, attribute name) of every covered binding that holds the
        replacement now (empty while not applied)."""
        with _lock:
            if not self._applied:
                return ()
            return tuple(sorted(self._find(self.replacement)))

    def patched_modules(self) -> tuple[str, ...]:
        """Names of the modules that hold the replacement now (empty while not applied)."""
        return tuple(sorted({mod_name for mod_name, _ in self.bindings()}))

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
        if module_name == self.defining_module or not self.module_prefixes:
            return True
        return any(_under(module_name, p) for p in self.module_prefixes)

    def _find(self, value: Any) -> dict[tuple[str, str], ModuleType]:
        """(module name, attribute) -> module, for covered bindings that are `value`."""
        found = {}
        for mod_name, mod in list(sys.modules.items()):
            if not isinstance(mod_name, str) or not self._covers(mod_name):
                continue
            ns = _namespace(mod)
            if ns is None:
                continue
            for attr, v in list(ns.items()):
                if v is value:
                    found[(mod_name, attr)] = mod
        return found

    def _swap(self, old: Any, new: Any) -> tuple[str, ...]:
        found = self._find(old)
        for (_, attr), mod in found.items():
            setattr(mod, attr, new)
        return tuple(sorted({mod_name for mod_name, _ in found}))

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


class Integration:
    """The declaration of one package's integration, and the work of applying it.

    Arguments:
        pip_name: the distribution, named in errors.
        functions: ``{(defining module, name): replacement}``, replaced
            together (all or none).
        module_prefixes: modules whose bindings are rebound (and their submodules).
        trusted: module prefixes whose classes receivers may rebuild; passed by
            the replacements on each call through :meth:`options`, so only
            while patched.
        optional: ``(module, name)`` keys that older releases lack: skipped
            (logged at DEBUG) when the module has no such function.

    The replacements call :meth:`options` for the keyword arguments of the
    current policy: ``allow_pickle`` and ``trusted``.
    """

    def __init__(self, pip_name: str, functions: Mapping[tuple[str, str], Callable],
                 module_prefixes: Iterable[str], trusted: Iterable[str] = (), optional: Iterable = ()):
        self.pip_name = pip_name
        self.module_prefixes = tuple(module_prefixes)
        self.trusted = tuple(trusted)
        self.optional = frozenset(optional)
        self.patchers = {key: Patcher(key[0], key[1], fn, self.module_prefixes, pip_name=pip_name)
                         for key, fn in functions.items()}
        self._allow_pickle: bool | None = None
        self._options = {"allow_pickle": None, "trusted": ()}

    def options(self) -> dict:
        """The keyword arguments the replacements pass on: ``allow_pickle``
        (None: the drop-in's default) and ``trusted`` (empty when not patched)."""
        return self._options

    def patch(self, allow_pickle: bool | None = None) -> tuple[str, ...]:
        """Apply every replacement; returns the modules that hold one.

        Raises ImportError (naming the pip package) when the package or a
        required function is missing; nothing is changed then. Calling it
        again while patched changes nothing but the pickle policy.
        """
        check_pickle_policy(allow_pickle)
        done = []
        try:
            for key, p in self.patchers.items():
                try:
                    p.patch()
                except ImportError as e:
                    if key not in self.optional or e.name is not None:
                        raise
                    logger.debug("%s: %s; not replaced", self.pip_name, e)
                    continue
                done.append(p)
        except BaseException:
            for p in done:
                p.unpatch()
            raise
        self._options = {"allow_pickle": allow_pickle, "trusted": self.trusted}
        return self.patched_modules()

    def unpatch(self) -> tuple[str, ...]:
        """Give every binding the original back and withdraw the trust; returns
        the modules restored."""
        self._options = {"allow_pickle": None, "trusted": ()}
        names = set()
        for p in self.patchers.values():
            names.update(p.unpatch())
        return tuple(sorted(names))

    def is_patched(self) -> bool:
        return any(p.is_patched for p in self.patchers.values())

    def patched_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for p in self.patchers.values() for m in p.patched_modules()}))

    def original(self, name: str) -> Callable | None:
        """The replaced function called `name` (None before the first patch())."""
        for (_, n), p in self.patchers.items():
            if n == name:
                return p.original
        raise KeyError(name)
