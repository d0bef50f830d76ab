"""Prometheus metrics without a dependency: counters, gauges and histograms in a `Registry`, written
in the text exposition format 0.0.4 (`Registry.render`) and read back by `parse_exposition` (tests,
and anyone checking what a peer serves). Pure: no sockets; the shells serve `render()` over HTTP.

A metric family has fixed label names; `family.labels(kind="busy")` returns the child for one set
of values (created on first use). Gauges may read their value from a function at render time, so a
number the process already keeps (sessions open, free KV) is never copied into a second place.
Updates take a lock: the gateway's client updates from its own thread."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds; from a fast local forward to a slow multi-hop step over the internet
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class MetricsError(ValueError):
    """A bad metric definition or update (name, labels, a counter going down), or bad exposition text."""


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' own clients write it: 0.005, 1.0, +Inf."""
    if math.isinf(bound):
        return "+Inf"
    return f"{bound:.1f}" if float(bound).is_integer() else repr(float(bound))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = list(zip(names, values, strict=True))
    if extra is not None:
        pairs.append(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str], lock: threading.Lock) -> None:
        if not _NAME.match(name):
            raise MetricsError(f"bad metric name {name!r}")
        for label in labelnames:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise MetricsError(f"metric {name}: bad label name {label!r}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = lock
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, **values: str):
        if set(values) != set(self.labelnames):
            raise MetricsError(
                f"metric {self.name} takes labels {list(self.labelnames)}, got {sorted(values)}"
            )
        key = tuple(str(values[n]) for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
        return child

    def _default(self):
        """The unlabelled child, for families without labels."""
        if self.labelnames:
            raise MetricsError(f"metric {self.name} has labels {list(self.labelnames)}: use .labels(...)")
        return self.labels()

    def _new_child(self):
        raise NotImplementedError

    def _samples(self) -> Iterable[str]:
        """One line per child: right for counters and gauges; histograms write their buckets."""
        for key, child in sorted(self._children.items()):
            yield f"{self.name}{_labels_text(self.labelnames, key)} {_format_value(child.value)}"

    def render(self) -> str:
        head = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join([*head, *self._samples()])


class _CounterChild:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if not amount >= 0:
            raise MetricsError(f"a counter only goes up; got {amount}")
        with self._lock:
            self.value += amount


class Counter(_Family):
    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1.0) -> None:
        self._default().inc(amount)

    @property
    def value(self) -> float:
        return self._default().value


