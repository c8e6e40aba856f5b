"""The acceptance policy of `hqsam refine --accept EXPR`: which refined masks replace the originals.

EXPR is a boolean expression over a refined row's quality columns (`POLICY_COLUMNS`). It is read
by the small tokenizer and recursive-descent parser below, never by Python's eval, ast or compile,
so a policy can only compare numbers:

    expression := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | comparison
    comparison := operand (OP operand)+      chained: a < b <= c means a < b and b <= c
    operand    := COLUMN | NUMBER            each comparison pairs a column with a number
    OP         := <  <=  >  >=  ==  !=

Precedence is not > and > or, as in Python; keywords are case-insensitive, column names exact;
numbers are ints or decimals with an optional sign and exponent (`1`, `-0.5`, `.5`, `2e-3`).

Missing values: a column may hold NaN for a missing value (iou_vs_original and
boundary_iou_vs_original are missing where the input annotation had no mask). A comparison on a
missing value HOLDS, and so does its negation under `not`: with no original mask there is nothing
to keep and the refined mask is all there is, so a missing value never rejects a row by itself
(`not iou_vs_original < 0.5` treats such a row exactly as `iou_vs_original >= 0.5` does).

Each top-level `and` conjunct is a clause (a top level without `and` is one clause); a rejected
row's `rejected_by` is the text of the first clause, in order, that fails for it.

The default, `DEFAULT_POLICY`, replaces a mask only when the refined mask still overlaps the
original by IoU >= 0.5: two masks with IoU >= 0.5 share at least half of their union, so a
refinement that lands on a neighbouring object or loses most of this one keeps the original.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hqsam.hqsam_core.errors import HqsamError

# name -> one-line meaning (the order is the order help text lists them in)
POLICY_COLUMNS: dict[str, str] = {
    "score": "SAM's predicted IoU of its own mask token (0..1)",
    "stability": "stability of the refined mask: IoU of its logits thresholded at +1 and -1 (0..1)",
    "sam_hq_iou": "IoU of SAM's own mask for the same prompt with the refined mask (0..1)",
    "iou_vs_original": "IoU of the refined mask with the input's mask (0..1); missing without one",
    "boundary_iou_vs_original": "Boundary IoU of the refined mask with the input's mask (0..1); "
    "missing without one",
    "area": "the refined mask's pixel count",
    "category_id": "the annotation's category id, as in the input",
}

DEFAULT_POLICY = "iou_vs_original >= 0.5"

HELP = (
    "Replace a mask with its refinement when EXPR holds: comparisons of a column with a number "
    "(<, <=, >, >=, ==, !=; chained: 0.5 <= iou_vs_original < 0.98), not, and, or, parentheses. "
    "Columns: " + ", ".join(POLICY_COLUMNS) + ". A comparison on a missing value (no original "
    f"mask: nothing to keep) holds, under not too. Default {DEFAULT_POLICY}: the masks must "
    "share half their union, so a refinement on another object or a fragment keeps the original."
)

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
# `0.9 <= x` is `x >= 0.9`: comparisons are stored with the column on the left
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_KEYWORDS = ("and", "or", "not")
# integers beyond float64's exact range compare as floats: numpy refuses out-of-range Python ints
_EXACT_INT = 2**53

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_TAIL = re.compile(r"[A-Za-z0-9_.]*")  # what glues onto a number to make it malformed
_OPERATOR = re.compile(r"<=|>=|==|!=|<|>")


class PolicyError(HqsamError):
    """A bad --accept expression, or rows that lack what it needs; one sentence."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "op", "(", ")", "and", "or", "not", "end"
    text: str
    start: int  # 0-based offset into the stripped expression
    end: int

    @property
    def where(self) -> str:
        return f"at character {self.start + 1}"


@dataclass(frozen=True)
class _Compare:
    column: str
    op: str
    number: float | int


@dataclass(frozen=True)
class _And:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Or:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Not:
    item: _Node


_Node = _Compare | _And | _Or | _Not


