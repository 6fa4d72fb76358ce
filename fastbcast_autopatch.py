"""fastbcast's startup hook: ``FASTBCAST_PATCH=sglang,verl`` patches any Python process.

Installed with fastbcast next to ``fastbcast-autopatch.pth``, whose one line
runs at every interpreter start-up and calls :func:`install` only when
``FASTBCAST_PATCH`` is set. Without the variable nothing else happens: this
module is not even imported. With it, this module (which imports nothing of
fastbcast, torch, sglang or verl) waits for the integration's defining module
to be imported and patches right after that module's code has run, so every
module that imports the function afterwards copies the replacement.

It is a top-level module, not part of the fastbcast package, because importing
anything under ``fastbcast`` runs its ``__init__``, which loads torch.

Values (comma-separated, case-insensitive): ``sglang``, ``verl``. ``1``,
``all`` or ``true`` mean both. ``0``, ``false``, ``no`` or empty mean none.
Unknown names are reported on stderr once and ignored. A failure to patch is
reported on stderr and never breaks the import that triggered it.
"""
import os
import sys

VARIABLE = "FASTBCAST_PATCH"

#: integration -> (the module whose import triggers it, the integration module).
#: The first is the integration's DEFINING_MODULE (a test keeps them equal).
TRIGGERS = {
    "sglang": ("sglang.srt.utils.common", "fastbcast.integrations.sglang"),
    "verl": ("verl.workers.rollout.sglang_rollout.utils", "fastbcast.integrations.verl"),
}

_finder = None
_installed = None   # the value install() last acted on


def requested(value=None, report=True):
    """The integrations the variable asks for, in TRIGGERS order; unknown names
    are written to stderr (with report)."""
    value = os.environ.get(VARIABLE, "") if value is None else value
    names = {v.strip().lower() for v in value.split(",") if v.strip()}
    if names & {"1", "all", "true", "yes"}:
        return list(TRIGGERS)
    names -= {"0", "false", "no", "none"}
    unknown = sorted(names - set(TRIGGERS))
    if unknown and report:
        sys.stderr.write(f"fastbcast: {VARIABLE}={value!r}: unknown integration(s) {', '.join(unknown)} "
                         f"ignored (known: {', '.join(TRIGGERS)})\n")
    return [n for n in TRIGGERS if n in names]


def _apply(name):
    try:
        import importlib

        importlib.import_module(TRIGGERS[name][1]).patch()
    except Exception as e:  # never break the user's import because of us
        sys.stderr.write(f"fastbcast: {VARIABLE}: could not patch {name}: {type(e).__name__}: {e}\n")


class _Loader:
    """Stands in for the trigger module's real loader until its code has run;
    the module sees only its own loader."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

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
        _apply(self._name)

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


class _Finder:
    """A ``sys.meta_path`` entry that only ever answers for the pending trigger
    modules, by asking the finders after it and wrapping the loader. It stays
    in place once nothing is pending (one dict lookup per import): removing
    it from inside an import would make the import system skip a finder."""

    def __init__(self, pending):
        self.pending = dict(pending)   # trigger module -> integration name

    def find_spec(self, fullname, path=None, target=None):
        name = self.pending.get(fullname)
        if name is None:
            return None
        del self.pending[fullname]
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, name)
        return spec

    def invalidate_caches(self):
        pass


def install(value=None):
    """Arrange the patches that ``FASTBCAST_PATCH`` (or ``value``) asks for.

    An integration whose trigger module is already imported is patched now;
    the others when their module is first imported. Returns the names asked for.
    """
    global _finder, _installed
    value = os.environ.get(VARIABLE, "") if value is None else value
    if value == _installed:
        # The .pth can be read twice in one start-up (a venv's lib64 -> lib link
        # makes the same site-packages appear under two names).
        return requested(value, report=False)
    _installed = value
    names = requested(value)
    pending = {}
    for name in names:
        module = TRIGGERS[name][0]
        if module in sys.modules:
            _apply(name)
        else:
            pending[module] = name
    if pending:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = _Finder(pending)
        sys.meta_path.insert(0, _finder)
    return names
