"""The final answer of a reply, the reference answer of a record, and whether they agree.

* ``extract_answer(text)`` reads the final answer from any reasonable reply, in this order:

  1. the *last* tagged answer: ``Answer: N``, ``The (final) answer is N``, ``\\boxed{N}``,
     ``#### N`` (gsm8k), ``<answer>N</answer>``. After ``Answer:``/``answer is`` the number
     read is the first one of that sentence, or the result of an equation there
     (``Answer: 7 + 5 = 12`` -> ``12``). ``\\boxed{}`` and ``<answer>`` keep a non-numeric
     content as written (``\\frac{\\sqrt{3}}{2}``) for the symbolic check;
  2. a trailing equation: the number right after the last ``=`` of the reply's last line that
     has one, when that line is the last line holding a number (``7 + 5 = 12`` -> ``12``);
  3. else the last number of the reply.

  Numbers are normalised: ``1,000`` -> ``1000``, ``12.0`` -> ``12``, ``$12`` -> ``12``,
  ``12.`` -> ``12``, ``0.50`` -> ``0.5``, ``50%`` -> ``50``; a fraction (``\\frac{1}{2}``, ``1/2``)
  prints as its decimal when that terminates (``0.5``), else as ``1/3``.
  ``None`` when the reply holds no answer at all.
* ``gold_answer(value)`` reads a reference as datasets carry it: gsm8k's ``"...#### 72"``, a bare
  ``"72"`` or ``72``, ``\\boxed{72}``, ``<answer>72</answer>``; a symbolic reference (MATH's
  ``\\frac{\\sqrt{3}}{2}``) is returned stripped, as written.
* ``is_correct(reply, gold)``: exact numeric equality (as fractions, so ``0.5`` == ``1/2``) when
  both sides are numbers; otherwise, when the ``math-verify`` package imports, its symbolic
  equivalence of the two extracted answers, and failing that of its own reading of the whole
  reply (for a symbolic reference only: a numeric one is never decided by a number found
  elsewhere in the reply); without it, equality of the whitespace-normalised strings
  (``MATH_VERIFY_AVAILABLE`` says which; ``alignkit.rewards.math`` says so once).

Left out: number words (``twelve``), units beyond ``$``/``%``, answers spread over several tags
(only the last counts), and multiple-choice letters (an ``Answer: B`` tag yields ``B``, compared
as a string).
"""

from __future__ import annotations

import importlib.util
import re
import threading
from fractions import Fraction
from typing import Any

# The maintained verifier for symbolic answers; numeric answers never need it, so it is imported
# (with sympy, ~0.3 s) on the first symbolic comparison only.
MATH_VERIFY_AVAILABLE = importlib.util.find_spec("math_verify") is not None


def _mv_parse(*args, **kwargs):
    from math_verify import parse

    return parse(*args, **kwargs)


def _mv_verify(*args, **kwargs):
    from math_verify import verify

    return verify(*args, **kwargs)

