"""Answer extraction and comparison for math rewards (GSM8K ``#### n``, LaTeX ``\\boxed{}``).

Extraction, in order (:func:`extract_answer`):

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces balanced; ``\\boxed 5`` also works);
2. else the text after the last GSM8K marker ``####`` up to the end of its line;
3. else, only if ``fallback`` is on and *no* marker appears, the last number in the text.

A marker that is present but malformed (``\\boxed{3/4`` with no closing brace, ``####`` followed
by nothing) yields no answer: the model tried to mark an answer and failed, and guessing from the
surrounding text would reward that.

Comparison (:func:`answers_match`): both sides are parsed as exact rationals when possible
(:func:`parse_number`): thousands commas, ``$``, a trailing ``%`` (``50%`` equals ``50``), a
trailing period, ``\\frac{a}{b}``/``\\dfrac``/``a/b`` fractions, decimals (``5.0 == 5``,
``0.75 == 3/4``) and signs. An answer such as ``72 clips`` or ``\\text{72 apples}`` that holds
exactly one number is that number. Otherwise the two strings are compared after removing
whitespace, ``$``, ``\\left``/``\\right``, thin spaces and ``\\text{}`` wrappers.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
    r"|(?<![\w.])-?\.\d+"
)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT_RE = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
_SLASH_RE = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_COMMA_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}``; None if absent or unbalanced."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if rest.startswith(" "):  # "\boxed 5": the argument is the next token
        token = rest.strip().split(maxsplit=1)
        return token[0].rstrip("$") if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def has_marker(text: str) -> bool:
    """Whether ``text`` explicitly marks an answer (a box command or a ``####`` line)."""
    return "####" in text or any(cmd in text for cmd in _BOX_COMMANDS)


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The answer string ``text`` marks (see the module doc for the order); None if none."""
    if any(cmd in text for cmd in _BOX_COMMANDS):
        boxed = last_boxed(text)
        return boxed.strip() if boxed is not None and boxed.strip() else None
    if "####" in text:
        found = _GSM8K_RE.findall(text)[-1].strip()
        return found or None
    if not fallback:
        return None
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def reference_answer(label: str) -> str:
    """The answer inside a dataset label: a full GSM8K solution ends in ``#### n``."""
    marked = extract_answer(label, fallback=False) if has_marker(label) else None
    return marked if marked is not None else label.strip()


def _clean(s: str) -> str:
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "\\%"):
        s = s.replace(junk, "%" if junk == "\\%" else "")
    s = s.replace("{,}", ",")
    return "".join(s.split()).rstrip(".")


def parse_number(s: str) -> Fraction | None:
    """``s`` as an exact rational, or None when it is not one plain number (see module doc)."""
    t = _clean(s).rstrip("%")
    if t.startswith("+"):
        t = t[1:]
    if not t:
        return None
    if _COMMA_RE.match(t):
        t = t.replace(",", "")
    m = _FRAC_RE.match(t) or _FRAC_SHORT_RE.match(t)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return -num / den if m.group(1) else num / den
    m = _SLASH_RE.match(t)
    if m:
        num, den = _fraction(m.group(1)), _fraction(m.group(2))
        return None if num is None or den is None or den == 0 else num / den
    return _fraction(t)


def _fraction(t: str) -> Fraction | None:
    if not t or not any(ch.isdigit() for ch in t) or not set(t) <= set("-0123456789."):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def answer_number(answer: str) -> Fraction | None:
    """``answer`` as a number: the whole string, else its only number (``72 clips`` -> 72)."""
    whole = parse_number(answer)
    if whole is not None:
        return whole
    numbers = _NUMBER_RE.findall(_TEXT_WRAP_RE.sub(r"\1", answer))
    return parse_number(numbers[0]) if len(numbers) == 1 else None


def answers_match(predicted: str, reference: str, *, rel_tol: float = 0.0) -> bool:
    """Whether two answer strings agree: numerically when both are numbers, else textually.

    Numbers agree when equal as exact rationals, or within ``rel_tol`` relative to the
    reference (``|p - r| <= rel_tol * |r|``).
    """
    p, r = answer_number(predicted), answer_number(reference)
    if p is not None and r is not None:
        return p == r or abs(p - r) <= Fraction(rel_tol) * abs(r)
    if p is not None or r is not None:
        return False
    return bool(_clean(predicted)) and _clean(predicted) == _clean(reference)
