"""Errors a user can cause. The CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib


class BenchError(Exception):
    """A mistake in the user's input or environment (unknown name, bad parameter, missing data...)."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, word: str, choices) -> BenchError:
    choices = sorted(choices)
    return BenchError(f"unknown {kind} '{word}'{did_you_mean(word, choices)}; "
                      f"choose from: {', '.join(choices)}")
