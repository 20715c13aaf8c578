"""Errors as the user meets them: which are theirs to fix (and the exit status of each), and
quoting another library's error inside one of ours."""

import sys


def one_line(error: BaseException) -> str:
    """``error``'s whole message on one line, never cut (a cut message loses what it was
    saying, mid-word); a bare message (a KeyError's key, or none) gets its exception's name."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) or not text:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


# The errors that are the user's to fix, by "module:class", and serq's exit status for each: one
# line, no traceback (unless --debug). Named, not imported: importing them would cost seconds
# (torch) on every start, and an exception can only be of a class whose module is loaded.
USER_ERRORS = {
    "serq_ao.cli.common:UsageError": 2,
    "serq_ao.models:ModelNotFoundError": 2,
    "serq_ao.models:ModelLoadError": 2,
    "serq_ao.passes.trace:UnsupportedModelError": 2,
    "serq_ao.files:OutputError": 2,
    "serq_ao.resume:ResumeError": 2,
    "serq_ao.quant.pipeline:ConfigMismatchError": 2,
    "serq_ao.models:ModelAssetMissingError": 1,
    "serq_ao.data:CorpusMissingError": 1,
    "serq_ao.extras:MissingExtraError": 1,
    "serq_ao.quant.input_checks:NonFiniteError": 1,
    "serq_ao.integrations.verify:CheckpointError": 1,
}


def user_error_status(error: BaseException) -> int | None:
    """The exit status for ``error`` if it is one of :data:`USER_ERRORS`, else None."""
    for name, status in USER_ERRORS.items():
        module, cls = name.split(":")
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], cls)):
            return status
    return None
