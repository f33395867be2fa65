"""A PromQL parser strict enough to check the dashboard's queries: it accepts the
language's expressions (selectors, range and subqueries, offsets, functions, aggregations
with by/without, binary operators with bool/on/ignoring/group_left/group_right) and
raises PromQLError on anything else, and returns the vector selectors it found, so a test
can check every metric name and label a query uses against what the daemon exports.

Grafana's variables are replaced first: `$__rate_interval` and friends by a duration,
`$var`/`${var}` inside label values are left as they are (they are strings there)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "days_in_month",
    "delta", "deriv", "exp", "floor", "histogram_quantile", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10",
    "log2", "max_over_time", "min_over_time", "minute", "month", "predict_linear",
    "present_over_time", "quantile_over_time", "rate", "resets", "round", "scalar", "sgn",
    "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time",
    "time", "timestamp", "vector", "year",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or",
          "unless", "atan2"}
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "${__rate_interval}": "5m", "${__interval}": "1m", "${__range}": "1h"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+|(?:[Ii]nf|NaN)\b)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    """A vector selector: the metric name and its label matchers (label, op, value)."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


def tokens(expr: str) -> list[tuple[str, str]]:
    for var, dur in GRAFANA_DURATIONS.items():
        expr = expr.replace(var, dur)
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"unexpected {expr[pos:pos + 10]!r} at {pos}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            out.append((kind, m.group()))
    return out


class _Parser:
    def __init__(self, expr: str) -> None:
        self.toks = tokens(expr)
        self.i = 0
        self.selectors: list[Selector] = []

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        k, v = self.peek()
        if (value is not None and v != value) or (kind is not None and k != kind):
            raise PromQLError(f"expected {value or kind}, got {v or 'the end'!r}")
        self.i += 1
        return v

    def parse(self) -> list[Selector]:
        self.expr()
        if self.peek()[0] != "eof":
            raise PromQLError(f"unexpected {self.peek()[1]!r} after the expression")
        return self.selectors

    def expr(self) -> None:
        self.unary()
        while True:
            k, v = self.peek()
            if not (v in BINARY and (k == "op" or k == "ident")):
                return
            self.i += 1
            if self.peek()[1] == "bool":
                if v not in COMPARISONS:
                    raise PromQLError("bool only after a comparison")
                self.i += 1
            if self.peek()[1] in ("on", "ignoring"):
                self.i += 1
                self.labels()
                if self.peek()[1] in ("group_left", "group_right"):
                    self.i += 1
                    if self.peek()[1] == "(":
                        self.labels()
            self.unary()

    def unary(self) -> None:
        while self.peek()[1] in ("-", "+"):
            self.i += 1
        self.postfix()

    def postfix(self) -> None:
        self.primary()
        while True:
            v = self.peek()[1]
            if v == "[":
                self.i += 1
                self.take(kind="duration")
                if self.peek()[1] == ":":
                    self.i += 1
                    if self.peek()[0] == "duration":
                        self.i += 1
                self.take("]")
            elif v == "offset":
                self.i += 1
                if self.peek()[1] == "-":
                    self.i += 1
                self.take(kind="duration")
            elif v == "@":
                self.i += 1
                if self.peek()[0] == "number":
                    self.i += 1
                else:
                    fn = self.take(kind="ident")
                    if fn not in ("start", "end"):
                        raise PromQLError(f"@ {fn}: only start() or end()")
                    self.take("(")
                    self.take(")")
            else:
                return

    def primary(self) -> None:
        k, v = self.peek()
        if k in ("number", "string"):
            self.i += 1
        elif v == "(":
            self.i += 1
            self.expr()
            self.take(")")
        elif v == "{":
            self.selector("")
        elif k == "ident":
            self.i += 1
            if v in AGGREGATIONS:
                self.aggregation()
            elif self.peek()[1] == "(":
                if v not in FUNCTIONS:
                    raise PromQLError(f"unknown function {v}")
                self.args()
            elif v in BINARY or v in ("by", "without", "on", "ignoring", "bool", "offset"):
                raise PromQLError(f"{v} where an expression was expected")
            else:
                self.selector(v)
        else:
            raise PromQLError(f"expected an expression, got {v or 'the end'!r}")

    def aggregation(self) -> None:
        grouped = False
        if self.peek()[1] in ("by", "without"):
            self.i += 1
            self.labels()
            grouped = True
        self.args()
        if not grouped and self.peek()[1] in ("by", "without"):
            self.i += 1
            self.labels()

    def args(self) -> None:
        self.take("(")
        if self.peek()[1] == ")":
            self.i += 1
            return
        self.expr()
        while self.peek()[1] == ",":
            self.i += 1
            self.expr()
        self.take(")")

    def labels(self) -> list[str]:
        self.take("(")
        out: list[str] = []
        while self.peek()[1] != ")":
            out.append(self.take(kind="ident"))
            if self.peek()[1] == ",":
                self.i += 1
            elif self.peek()[1] != ")":
                raise PromQLError(f"expected , or ) in a label list, got {self.peek()[1]!r}")
        self.take(")")
        return out

    def selector(self, name: str) -> None:
        sel = Selector(name)
        if self.peek()[1] == "{":
            self.i += 1
            while self.peek()[1] != "}":
                label = self.take(kind="ident")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"{op!r} is not a label matcher")
                value = self.take(kind="string")[1:-1]
                if op in ("=~", "!~"):
                    try:
                        re.compile(re.sub(r"\$\{?\w+\}?", "x", value))
                    except re.error as e:
                        raise PromQLError(f"{label}{op}{value!r}: {e}") from e
                sel.matchers.append((label, op, value))
                if self.peek()[1] == ",":
                    self.i += 1
                elif self.peek()[1] != "}":
                    raise PromQLError(f"expected , or }} in a selector, got {self.peek()[1]!r}")
            self.take("}")
        for label, op, value in sel.matchers:
            if label == "__name__" and op == "=":
                sel.name = value
        if not sel.name:
            raise PromQLError("a selector without a metric name")
        self.selectors.append(sel)


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of `expr` (PromQLError if it is not PromQL)."""
    return _Parser(expr).parse()
