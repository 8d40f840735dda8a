"""Kubernetes resource quantities (``10``, ``1k``, ``500m``, ``2Gi``, ``1e3``).

``parse_quantity`` reads a quantity the way the API server's decoder does and keeps
its format (DecimalSI, BinarySI or DecimalExponent); ``format_quantity`` prints a value
in the canonical form the API server returns it in (``1000`` is ``1k``, ``0.5`` is
``500m``, ``1048576`` written as ``1Mi`` stays ``1Mi``).

    >>> parse_quantity("1k").value
    Fraction(1000, 1)
    >>> format_quantity(parse_quantity("1000"))
    '1k'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

# The decoder's own wording for a string that is not a quantity.
QUANTITY_REGEX = "^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
QUANTITY_FORMAT_ERROR = f"quantities must match the regular expression '{QUANTITY_REGEX}'"

DECIMAL_SI = "DecimalSI"
BINARY_SI = "BinarySI"
DECIMAL_EXPONENT = "DecimalExponent"

_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_NUMBER = re.compile(r"^([+-]?)([0-9]+\.?[0-9]*|\.[0-9]+)(.*)$")
_EXPONENT = re.compile(r"^[eE]([+-]?[0-9]+)$")


@dataclass(frozen=True)
class Quantity:
    value: Fraction
    format: str = DECIMAL_SI

    @property
    def is_integer(self) -> bool:
        return self.value.denominator == 1

    def __str__(self) -> str:
        return format_quantity(self)


def parse_quantity(text: Union[str, int, float]) -> Quantity:
    """A quantity from its string (or a YAML number); ValueError with the decoder's
    message when it is not one."""
    if isinstance(text, bool):
        raise ValueError(QUANTITY_FORMAT_ERROR)
    if isinstance(text, int):
        return Quantity(Fraction(text))
    if isinstance(text, float):
        text = repr(text)
    if not isinstance(text, str):
        raise ValueError(QUANTITY_FORMAT_ERROR)
    m = _NUMBER.match(text.strip())
    if not m or m.group(2) in ("", "."):
        raise ValueError(QUANTITY_FORMAT_ERROR)
    sign, digits, suffix = m.groups()
    number = Fraction(digits if not digits.endswith(".") else digits[:-1])
    if sign == "-":
        number = -number
    if suffix in _DECIMAL_SUFFIXES:
        return Quantity(number * Fraction(10) ** _DECIMAL_SUFFIXES[suffix], DECIMAL_SI)
    if suffix in _BINARY_SUFFIXES:
        return Quantity(number * 2 ** _BINARY_SUFFIXES[suffix], BINARY_SI)
    e = _EXPONENT.match(suffix)
    if e:
        return Quantity(number * Fraction(10) ** int(e.group(1)), DECIMAL_EXPONENT)
    raise ValueError(QUANTITY_FORMAT_ERROR)


def format_quantity(q: Union[Quantity, int], fmt: str = DECIMAL_SI) -> str:
    """The canonical string of a quantity (an int is a DecimalSI count)."""
    if isinstance(q, Quantity):
        value, fmt = q.value, q.format
    else:
        value = Fraction(q)
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if fmt == BINARY_SI and value >= 1024 and value.denominator == 1:
        n, power = int(value), 0
        while power < 60 and n % 1024 == 0:
            n //= 1024
            power += 10
        suffix = {v: k for k, v in _BINARY_SUFFIXES.items()}.get(power, "")
        if power:
            return f"{sign}{n}{suffix}"
    # Decimal: the largest exponent (a multiple of 3, nano at the least) that leaves an
    # integer mantissa; anything finer than nano is rounded up, as the API server does.
    for exp in range(18, -12, -3):
        scaled = value / Fraction(10) ** exp
        if scaled.denominator == 1:
            break
    else:
        exp, scaled = -9, Fraction(-(-value.numerator * 10 ** 9 // value.denominator))
    mantissa = int(scaled)
    if fmt == DECIMAL_EXPONENT:
        return f"{sign}{mantissa}" + (f"e{exp}" if exp else "")
    suffix = {v: k for k, v in _DECIMAL_SUFFIXES.items()}[exp]
    return f"{sign}{mantissa}{suffix}"
