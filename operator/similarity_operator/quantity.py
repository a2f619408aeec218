"""Kubernetes resource quantities ("500m", "2", "6Gi"): their value, and the text the API server stores.

Hand-written because neither client the operator ships has a parser (`kubernetes.utils.parse_quantity`
is in the sync `kubernetes` package; kubernetes_asyncio has none), and because a value is not enough:
the API server rewrites a quantity into its own form ("0.5" comes back as "500m", "1024Mi" as "1Gi"),
and drift compares what the operator renders with what the server stores, so any other spelling would
be patched again on every resync. `parse` follows apimachinery's resource.ParseQuantity and
Quantity.String (no sign: resources are never negative).
"""

from __future__ import annotations

import re
from decimal import ROUND_UP, Context, Decimal, InvalidOperation, Overflow, localcontext
from typing import NamedTuple

PATTERN = r"^([0-9]+\.?[0-9]*|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"  # the CRD's `pattern` too
_QUANTITY = re.compile(PATTERN)
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"": 0, "Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}  # powers of 1024
_SI_BY_EXPONENT = {exponent: suffix for suffix, exponent in _DECIMAL_SUFFIXES.items()}
_BINARY_BY_POWER = {power: suffix for suffix, power in _BINARY_SUFFIXES.items()}
_NANO = Decimal("1e-9")


class Quantity(NamedTuple):
    value: Decimal
    text: str  # as the API server writes it back


def parse(raw: object) -> Quantity:
    """A quantity from a string or a non-negative integer; ValueError when it is not one."""
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(text, str) or not (match := _QUANTITY.fullmatch(text)):
        raise ValueError(f"{raw!r} is not a quantity")
    number, suffix = match[1], match[2] or ""
    whole, _, fraction = number.partition(".")
    whole = whole.lstrip("0") or "0"
    digits = whole + fraction
    form = "binary" if suffix.endswith("i") else "exponent" if suffix[1:] else "si"
    if form == "binary":
        power = _BINARY_SUFFIXES[suffix]
        exponent = 0
        # The server keeps the text of a whole number of Ki..Ei that is short and not divisible by 8 ...
        kept = not fraction and 15 - len(whole) - 3 * power - 1 >= 0 and int(whole) % 8 != 0
    else:
        power = 0
        exponent = int(suffix[1:]) if form == "exponent" else _DECIMAL_SUFFIXES[suffix]
        # ... and of a decimal whose scale is a multiple of 3, with no trailing "000" and no leading 0.
        scale = exponent - len(fraction)
        kept = len(digits) <= 18 and scale >= -9 and scale % 3 == 0
        kept = kept and not digits.endswith("000") and digits[0] != "0"
    try:
        with localcontext(Context(prec=100, traps=[InvalidOperation, Overflow])):
            value = Decimal(number).scaleb(exponent) * 1024**power
            # Finer than a nano rounds up: asking for some of a resource gets some.
            value = value.quantize(_NANO, rounding=ROUND_UP).normalize() if value else Decimal(0)
    except ArithmeticError:  # more digits than any resource has
        raise ValueError(f"{raw!r} is too large") from None
    return Quantity(value, text if kept else _canonical(value, form))


def _canonical(value: Decimal, form: str) -> str:
    """Quantity.String's form of a value written in this form (binary, exponent or si)."""
    if not value:
        return "0"
    if form == "binary" and value >= 1024 and value == value.to_integral_value():
        amount, power = int(value), 0
        while amount % 1024 == 0 and power < 6:
            amount, power = amount // 1024, power + 1
        return f"{amount}{_BINARY_BY_POWER[power]}"
    _, digits, exponent = value.as_tuple()  # normalized: no trailing zeros
    assert isinstance(exponent, int)
    shift = exponent % 3  # exponents in steps of 1000, the mantissa takes the rest
    mantissa, exponent = int("".join(map(str, digits))) * 10**shift, exponent - shift
    if form == "exponent":
        return f"{mantissa}e{exponent}" if exponent else str(mantissa)
    si = _SI_BY_EXPONENT.get(exponent)
    return f"{mantissa}{si}" if si is not None else f"{mantissa}e{exponent}"