def _quote(text: str) -> str:
    return f'"{text}"' if "'" in text else f"'{text}'"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if match := _NUMBER.match(text, i):
            tail = _WORD_TAIL.match(text, match.end())
            end = tail.end() if tail else match.end()
            if end > match.end():  # e.g. `5x`, `1e`, `0.5.3`: not a number and not a column
                raise PolicyError(f"--accept: malformed number {_quote(text[i:end])} at character {i + 1}")
            if not math.isfinite(float(match.group())):
                raise PolicyError(
                    f"--accept: number {_quote(match.group())} at character {i + 1} is too large"
                )
            tokens.append(_Token("number", match.group(), i, match.end()))
        elif match := _NAME.match(text, i):
            word = match.group()
            kind = word.lower() if word.lower() in _KEYWORDS else "name"
            tokens.append(_Token(kind, word, i, match.end()))
        elif match := _OPERATOR.match(text, i):
            tokens.append(_Token("op", match.group(), i, match.end()))
        elif char in "()":
            tokens.append(_Token(char, char, i, i + 1))
        else:
            hint = " (write '==' to test equality)" if char == "=" else ""
            raise PolicyError(f"--accept: unexpected character {_quote(char)} at character {i + 1}{hint}")
        i = tokens[-1].end
    tokens.append(_Token("end", "", len(text), len(text)))
    return tokens


def _number(text: str) -> float | int:
    # ints stay ints (exact against integer columns such as area) while float64 holds them exactly
    if re.fullmatch(r"[+-]?\d+", text) and abs(int(text)) <= _EXACT_INT:
        return int(text)
    return float(text)


class _Parser:
    """Recursive descent over the tokens; every error names the token and where it is."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def source(self, first: int, last: int) -> str:
        """The whitespace-normalised text of tokens first..last (indices, inclusive)."""
        return " ".join(self.text[self.tokens[first].start : self.tokens[last].end].split())

    def fail(self, expected: str) -> PolicyError:
        token = self.peek()
        previous = self.tokens[self.i - 1] if self.i else None
        if token.kind == "end" and previous is not None:
            return PolicyError(
                f"--accept: unexpected end of expression after {_quote(previous.text)} (expected {expected})"
            )
        after = f" after {_quote(previous.text)}" if previous is not None else ""
        return PolicyError(f"--accept: expected {expected}{after} {token.where}, got {_quote(token.text)}")

    def parse(self) -> tuple[list[_Node], list[str]]:
        """The expression's top-level clauses: their trees and their texts."""
        groups = self.or_groups()
        token = self.peek()
        if token.kind == ")":
            raise PolicyError(f"--accept: unmatched ')' {token.where}")
        if token.kind != "end":
            raise self.fail("'and', 'or' or the end of the expression")
        if len(groups) == 1:  # a top-level `and` (or a single term): one clause per conjunct
            return [node for node, _ in groups[0]], [text for _, text in groups[0]]
        tree = _Or(tuple(_and([node for node, _ in group]) for group in groups))
        return [tree], [self.source(0, self.i - 1)]

    def or_groups(self) -> list[list[tuple[_Node, str]]]:
        """`and`-groups separated by `or`: each a list of (conjunct, its source text)."""
        groups = [self.and_items()]
        while self.peek().kind == "or":
            self.advance()
            groups.append(self.and_items())
        return groups

    def or_node(self) -> _Node:
        groups = self.or_groups()
        nodes = [_and([node for node, _ in group]) for group in groups]
        return nodes[0] if len(nodes) == 1 else _Or(tuple(nodes))

    def and_items(self) -> list[tuple[_Node, str]]:
        items = []
        while True:
            first = self.i
            node = self.unary()
            items.append((node, self.source(first, self.i - 1)))
            if self.peek().kind != "and":
                return items
            self.advance()

    def unary(self) -> _Node:
        token = self.peek()
        if token.kind == "not":
            self.advance()
            return _Not(self.unary())
        if token.kind == "(":
            self.advance()
            node = self.or_node()
            closing = self.peek()
            if closing.kind == "end":
                raise PolicyError(f"--accept: unmatched '(' {token.where}")
            if closing.kind != ")":
                raise self.fail("'and', 'or' or ')'")
            self.advance()
            return node
        return self.comparison()

    def operand(self, expected: str) -> _Token:
        token = self.peek()
        if token.kind == "name" and token.text not in POLICY_COLUMNS:
            raise PolicyError(
                f"--accept: unknown column {_quote(token.text)} {token.where} "
                f"(columns: {', '.join(POLICY_COLUMNS)})"
            )
        if token.kind not in ("name", "number"):
            raise self.fail(expected)
        return self.advance()

    def comparison(self) -> _Node:
        left = self.operand("a number, a column, 'not' or '('")
        if self.peek().kind != "op":
            raise self.fail("a comparison operator")
        compares = []
        while self.peek().kind == "op":
            op = self.advance().text
            right = self.operand("a number or a column")
            compares.append(self.pair(left, op, right))
            left = right
        return _and(compares)

    def pair(self, left: _Token, op: str, right: _Token) -> _Compare:
        if left.kind == right.kind:
            both = "numbers" if left.kind == "number" else "columns"
            text = " ".join(self.text[left.start : right.end].split())
            raise PolicyError(
                f"--accept: {_quote(text)} {left.where} compares two {both}; "
                f"compare a column with a number (e.g. {DEFAULT_POLICY})"
            )
        if left.kind == "name":
            return _Compare(left.text, op, _number(right.text))
        return _Compare(right.text, _MIRROR[op], _number(left.text))