class _GaugeChild:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from `function` at each render (it must be cheap and not raise)."""
        self._function = function

    @property
    def value(self) -> float:
        return float(self._function()) if self._function is not None else self._value


class Gauge(_Family):
    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(self._lock)

    def set(self, value: float) -> None:
        self._default().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._default().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._default().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        self._default().set_function(function)

    @property
    def value(self) -> float:
        return self._default().value


class _HistogramChild:
    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self.bounds = bounds
        #: per bucket, not cumulative (made cumulative when written)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise MetricsError("a histogram cannot observe NaN")
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self.counts[index] += 1
            self.sum += value
            self.count += 1


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str],
        lock: threading.Lock,
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> None:
        super().__init__(name, help_text, labelnames, lock)
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise MetricsError(f"metric {name}: buckets must be increasing and distinct, got {list(buckets)}")
        self.bounds = bounds

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self.bounds)

    def observe(self, value: float) -> None:
        self._default().observe(value)

    def _samples(self) -> Iterable[str]:
        for key, child in sorted(self._children.items()):
            cumulative = 0
            for bound, n in zip([*self.bounds, math.inf], child.counts, strict=True):
                cumulative += n
                le = ("le", _le(bound))
                yield f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} {cumulative}"
            labels = _labels_text(self.labelnames, key)
            yield f"{self.name}_sum{labels} {_format_value(child.sum)}"
            yield f"{self.name}_count{labels} {child.count}"


class Registry:
    """The metrics of one process, written in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> _Family:
        if family.name in self._families:
            raise MetricsError(f"metric {family.name} is registered twice")
        self._families[family.name] = family
        if not family.labelnames:
            family.labels()  # an unlabelled metric is written (as 0) before its first update
        return family

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):
            raise MetricsError(f"counter {name}: counter names end in _total")
        return self._add(Counter(name, help_text, labelnames, self._lock))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames, self._lock))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Histogram:  # fmt: skip
        return self._add(Histogram(name, help_text, labelnames, self._lock, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        return "\n".join(f.render() for f in self._families.values()) + "\n"


# ------------------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Exposition:
    """Parsed exposition text: each family's type and help, and every sample in order."""

    types: Mapping[str, str]
    helps: Mapping[str, str]
    samples: tuple[Sample, ...]

    def value(self, name: str, **labels: str) -> float:
        """The one sample named `name` with exactly these labels; MetricsError if there is none."""
        for s in self.samples:
            if s.name == name and dict(s.labels) == labels:
                return s.value
        raise MetricsError(f"no sample {name}{labels or ''}")

    def total(self, name: str) -> float:
        """The sum of every sample named `name` (all label values)."""
        return sum(s.value for s in self.samples if s.name == name)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse_value(text: str, line_no: int) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise MetricsError(f"line {line_no}: bad value {text!r}") from None


def parse_exposition(text: str) -> Exposition:
    """Read text format 0.0.4 strictly: every sample belongs to a family declared by `# TYPE` before
    it, label sets are well formed, histogram buckets are cumulative and end in `+Inf` = `_count`."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: list[Sample] = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                if len(parts) != 4 or parts[3] not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    raise MetricsError(f"line {line_no}: bad TYPE line {line!r}")
                if parts[2] in types:
                    raise MetricsError(f"line {line_no}: {parts[2]} has a second TYPE line")
                types[parts[2]] = parts[3]
            elif len(parts) >= 3 and parts[1] == "HELP":
                helps[parts[2]] = _unescape(parts[3]) if len(parts) == 4 else ""
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise MetricsError(f"line {line_no}: not a sample: {line!r}")
        name, label_text, value = m.group(1), m.group(3) or "", m.group(4)
        labels: dict[str, str] = {}
        rest = label_text
        while rest.strip():
            pair = _LABEL_PAIR.match(rest)
            if pair is None:
                raise MetricsError(f"line {line_no}: bad labels {{{label_text}}}")
            if pair.group(1) in labels:
                raise MetricsError(f"line {line_no}: label {pair.group(1)} given twice")
            labels[pair.group(1)] = _unescape(pair.group(2))
            rest = rest[pair.end() :]
        family = _family_of(name, types)
        if family is None:
            raise MetricsError(f"line {line_no}: sample {name} comes before a TYPE line for its family")
        samples.append(Sample(name, labels, _parse_value(value, line_no)))
    result = Exposition(types, helps, tuple(samples))
    _check_histograms(result)
    return result


def _family_of(name: str, types: Mapping[str, str]) -> str | None:
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
            return base
    return None


def _check_histograms(exposition: Exposition) -> None:
    for family, kind in exposition.types.items():
        if kind != "histogram":
            continue
        series: dict[tuple, list[tuple[float, float]]] = {}
        counts: dict[tuple, float] = {}
        for s in exposition.samples:
            if s.name == f"{family}_bucket":
                if "le" not in s.labels:
                    raise MetricsError(f"{family}: a bucket without an 'le' label")
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(key, []).append((_parse_value(s.labels["le"], 0), s.value))
            elif s.name == f"{family}_count":
                counts[tuple(sorted(s.labels.items()))] = s.value
        for key, buckets in series.items():
            bounds = [b for b, _ in buckets]
            values = [v for _, v in buckets]
            if bounds != sorted(bounds) or bounds[-1] != math.inf:
                raise MetricsError(f'{family}{dict(key)}: buckets must increase and end with le="+Inf"')
            if values != sorted(values):
                raise MetricsError(f"{family}{dict(key)}: bucket counts must be cumulative")
            if counts.get(key) != values[-1]:
                raise MetricsError(f"{family}{dict(key)}: the +Inf bucket must equal _count")
