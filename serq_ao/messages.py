"""Quoting another library's error inside one of ours."""


def one_line(error: BaseException) -> str:
    """``error``'s whole message on one line, never cut (a cut message loses what it was
    saying, mid-word); a bare message (a KeyError's key, or none) gets its exception's name."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) or not text:
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text