def _and(nodes: Sequence[_Node]) -> _Node:
    return nodes[0] if len(nodes) == 1 else _And(tuple(nodes))


def _used_columns(node: _Node) -> list[str]:
    if isinstance(node, _Compare):
        return [node.column]
    if isinstance(node, _Not):
        return _used_columns(node.item)
    return [name for item in node.items for name in _used_columns(item)]


def _holds(
    node: _Node, values: Mapping[str, np.ndarray], missing: Mapping[str, np.ndarray], negate: bool
) -> np.ndarray:
    """Where `node` (negated when `negate`) holds. The negation is pushed down to the comparisons
    (De Morgan), so a missing value makes its comparison hold whether or not it sits under `not`."""
    if isinstance(node, _Compare):
        result = np.asarray(_COMPARE[node.op](values[node.column], node.number), dtype=bool)
        if negate:
            result = ~result
        return result | missing[node.column]
    if isinstance(node, _Not):
        return _holds(node.item, values, missing, not negate)
    results = [_holds(item, values, missing, negate) for item in node.items]
    # under a negation `and` becomes `or` and vice versa
    conjunction = isinstance(node, _And) != negate
    return np.logical_and.reduce(results) if conjunction else np.logical_or.reduce(results)


def _column_values(name: str, raw: Any) -> tuple[np.ndarray, np.ndarray]:
    """A column as a 1-d numeric array and where it is missing (NaN)."""
    values = np.asarray(raw)
    if values.dtype.kind == "O":  # e.g. a list holding None for a missing value
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise PolicyError(f"--accept: column {_quote(name)} is not numeric") from None
    if values.dtype.kind not in "biuf":
        raise PolicyError(f"--accept: column {_quote(name)} is not numeric (dtype {values.dtype})")
    if values.ndim != 1:
        raise PolicyError(
            f"--accept: column {_quote(name)} must hold one value per row, got shape {values.shape}"
        )
    missing = np.isnan(values) if values.dtype.kind == "f" else np.zeros(values.shape, dtype=bool)
    return values, missing


