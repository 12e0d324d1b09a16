"""Row filters on a table's identity columns: `--gallery-where` and `--queries-where`.

A filter is a small SQL boolean expression over the identity columns (schemas.IDENTITY_COLUMNS),
the same text a user would put after WHERE in DuckDB or Spark:

    split = 'gallery' AND domain = 'shop'
    category IN ('dress', 'skirt') AND item_id IS NOT NULL
    NOT (domain = 'consumer' OR category <> 'dress')
    TRUE                                   (every row)

Comparisons are `=`, `!=` / `<>`, `[NOT] IN (...)` and `IS [NOT] NULL` against single-quoted
strings ('' inside a string is a quote), combined with AND, OR, NOT and parentheses; keywords
are case-insensitive. NULL follows SQL: `item_id != 'x'` does not hold for a null item.

A parsed filter is a pyarrow dataset expression (applied to every row read) and the
conditions that let a reader skip files and row groups by their min/max statistics: every
`column = 'v'` or `column IN (...)` at the top level of the AND chain (`pruning`), which is
what `Snapshot.pieces` takes. Nothing else can skip a file, so it is read and filtered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mga.errors import InputError
from pipelines.schemas import IDENTITY_COLUMNS

_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<op><>|!=|=|\(|\)|,)|(?P<word>[A-Za-z_][A-Za-z0-9_]*))")
KEYWORDS = ("AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE")


@dataclass(frozen=True)
class RowFilter:
    """A parsed filter: its text, the pyarrow expression, and the (column, values) conditions
    a reader can prune files and row groups with."""

    text: str
    expression: pc.Expression = field(compare=False)
    pruning: tuple[tuple[str, tuple[str, ...]], ...] = ()


class _Parser:
    def __init__(self, text: str, option: str) -> None:
        self.text, self.option = text, option
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                self.fail(f"cannot read {text[position:].strip()[:20]!r}")
            kind = match.lastgroup
            value = match.group(kind)
            self.tokens.append((kind, value.upper() if kind == "word" and value.upper() in KEYWORDS else value, match.start(kind)))
            position = match.end()
        self.at = 0

    def fail(self, message: str) -> None:
        raise InputError(f"{self.option} {self.text!r}: {message}")

    def peek(self) -> str | None:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            self.fail(f"ends early{f', expected {expected}' if expected else ''}")
        kind, value, _ = self.tokens[self.at]
        if expected is not None and value != expected:
            self.fail(f"expected {expected}, found {value!r}")
        self.at += 1
        return kind, value

    def parse(self) -> tuple[pc.Expression, list[tuple[str, tuple[str, ...]]]]:
        if not self.tokens:
            self.fail("empty filter (TRUE takes every row)")
        parsed = self.disjunction()
        if self.at < len(self.tokens):
            self.fail(f"unexpected {self.peek()!r}")
        return parsed

    def disjunction(self) -> tuple[pc.Expression, list[tuple[str, tuple[str, ...]]]]:
        expression, pruning = self.conjunction()
        while self.peek() == "OR":
            self.take()
            right, _ = self.conjunction()
            expression, pruning = expression | right, []  # a row may pass either side: nothing to prune on
        return expression, pruning

    def conjunction(self) -> tuple[pc.Expression, list[tuple[str, tuple[str, ...]]]]:
        expression, pruning = self.factor()
        while self.peek() == "AND":
            self.take()
            right, more = self.factor()
            expression, pruning = expression & right, pruning + more
        return expression, pruning

    def factor(self) -> tuple[pc.Expression, list[tuple[str, tuple[str, ...]]]]:
        token = self.peek()
        if token == "NOT":
            self.take()
            expression, _ = self.factor()
            return ~expression, []
        if token == "(":
            self.take()
            parsed = self.disjunction()
            self.take(")")
            return parsed
        if token == "TRUE":
            self.take()
            return pc.scalar(True), []
        return self.comparison()

    def comparison(self) -> tuple[pc.Expression, list[tuple[str, tuple[str, ...]]]]:
        kind, column = self.take()
        if kind != "word" or column in KEYWORDS:
            self.fail(f"expected a column name, found {column!r}")
        if column not in IDENTITY_COLUMNS:
            self.fail(f"unknown column {column!r}: a filter takes {', '.join(IDENTITY_COLUMNS)}")
        operator = self.take()[1]
        value = pc.field(column)
        if operator in ("=", "!=", "<>"):
            literal = self.string()
            return (value == literal, [(column, (literal,))]) if operator == "=" else (value != literal, [])
        negated = operator == "NOT"
        if negated:
            operator = self.take()[1]
        if operator == "IN":
            self.take("(")
            literals = [self.string()]
            while self.peek() == ",":
                self.take()
                literals.append(self.string())
            self.take(")")
            # SQL: a null value is neither IN nor NOT IN a list (isin alone would say false).
            member = pc.Expression._call("if_else", [value.is_valid(), value.isin(literals), pa.scalar(None, pa.bool_())])
            return (~member, []) if negated else (member, [(column, tuple(literals))])
        if operator == "IS" and not negated:
            negated = self.peek() == "NOT"
            if negated:
                self.take()
            self.take("NULL")
            return (value.is_valid() if negated else value.is_null()), []
        self.fail(f"expected =, !=, <>, IN, NOT IN or IS [NOT] NULL after {column}, found {operator!r}")
        raise AssertionError  # fail raises

    def string(self) -> str:
        kind, value = self.take()
        if kind != "string":
            self.fail(f"expected a 'quoted' string, found {value!r}")
        return value[1:-1].replace("''", "'")


def parse_filter(text: str, option: str = "filter") -> RowFilter:
    """`text` as a RowFilter; a syntax error or an unknown column is an InputError naming `option` and the text."""
    expression, pruning = _Parser(text, option).parse()
    return RowFilter(text.strip(), expression, tuple(pruning))
