"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
import errno
import re


class BenchError(Exception):
    """A mistake in the user's input or environment (unknown name, bad parameter, missing data...)."""


# every character str.splitlines() breaks a line at, and the other control characters (a carriage return or an
# escape sequence can overwrite a line on a terminal just as well); a tab is kept
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` as one line: each line break or control character shown as its escape (`\\n`, `\\x1b`,
    `\\u2028`), so a message quoting what a user gave still says exactly what it was, and cannot split the
    `bench: error:` line (or forge a second one)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, word: str, choices) -> BenchError:
    choices = sorted(choices)
    return BenchError(f"unknown {kind} '{word}'{did_you_mean(word, choices)}; "
                      f"choose from: {', '.join(choices)}")


_OS_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENAMETOOLONG: "file name too long", errno.ENOTDIR: "part of the path is not a directory",
               errno.EISDIR: "is a directory", errno.EFBIG: "file too large (a size limit was reached)",
               errno.EEXIST: "a file is in the way"}


def os_reason(exc: OSError) -> str:
    """What went wrong, in a few words a user can act on ('disk full', 'permission denied', ...)."""
    return _OS_REASONS.get(exc.errno, exc.strerror or str(exc))


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def require_safe_name(value: object, what: str) -> str:
    """`value` as a file-name part: letters, digits, '_', '.', '-', not starting with '.' or '-' (so never
    '..' or a path), at most 100 characters. Names read from files are checked like user input."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise BenchError(f"{what} {value!r} is not a safe file name (letters, digits, '_', '.', '-'; "
                         f"no leading '.' or '-', at most 100 characters)")
    return value


def file_safe(value: str) -> str:
    """`value` as a safe file-name part (SAFE_NAME): itself when it is one, else its unsafe characters as
    '_' plus a digest of the whole, so two values never share a file ('pkg.mod:factory' ->
    'pkg.mod_factory-1a2b3c4d')."""
    if SAFE_NAME.fullmatch(value):
        return value
    import hashlib

    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", value).lstrip(".-")[:90] or "_"
    return f"{stem}-{digest}"