@dataclass(frozen=True)
class AcceptancePolicy:
    """A parsed --accept expression; make one with `AcceptancePolicy.parse`."""

    text: str  # the expression as given, stripped
    clauses: tuple[str, ...]  # the top-level `and` conjuncts' texts, whitespace-normalised
    columns: tuple[str, ...]  # the columns it uses, in order of first use
    _clause_nodes: tuple[_Node, ...] = field(repr=False, compare=False, default=())

    @classmethod
    def parse(cls, text: str) -> AcceptancePolicy:
        """Parse EXPR; a PolicyError names the bad token and its 1-based character position."""
        stripped = text.strip()
        if not stripped:
            raise PolicyError(f"--accept: the expression is empty; give one such as '{DEFAULT_POLICY}'")
        nodes, clauses = _Parser(stripped).parse()
        return cls(
            text=stripped,
            clauses=tuple(clauses),
            columns=tuple(dict.fromkeys(name for node in nodes for name in _used_columns(node))),
            _clause_nodes=tuple(nodes),
        )

    def judge(self, columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
        """Judge N rows given as column arrays (NaN for a missing value; extra columns are ignored).

        Returns `accepted` (bool, N) and `rejected_by`: per row the first clause that fails, None
        when accepted."""
        absent = [name for name in self.columns if name not in columns]
        if absent:
            raise PolicyError(
                f"--accept: the rows have no column {_quote(absent[0])} "
                f"(they have: {', '.join(map(str, columns)) or 'none'})"
            )
        values: dict[str, np.ndarray] = {}
        missing: dict[str, np.ndarray] = {}
        for name in self.columns:
            values[name], missing[name] = _column_values(name, columns[name])
        lengths = {name: len(array) for name, array in values.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the columns differ in length: {lengths}")
        holds = np.stack([_holds(node, values, missing, negate=False) for node in self._clause_nodes])
        accepted = holds.all(axis=0)
        first_failed = np.argmin(holds, axis=0)  # the first False along the clauses
        rejected_by = [
            None if ok else self.clauses[i] for ok, i in zip(accepted.tolist(), first_failed.tolist())
        ]
        return accepted, rejected_by


def _category_key(category: Any) -> tuple[tuple[int, Any], str]:
    """A category id as a JSON key ("3"; "null" when missing) and a sort key (numeric first)."""
    if category is None or (isinstance(category, (float, np.floating)) and math.isnan(category)):
        return (2, ""), "null"
    if isinstance(category, (int, np.integer, float, np.floating)) and float(category).is_integer():
        return (0, int(category)), str(int(category))  # 3.0 from a float column is category "3"
    return (1, str(category)), str(category)


def summary_counts(accepted: Any, rejected_by: Sequence[str | None], category_ids: Any) -> dict[str, Any]:
    """Counts of the policy's verdicts over judged rows, JSON-ready:
    {"accepted", "rejected", "rejected_by_clause": {clause: n}, "by_category": {id: {...}}}."""
    verdicts = np.asarray(accepted, dtype=bool).reshape(-1).tolist()
    categories = list(np.asarray(category_ids, dtype=object).reshape(-1))
    if not len(verdicts) == len(rejected_by) == len(categories):
        raise ValueError(
            f"accepted, rejected_by and category_ids differ in length: "
            f"{len(verdicts)}, {len(rejected_by)}, {len(categories)}"
        )
    by_clause = Counter(clause for ok, clause in zip(verdicts, rejected_by) if not ok and clause is not None)
    by_category: dict[tuple[tuple[int, Any], str], dict[str, int]] = {}
    for ok, category in zip(verdicts, categories):
        counts = by_category.setdefault(_category_key(category), {"accepted": 0, "rejected": 0})
        counts["accepted" if ok else "rejected"] += 1
    n_accepted = sum(verdicts)
    return {
        "accepted": int(n_accepted),
        "rejected": len(verdicts) - int(n_accepted),
        # most frequent first: the clause that rejects most is what a user looks at
        "rejected_by_clause": {
            clause: int(n) for clause, n in sorted(by_clause.items(), key=lambda kv: (-kv[1], kv[0]))
        },
        "by_category": {key: counts for (_, key), counts in sorted(by_category.items())},
    }
