"""Optional dependencies (the package's extras): imported where they are used, never by
``import serq_ao``, and when one is missing the error names the extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

# the distribution that provides each optional module, where its name differs from the module's
_DISTRIBUTIONS = {"lm_eval": "lm-eval"}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which pip extra brings it."""


def require(module: str, extra: str | None, what: str, *, install: str | None = None) -> ModuleType:
    """Import ``module`` for ``what`` (the feature, e.g. ``"serq eval tasks"``) and return it.

    If it is not installed, raise :class:`MissingExtraError` saying
    ``"<what> needs <distribution>: pip install 'serq-ao[<extra>]'"`` (or ``install``, the
    command to suggest, for a dependency that is no extra of ours).
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # only the optional package itself missing; a module missing inside it or one of its
        # own dependencies missing is a broken installation, and its own error says more
        if e.name != top:
            raise
        distribution = _DISTRIBUTIONS.get(top, top)
        command = install or f"pip install 'serq-ao[{extra}]'"
        raise MissingExtraError(f"{what} needs {distribution}: {command}", name=module) from None
