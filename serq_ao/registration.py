"""What lets transformers load serq folders, registered when transformers first needs it.

``import serq_ao`` must make ``AutoModelForCausalLM.from_pretrained(serq_folder)`` work
(:mod:`serq_ao.integrations.checkpoint_config` says what that takes: torchao's allowlist, the
"torchao" quantizer, the legacy "serq" method). Doing that at import costs torch, transformers
and torchao, seconds that every ``serq --help`` would pay, since the console script imports
this package first. So ``import serq_ao`` only arranges it: transformers reads its
quantization registries through three class methods of ``transformers.quantizers.auto``
(``AutoQuantizationConfig.from_dict``, ``AutoHfQuantizer.from_config`` and
``AutoHfQuantizer.supports_quant_method``; ``get_hf_quantizer``, which ``from_pretrained`` calls,
goes through them); :func:`install` wraps those so that their first call runs :func:`register`,
the full registration, before it answers. If transformers' module is not imported yet, an
import hook wraps them the moment it is (no transformers import of ours).

This module imports nothing heavy itself.
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


class _WrapAfterExec(importlib.abc.Loader):
    """The real loader of TRIGGER, wrapping the entry points once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # tracebacks and reloads see the real one
        _wrap_entry_points(module)

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrapAfterExec(spec.loader)
        return spec


def install() -> None:
    """Arrange :func:`register` to run before transformers first reads its quantization
    registries (idempotent; imports nothing heavy)."""
    with _lock:
        module = sys.modules.get(TRIGGER)
        if module is not None:
            _wrap_entry_points(module)
        elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
