"""The values ComfyUI's editor lets a user put into a number widget, computed by its own rules.

A widget value reaches the server only after the frontend has clamped and rounded it, so a node's
``min``/``max``/``step``/``round`` options decide which values a user can set at all. The rules
below are read from the frontend's bundled JS, the same in 1.27.10 (the one ComfyUI 0.3.64
pins; ``assets/index-*.js``) and in 1.58.1 (``assets/extensionService-*.js``):

* ``useIntWidget``: options ``min = spec.min ?? 0``, ``max = spec.max ?? 2048``,
  ``step2 = spec.step ?? 1``. litegraph's ``NumberWidget.setValue`` clamps a typed, dragged or
  stepped value to ``[min, max]``, then the widget callback ``onValueChange`` rounds it:
  ``Math.round(v)`` when ``step2 == 1``, else ``Math.round((v - min % step2) / step2) * step2 + min % step2``
  (not clamped again, so a ``max`` off the grid can be rounded past).
* ``useFloatWidget``: ``step = spec.step ?? 0.5``; ``precision = Comfy.FloatRoundingPrecision
  setting || max(0, -floor(log10(step)))``; ``round = spec.round`` or, when the spec has none
  and rounding is on, ``10 ** -precision``. ``onFloatValueChange``: with ``round``,
  ``clamp(Number((Math.round(v / round) * round).toFixed(precision)), min, max)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

INT_DEFAULT_MAX = 2048
FLOAT_DEFAULT_STEP = 0.5
SAMPLES = 400  # values tried across a range too long to enumerate


def js_round(x: float) -> int:
    """JavaScript's ``Math.round``: halves go up (Python's ``round`` goes to even); exact for big integers."""
    whole = math.floor(x)
    return whole + 1 if x - whole >= 0.5 else whole


def js_mod(a: float, b: float) -> float:
    """JavaScript's ``%`` (the sign of the dividend)."""
    return math.fmod(a, b)


def sent_to_server(value: float) -> int | float:
    """A JS number as the server reads it: ``JSON.stringify`` prints the shortest round-trip digits
    (an integral double below 1e21 without exponent), and Python's ``json`` reads them back."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e21:
        return int(Decimal(repr(value)))
    return value


def int_widget_value(typed: float, options: dict[str, Any]) -> int:
    """What an INT widget sends after the user typed/dragged ``typed`` (JS numbers are doubles)."""
    low, high = float(options.get("min", 0)), float(options.get("max", INT_DEFAULT_MAX))
    step = float(options.get("step", 1))
    v = min(max(float(typed), low), high)
    if step == 1:
        return int(sent_to_server(js_round(v)))
    offset = js_mod(low, step)
    return int(sent_to_server(js_round((v - offset) / step) * step + offset))


def float_widget_value(typed: float, options: dict[str, Any], precision_setting: int = 0,
                       rounding: bool = True) -> float:
    """What a FLOAT widget holds after the user typed ``typed`` (default settings: rounding on)."""
    step = options.get("step", FLOAT_DEFAULT_STEP)
    precision = precision_setting or max(0, -math.floor(math.log10(step)))
    round_to = options.get("round")
    if not round_to and rounding and precision:
        round_to = 10.0 ** -precision
    if not round_to:
        return min(max(typed, options.get("min", 0)), options.get("max", INT_DEFAULT_MAX))
    rounded = js_round(typed / round_to) * round_to
    # Number(x.toFixed(p)): JS rounds the decimal string; float(f"{x:.{p}f}") is the same string
    return min(max(float(f"{rounded:.{precision}f}"), options.get("min", -math.inf)), options.get("max", math.inf))


def _typed_values(low: float, high: float, step: float) -> Iterator[float]:
    """What a user may type: the ends, beyond them, and points spread over the range (off-grid too)."""
    yield from (low, high, low - step, high + step, low + step / 2, high - step / 2)
    span = high - low
    for k in range(SAMPLES + 1):
        yield low + span * k / SAMPLES
        yield low + span * k / SAMPLES + step * 0.37


def reachable_ints(options: dict[str, Any]) -> list[int]:
    """Every value the editor can give an INT widget (all of them when the grid is short, else a sample)."""
    low, high, step = options.get("min", 0), options.get("max", INT_DEFAULT_MAX), options.get("step", 1)
    if (high - low) / step <= 5000:
        values = {int_widget_value(low + k * step * 0.5, options) for k in range(int(2 * (high - low) / step) + 2)}
    else:
        values = set()
    values |= {int_widget_value(v, options) for v in _typed_values(low, high, step)}
    return sorted(values)


def reachable_floats(options: dict[str, Any]) -> list[float]:
    """A sample of the values the editor can give a FLOAT widget, under default and coarse precision settings."""
    low, high = options.get("min", 0), options.get("max", INT_DEFAULT_MAX)
    step = options.get("step", FLOAT_DEFAULT_STEP)
    values = set()
    for typed in _typed_values(low, high, step):
        values.add(float_widget_value(typed, options))
        values.add(float_widget_value(typed, options, rounding=False))
        values.add(float_widget_value(typed, options, precision_setting=1))
    return sorted(values)
