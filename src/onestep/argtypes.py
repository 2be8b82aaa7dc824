"""Argument types of the command line, shared by every command: bad values are refused by argparse with one line
(``onestep COMMAND: error: argument --FLAG: ...``, exit code 2) before a command reads or writes anything.

Each is an ``argparse`` ``type=`` callable taking the flag's string; they raise
:class:`argparse.ArgumentTypeError`, whose message argparse prefixes with the flag's name.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "unit_interval", "seed_int", "conti_from",
           "label_list", "check_labels", "device", "port", "DefaultsHelpFormatter",
           "OnestepArgumentParser"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """A help formatter that says every flag's default: it appends `` (required)`` to a required flag's help text,
    `` (default: off)`` to a switch's, `` (default: none)`` where the default is None, and `` (default: X)``
    otherwise, unless the text already mentions its default (the word "default" in any case)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not text or "default" in text.lower() or not action.option_strings or default is argparse.SUPPRESS:
            return text
        if action.required:
            return text + " (required)"
        if default is False:
            return text + " (default: off)"
        if default is None:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


class OnestepArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, ``PROG: error: MESSAGE``, with exit code 2, and whose
    help shows every flag's default (:class:`DefaultsHelpFormatter`; sub-parsers inherit both)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (step counts, batch sizes, sample counts)."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0 (0 usually means off)."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


def _finite(text: str) -> float:
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures, gains)."""
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (guidance scales, ratios)."""
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return v


def unit_interval(text: str) -> float:
    """A number in (0, 1] (nucleus mass, a time on the unit interval)."""
    v = _finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return v


def weight(text: str) -> float:
    """A number in [0, 1] (a mixture's weight)."""
    v = _finite(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return v


def seed_int(text: str) -> int:
    """A random seed: an integer in 0..2**63-1 (every seed a command takes gives its own streams)."""
    v = _number(text, int)
    if not 0 <= v <= 2 ** 63 - 1:
        raise argparse.ArgumentTypeError(f"a seed lies in 0..2**63-1, got {text}")
    return v


def conti_from(text: str) -> int:
    """A DD1 output-rule position: an integer >= -1 (-1 = argmax codes everywhere)."""
    v = _number(text, int)
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be a position >= 0, or -1, got {text}")
    return v


def label_list(text: str) -> list[int]:
    """Comma-separated class labels >= 0; their upper bound (the run's class count) is checked by the command."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated class labels, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"class labels are >= 0, got {v}")
        out.append(v)
    return out


def check_labels(labels: list[int], num_classes: int) -> None:
    """``ValueError`` naming ``--labels`` when a label is not one of the run's ``num_classes`` classes."""
    bad = [v for v in labels if v >= num_classes]
    if bad:
        raise ValueError(f"argument --labels: label {bad[0]} is not a class of this run (it has {num_classes} classes: "
                         f"0..{num_classes - 1})")


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, available on this machine; returned as given."""
    import torch  # here, not at the top: building the parser imports no torch (``onestep --help`` stays fast)

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} requested but CUDA is not available on this machine; "
                                             "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text} requested but this machine has {n} CUDA device(s) "
                                             f"(cuda:0..cuda:{n - 1})")
    return text


def port(text: str) -> int:
    """A TCP port 0..65535 (0: any free port; the URL printed names the one bound)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port lies in 0..65535, got {v}")
    return v
