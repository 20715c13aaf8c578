"""What lets torch and transformers meet serq's tensors, ops and folders, registered when needed.

``import serq_ao`` must make ``AutoModelForCausalLM.from_pretrained(serq_folder)``,
``torch.load(weights_only=True)`` of packed tensors and ``torch.export.load`` of a serq program
work (:mod:`serq_ao.integrations.checkpoint_config` says what transformers needs: torchao's
allowlist, the "torchao" quantizer, the legacy "serq" method; the tensor subclasses and ops
register themselves with torch when imported). Doing that at import costs torch, transformers
and torchao, seconds that every ``serq --help`` would pay, since the console script imports
this package first. So :func:`install` (run by ``import serq_ao``) registers

- at once, where torch is imported already (its cost is paid);
- else when the user's own code imports torch (an import hook on ``torch``), unless another
  module is half-imported at that moment (registering could then read its names before they
  exist): serq's own modules import torch so, and then the next point covers loading;
- in any case before transformers reads its quantization registries: it does so through three
  class methods of ``transformers.quantizers.auto`` (``AutoQuantizationConfig.from_dict``,
  ``AutoHfQuantizer.from_config`` and ``AutoHfQuantizer.supports_quant_method``;
  ``get_hf_quantizer``, which ``from_pretrained`` calls, goes through them), which are wrapped
  so that their first call runs :func:`register` before it answers.

``serq_ao.register()`` does it at once, for code that wants no doubt. This module imports
nothing heavy itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
import threading

logger = logging.getLogger(__name__)

TRIGGER = "transformers.quantizers.auto"
TORCH = "torch"
# (class, method) of TRIGGER that read the registries; each becomes register() + the original
ENTRY_POINTS = (("AutoQuantizationConfig", "from_dict"), ("AutoHfQuantizer", "from_config"),
                ("AutoHfQuantizer", "supports_quant_method"))

_lock = threading.RLock()
_registered = False


def register() -> None:
    """Register serq's configs and quantizers with torchao and transformers (once; imports
    both). Runs by itself before transformers reads its registries; call it to register
    earlier."""
    global _registered
    with _lock:
        if _registered:
            return
        from serq_ao.integrations import checkpoint_config, hf_quantizer, torchao_route

        checkpoint_config.allow_in_torchao()
        hf_quantizer.register_legacy()
        torchao_route.install()
        _registered = True


def is_registered() -> bool:
    return _registered


def _registering_first(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        register()
        return function(*args, **kwargs)

    wrapper.__serq_registers__ = True
    return wrapper


def _wrap_entry_points(module) -> None:
    for class_name, method in ENTRY_POINTS:
        cls = getattr(module, class_name, object)
        descriptor = cls.__dict__.get(method)
        if not isinstance(descriptor, (classmethod, staticmethod)):
            # a transformers release that reads its registries elsewhere: never break its import
            logger.warning("transformers has no %s.%s to register serq through; call "
                           "serq_ao.registration.register() before loading serq folders", class_name, method)
            continue
        if getattr(descriptor.__func__, "__serq_registers__", False):
            continue  # wrapped already
        setattr(cls, method, type(descriptor)(_registering_first(descriptor.__func__)))


class _RunAfterExec(importlib.abc.Loader):
    """The real loader of a watched module, calling ``then(module)`` once the module has run."""

    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # tracebacks and reloads see the real one
        self.then(module)

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Watches for the first import of one module, once."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterExec(spec.loader, self.then)
        return spec


def _watch(name: str, then) -> None:
    if not any(isinstance(f, _Finder) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, then))


def _importing_other_than(name: str) -> bool:
    """Is a module other than ``name`` half-imported (its import statement still running)?
    Registering then could import that module's names before they exist."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for key, module in list(sys.modules.items()) if key != name)


def _after_torch(module) -> None:
    # torch was imported by the user's own statement (nothing else half-imported): register
    # now, as importing serq_ao used to, so torch.load(weights_only=True) and torch.export.load
    # of serq's tensors and ops work. Imported from inside another module's import (serq_ao's
    # own modules do that), registration waits for transformers or for serq_ao's API.
    if not _importing_other_than(TORCH):
        register()


def install() -> None:
    """Arrange :func:`register` to run before serq's tensors, ops or folders can be met
    (idempotent; imports nothing heavy): at once where torch is imported already (its cost is
    paid), else when the user imports torch, and in any case before transformers first reads
    its quantization registries."""
    with _lock:
        if TORCH in sys.modules:
            register()
            return
        _watch(TORCH, _after_torch)
        module = sys.modules.get(TRIGGER)
        if module is not None:
            _wrap_entry_points(module)
        else:
            _watch(TRIGGER, _wrap_entry_points)