# A number: thousands-grouped (1,000 / 12,345.5) or plain (-3, 12.5), with an optional $ before
# it. Not glued to a preceding letter, digit or decimal point ("x2", "1.2.3"); a minus sign
# counts only when not right after a digit ("12-4" is 12 and 4).
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])-?\\?\$?" + _NUM + r"(?!\d)(?!\.\d)(?:\s?\\?%)?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
_SLASH_RE = re.compile(r"(-?\d+)\s*/\s*(\d+)")
_ANSWER_XML_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_TAG_RE = re.compile(
    r"(?:\banswer\s*(?:is|was|would be|will be|=)?\s*[:=]|\banswer\s+(?:is|was|would be|will be)\b)",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKUP_RE = re.compile(r"[*_`]+")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    # A terminating decimal prints as one (0.5); anything else as a fraction (1/3).
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:
        text = f"{float(value):.15f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def _to_fraction(token: str) -> Fraction | None:
    """A single number token (as ``_NUMBER_RE`` finds it, or a fraction) as an exact value."""
    t = token.strip().replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    t = t.replace(",", "").replace(" ", "").rstrip(".")
    frac = _FRAC_RE.fullmatch(t)
    if frac:
        num, den = int(frac.group(1)), int(frac.group(2))
        return Fraction(num, den) if den else None
    slash = _SLASH_RE.fullmatch(t)
    if slash:
        num, den = int(slash.group(1)), int(slash.group(2))
        return Fraction(num, den) if den else None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(token: str) -> str | None:
    """``"1,000"`` -> ``"1000"``, ``"$12.0"`` -> ``"12"``, ``"\\frac{1}{2}"`` -> ``"1/2"``; ``None`` if not a number."""
    value = _to_fraction(token)
    return None if value is None else _canonical(value)


def _numbers(text: str) -> list[re.Match]:
    return list(_NUMBER_RE.finditer(text))


def _first_fraction_or_number(segment: str) -> str | None:
    """The answer in a tag's segment: a fraction, else the result of an equation, else its first number."""
    segment = _MARKUP_RE.sub("", segment)
    frac = _FRAC_RE.search(segment) or _SLASH_RE.search(segment)
    if "=" in segment:
        segment = segment[segment.rindex("=") + 1 :]
        frac = _FRAC_RE.search(segment) or _SLASH_RE.search(segment)
    found = _numbers(segment)
    if frac and (not found or frac.start() <= found[0].start()):
        return normalize_number(frac.group(0))
    if found:
        return normalize_number(found[0].group(0))
    return None


def _content(inner: str) -> str | None:
    """The answer inside ``\\boxed{}``/``<answer>``/``####``: a number normalised, else the text as written."""
    stripped = inner.strip().strip("$").strip()
    if not stripped:
        return None
    whole = normalize_number(stripped)
    if whole is not None:
        return whole
    cleaned = _MARKUP_RE.sub("", stripped).strip().rstrip(".").strip()
    whole = normalize_number(cleaned)
    if whole is not None:
        return whole
    if "=" in cleaned:  # "x = 12", "7 + 5 = 12"
        rhs = cleaned[cleaned.rindex("=") + 1 :].strip()
        if normalize_number(rhs) is not None:
            return normalize_number(rhs)
    # A short phrase ending in a number ("12 apples" / "$12 in total") reads as that number.
    found = _numbers(cleaned)
    if len(found) == 1 and not re.search(r"[\\^{}]", cleaned):
        return normalize_number(found[0].group(0))
    return " ".join(cleaned.split())


# How far after a tag (or inside an unclosed \boxed{) an answer is looked for: keeps a hostile or
# degenerate reply ("Answer: " x 5000, "\boxed{" x 5000) linear in its length instead of quadratic.
MAX_ANSWER_SPAN = 1000

_MATH_SPAN_RE = re.compile(r"\$\$?(.+?)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _tag_value(segment: str) -> str | None:
    """The answer after ``Answer:``: LaTeX (``$\\frac{\\sqrt{3}}{2}$``) kept whole, else a number as
    ``_first_fraction_or_number`` reads it."""
    if "\\" not in segment:
        return _first_fraction_or_number(segment)
    span = _MATH_SPAN_RE.search(segment)
    if span is None:
        if _FRAC_RE.match(segment.strip()):
            return normalize_number(_FRAC_RE.match(segment.strip()).group(0))
        return _content(segment)
    return _content(next(g for g in span.groups() if g is not None))


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}``, braces balanced."""
    out = []
    for match in _BOXED_RE.finditer(text):
        depth, i = 1, match.end()
        end = min(len(text), match.end() + MAX_ANSWER_SPAN)
        while i < end and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((match.start(), text[match.end() : i - 1]))
    return out


def _sentence_after(text: str, start: int) -> str:
    """From ``start`` to the end of its line or sentence (a period followed by a space or the end)."""
    rest = text[start : start + MAX_ANSWER_SPAN]
    line = rest.split("\n", 1)[0]
    if not line.strip() and "\n" in rest:  # "Answer:\n12"
        line = rest.lstrip("\n").split("\n", 1)[0]
    end = re.search(r"\.(?:\s|$)(?!\d)", line)
    return line[: end.start()] if end else line


def _tagged(text: str) -> str | None:
    candidates: list[tuple[int, str | None]] = []
    for match in _ANSWER_XML_RE.finditer(text):
        candidates.append((match.start(), _content(match.group(1))))
    for pos, inner in _boxed(text):
        candidates.append((pos, _content(inner)))
    for match in _HASHES_RE.finditer(text):
        candidates.append((match.start(), _first_fraction_or_number(match.group(1))))
    for match in _TAG_RE.finditer(text):
        segment = _sentence_after(text, match.end())
        boxed = _boxed(segment)
        if boxed:  # "The answer is \boxed{12}" is the boxed candidate already
            continue
        candidates.append((match.start(), _tag_value(segment)))
    candidates = [(pos, value) for pos, value in candidates if value is not None]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _trailing_equation(text: str) -> str | None:
    lines = [line for line in text.splitlines() if _numbers(line)]
    if not lines:
        return None
    last = _MARKUP_RE.sub("", lines[-1])
    if "=" not in last:
        return None
    return _first_fraction_or_number(last[last.rindex("=") + 1 :])


def extract_answer(text: Any) -> str | None:
    """The final answer of a reply (normalised when numeric), or ``None``; see the module docstring."""
    text = _text(text)
    if not text.strip():
        return None
    for reader in (_tagged, _trailing_equation):
        found = reader(text)
        if found is not None:
            return found
    numbers = _numbers(text)
    return normalize_number(numbers[-1].group(0)) if numbers else None


def gold_answer(value: Any) -> str | None:
    """The reference answer of a record: gsm8k's ``#### N``, a bare ``N``, ``\\boxed{N}``, ``<answer>N</answer>``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return _canonical(Fraction(str(value)))
        except (ValueError, ZeroDivisionError):
            return None
    text = _text(value).strip()
    if not text:
        return None
    if "####" in text:
        return _content(text[text.rindex("####") + 4 :].split("\n", 1)[0])
    boxed = _boxed(text)
    if boxed:
        return _content(boxed[-1][1])
    xml = _ANSWER_XML_RE.findall(text)
    if xml:
        return _content(xml[-1])
    return _content(text)


def _symbolic_equal(given: str, gold: str) -> bool:
    if not MATH_VERIFY_AVAILABLE:
        return " ".join(given.split()) == " ".join(gold.split())
    # math-verify times out through SIGALRM, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    kw = {} if main else {"parsing_timeout": None}
    try:
        gold_parsed = _mv_parse(f"${gold}$", **kw)
        given_parsed = _mv_parse(f"${given}$", **kw)
        if not gold_parsed or not given_parsed:
            return " ".join(given.split()) == " ".join(gold.split())
        return bool(_mv_verify(gold_parsed, given_parsed, **({} if main else {"timeout_seconds": None})))
    except Exception:  # a verifier failure is "not shown equal", never a crash mid-run
        return " ".join(given.split()) == " ".join(gold.split())


def answers_match(given: str | None, gold: str | None) -> bool:
    """Whether two extracted answers agree: as exact numbers when both are numbers, else symbolically."""
    if given is None or gold is None:
        return False
    a, b = _to_fraction(given), _to_fraction(gold)
    if a is not None and b is not None:
        return a == b
    return _symbolic_equal(given, gold)


def _verify_whole_reply(reply: str, gold: str) -> bool:
    """math-verify's own reading of the whole reply against a symbolic reference (as TRL's accuracy reward does)."""
    main = threading.current_thread() is threading.main_thread()
    try:
        gold_parsed = _mv_parse(f"${gold}$", **({} if main else {"parsing_timeout": None}))
        given = _mv_parse(reply, **({} if main else {"parsing_timeout": None}))
        return bool(gold_parsed and given and _mv_verify(gold_parsed, given,
                                                         **({} if main else {"timeout_seconds": None})))
    except Exception:  # a verifier failure is "not shown equal"
        return False


def is_correct(reply: Any, gold: Any) -> bool:
    """Whether the final answer of ``reply`` equals the reference ``gold`` (as datasets carry it).

    A symbolic reference that the extracted answer does not match gets one more chance when
    math-verify is installed: its own reading of the whole reply (LaTeX anywhere in it)."""
    reference = gold_answer(gold)
    if answers_match(extract_answer(reply), reference):
        return True
    if reference is None or _to_fraction(reference) is not None or not MATH_VERIFY_AVAILABLE:
        return False
    return _verify_whole_reply(_text(reply), reference)
