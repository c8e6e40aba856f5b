"""The --accept policy (hqsam_core/acceptance.py): its grammar, its verdicts against plain numpy, the
missing-value rule, rejected_by, the default, the summary counts and every error message."""

from __future__ import annotations

import json
import pickle
import textwrap

import numpy as np
import pytest

from hqsam.hqsam_core.acceptance import (
    DEFAULT_POLICY,
    HELP,
    POLICY_COLUMNS,
    AcceptancePolicy,
    PolicyError,
    summary_counts,
)
from hqsam.hqsam_core.errors import HqsamError

N = 400


@pytest.fixture
def rows() -> dict[str, np.ndarray]:
    """Random rows with the real columns' dtypes; scores on a 0.1 grid so `==` and ties happen."""
    rng = np.random.default_rng(0)
    return {
        "score": (rng.integers(0, 11, N) / 10).astype(np.float32),
        "stability": (rng.integers(0, 11, N) / 10).astype(np.float32),
        "sam_hq_iou": rng.random(N).astype(np.float32),
        "iou_vs_original": rng.random(N).astype(np.float32),
        "boundary_iou_vs_original": rng.random(N).astype(np.float32),
        "area": rng.integers(0, 200, N),
        "category_id": rng.integers(1, 4, N),
    }


def accepted(expr: str, rows: dict[str, np.ndarray]) -> np.ndarray:
    verdict, _ = AcceptancePolicy.parse(expr).judge(rows)
    assert verdict.dtype == bool and verdict.shape == (N,)
    return verdict


# The expectation of each operator, written with numpy's own comparisons.
OPERATORS = {
    "<": (lambda x, v: x < v),
    "<=": (lambda x, v: x <= v),
    ">": (lambda x, v: x > v),
    ">=": (lambda x, v: x >= v),
    "==": (lambda x, v: x == v),
    "!=": (lambda x, v: x != v),
}


@pytest.mark.parametrize("op", list(OPERATORS))
@pytest.mark.parametrize(("column", "number"), [("score", 0.5), ("stability", 0.3), ("area", 100)])
def test_each_operator_matches_numpy(rows, op: str, column: str, number: float) -> None:
    x = rows[column]
    expected = OPERATORS[op](x, number)
    assert 0 < expected.sum() < N  # the data exercises both outcomes
    np.testing.assert_array_equal(accepted(f"{column} {op} {number}", rows), expected)
    # spaces are optional
    np.testing.assert_array_equal(accepted(f"{column}{op}{number}", rows), expected)


@pytest.mark.parametrize("op", list(OPERATORS))
def test_number_on_the_left_matches_numpy(rows, op: str) -> None:
    x = rows["stability"]
    np.testing.assert_array_equal(accepted(f"0.7 {op} stability", rows), OPERATORS[op](0.7, x))


def test_number_on_the_left_example(rows) -> None:
    np.testing.assert_array_equal(accepted("0.9 <= stability", rows), 0.9 <= rows["stability"])


def test_or_binds_looser_than_and(rows) -> None:
    a, b, c = rows["score"] > 0.5, rows["stability"] > 0.5, rows["area"] > 100
    got = accepted("score > 0.5 or stability > 0.5 and area > 100", rows)
    np.testing.assert_array_equal(got, a | (b & c))
    assert not np.array_equal(got, (a | b) & c)  # the data tells the two readings apart


def test_not_binds_tighter_than_and_and_or(rows) -> None:
    a, b = rows["score"] > 0.5, rows["stability"] > 0.5
    np.testing.assert_array_equal(accepted("not score > 0.5 and stability > 0.5", rows), ~a & b)
    np.testing.assert_array_equal(accepted("not score > 0.5 or stability > 0.5", rows), ~a | b)
    np.testing.assert_array_equal(accepted("not not score > 0.5", rows), a)
    np.testing.assert_array_equal(accepted("not (score > 0.5 and stability > 0.5)", rows), ~(a & b))


def test_parentheses_override_precedence(rows) -> None:
    a, b, c = rows["score"] > 0.5, rows["stability"] > 0.5, rows["area"] > 100
    got = accepted("(score > 0.5 or stability > 0.5) and area > 100", rows)
    np.testing.assert_array_equal(got, (a | b) & c)
    np.testing.assert_array_equal(
        accepted("((score > 0.5)) or ((stability > 0.5) and (area > 100))", rows), a | (b & c)
    )


def test_chained_comparisons(rows) -> None:
    x = rows["iou_vs_original"]
    np.testing.assert_array_equal(accepted("0.5 <= iou_vs_original < 0.98", rows), (0.5 <= x) & (x < 0.98))
    np.testing.assert_array_equal(accepted("0.9 > iou_vs_original >= 0.2", rows), (0.9 > x) & (x >= 0.2))
    a = rows["area"]
    np.testing.assert_array_equal(
        accepted("10 < area <= 150 and area != 100", rows), (10 < a) & (a <= 150) & (a != 100)
    )
    np.testing.assert_array_equal(
        accepted("not 0.5 <= iou_vs_original < 0.98", rows), ~((0.5 <= x) & (x < 0.98))
    )


def test_keywords_are_case_insensitive(rows) -> None:
    a, b, c = rows["score"] > 0.5, rows["stability"] > 0.5, rows["area"] > 100
    np.testing.assert_array_equal(
        accepted("score > 0.5 AND NOT stability > 0.5 Or area > 100", rows), (a & ~b) | c
    )


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("100", 100),
        ("+100", 100),
        ("100.", 100.0),
        ("99.5", 99.5),
        (".5e2", 50.0),
        ("1E2", 100.0),
        ("1e+2", 100.0),
    ],
)
def test_number_forms(rows, literal: str, value: float) -> None:
    np.testing.assert_array_equal(accepted(f"area >= {literal}", rows), rows["area"] >= value)


def test_negative_numbers_and_exponents(rows) -> None:
    x = rows["score"] - 0.5  # a column with negative values
    cols = {**rows, "score": x}
    np.testing.assert_array_equal(accepted("score > -0.25", cols), x > -0.25)
    np.testing.assert_array_equal(accepted("score > -2.5e-1", cols), x > -0.25)


def test_missing_values_hold() -> None:
    # rows without an original mask have no iou_vs_original: there is nothing to keep
    iou = np.array([0.9, np.nan, 0.2, np.nan, 0.6], dtype=np.float32)
    score = np.array([0.9, 0.9, 0.9, 0.1, 0.1], dtype=np.float32)
    cols = {"iou_vs_original": iou, "score": score, "boundary_iou_vs_original": np.full(5, np.nan)}
    missing = np.isnan(iou)

    def judged(expr: str) -> np.ndarray:
        return AcceptancePolicy.parse(expr).judge(cols)[0]

    np.testing.assert_array_equal(judged("iou_vs_original >= 0.5"), missing | (iou >= 0.5))
    np.testing.assert_array_equal(
        judged("0.5 <= iou_vs_original < 0.98"), missing | ((0.5 <= iou) & (iou < 0.98))
    )
    # under `not` too: a missing value never rejects a row by itself
    np.testing.assert_array_equal(judged("not iou_vs_original < 0.5"), judged("iou_vs_original >= 0.5"))
    np.testing.assert_array_equal(
        judged("not (iou_vs_original < 0.5 or iou_vs_original > 2)"), missing | (iou >= 0.5)
    )
    # the other columns still judge the row
    both = judged("iou_vs_original >= 0.5 and score > 0.5")
    np.testing.assert_array_equal(both, (missing | (iou >= 0.5)) & (score > 0.5))
    assert both.tolist() == [True, True, False, False, False]
    assert judged("boundary_iou_vs_original > 0.99").all()
    # None in a plain list is a missing value as well
    verdict, rejected_by = AcceptancePolicy.parse("iou_vs_original >= 0.5").judge(
        {"iou_vs_original": [0.7, None, 0.1]}
    )
    assert verdict.tolist() == [True, True, False]
    assert rejected_by == [None, None, "iou_vs_original >= 0.5"]


def test_rejected_by_names_the_first_failing_clause(rows) -> None:
    policy = AcceptancePolicy.parse(
        "score >= 0.5 and (stability > 0.8 or area > 150) and not category_id == 2"
    )
    assert policy.clauses == ("score >= 0.5", "(stability > 0.8 or area > 150)", "not category_id == 2")
    verdict, rejected_by = policy.judge(rows)
    holds = [
        rows["score"] >= 0.5,
        (rows["stability"] > 0.8) | (rows["area"] > 150),
        ~(rows["category_id"] == 2),
    ]
    np.testing.assert_array_equal(verdict, holds[0] & holds[1] & holds[2])
    expected = [
        next((clause for clause, h in zip(policy.clauses, holds) if not h[i]), None) for i in range(N)
    ]
    assert rejected_by == expected
    assert {clause for clause in rejected_by if clause} == set(policy.clauses)  # every clause rejects some


def test_rejected_by_by_hand() -> None:
    policy = AcceptancePolicy.parse("score > 0.5 and stability > 0.5 and area > 100")
    cols = {
        "score": np.array([0.9, 0.1, 0.9, 0.1, 0.9]),
        "stability": np.array([0.9, 0.9, 0.1, 0.1, 0.9]),
        "area": np.array([500, 50, 500, 50, 50]),
    }
    verdict, rejected_by = policy.judge(cols)
    assert verdict.tolist() == [True, False, False, False, False]
    assert rejected_by == [None, "score > 0.5", "stability > 0.5", "score > 0.5", "area > 100"]


def test_text_clauses_and_columns() -> None:
    policy = AcceptancePolicy.parse("  score>0.5   and\t(stability > 0.5 or   area>1)  and 0.1 < score ")
    assert policy.text == "score>0.5   and\t(stability > 0.5 or   area>1)  and 0.1 < score"
    assert policy.clauses == ("score>0.5", "(stability > 0.5 or area>1)", "0.1 < score")
    assert policy.columns == ("score", "stability", "area")
    # a top level that is not an `and` is one clause
    assert AcceptancePolicy.parse("score > 1 or  area < 3 and score < 2").clauses == (
        "score > 1 or area < 3 and score < 2",
    )
    assert AcceptancePolicy.parse("(score > 1 and area < 3)").clauses == ("(score > 1 and area < 3)",)
    assert AcceptancePolicy.parse("0.5 <= iou_vs_original < 0.98").clauses == (
        "0.5 <= iou_vs_original < 0.98",
    )


def test_policy_is_frozen_and_pickles() -> None:
    # it travels to the refine workers
    policy = AcceptancePolicy.parse("score > 0.5 and not area < 10")
    copy = pickle.loads(pickle.dumps(policy))
    assert copy == policy
    cols = {"score": np.array([0.9, 0.9, 0.1]), "area": np.array([20, 5, 20])}
    assert copy.judge(cols)[0].tolist() == policy.judge(cols)[0].tolist() == [True, False, False]
    with pytest.raises(AttributeError):
        policy.text = "area > 0"  # type: ignore[misc]


def test_default_policy() -> None:
    assert DEFAULT_POLICY == "iou_vs_original >= 0.5"
    policy = AcceptancePolicy.parse(DEFAULT_POLICY)
    assert policy.clauses == (DEFAULT_POLICY,)
    assert policy.columns == ("iou_vs_original",)
    # the same object, refined; borderline; a neighbour or a fragment; another object; no original mask
    iou = np.array([0.93, 0.5, 0.3, 0.0, np.nan], dtype=np.float32)
    verdict, rejected_by = policy.judge({"iou_vs_original": iou, "score": np.ones(5)})
    assert verdict.tolist() == [True, True, False, False, True]
    assert rejected_by == [None, None, DEFAULT_POLICY, DEFAULT_POLICY, None]


def test_no_rows() -> None:
    verdict, rejected_by = AcceptancePolicy.parse("score > 0.5 and area > 1").judge(
        {"score": np.zeros(0, np.float32), "area": np.zeros(0, np.int64)}
    )
    assert verdict.shape == (0,) and verdict.dtype == bool and rejected_by == []


def test_summary_counts_by_hand() -> None:
    verdict = np.array([True, False, False, True, False, True])
    rejected_by = [None, "score > 0.5", "area > 100", None, "score > 0.5", None]
    categories = np.array([3, 1, 3, 3, 1, 12])
    counts = summary_counts(verdict, rejected_by, categories)
    assert counts == {
        "accepted": 3,
        "rejected": 3,
        "rejected_by_clause": {"score > 0.5": 2, "area > 100": 1},
        "by_category": {
            "1": {"accepted": 0, "rejected": 2},
            "3": {"accepted": 2, "rejected": 1},
            "12": {"accepted": 1, "rejected": 0},
        },
    }
    assert list(counts["by_category"]) == ["1", "3", "12"]  # numeric order
    assert json.loads(json.dumps(counts)) == counts
    # category ids read back as floats with NaN for null (pandas), or None
    counts = summary_counts([True, False, True], [None, "x > 1", None], [3.0, np.nan, None])
    assert counts["by_category"] == {
        "3": {"accepted": 1, "rejected": 0},
        "null": {"accepted": 1, "rejected": 1},
    }
    assert summary_counts(np.zeros(0, bool), [], []) == {
        "accepted": 0,
        "rejected": 0,
        "rejected_by_clause": {},
        "by_category": {},
    }


def test_summary_counts_of_a_judgement(rows) -> None:
    policy = AcceptancePolicy.parse("score >= 0.5 and area > 50")
    verdict, rejected_by = policy.judge(rows)
    counts = summary_counts(verdict, rejected_by, rows["category_id"])
    assert counts["accepted"] == int(((rows["score"] >= 0.5) & (rows["area"] > 50)).sum())
    assert counts["accepted"] + counts["rejected"] == N
    assert counts["rejected_by_clause"] == {
        "score >= 0.5": int((rows["score"] < 0.5).sum()),
        "area > 50": int(((rows["score"] >= 0.5) & (rows["area"] <= 50)).sum()),
    }
    for category, by in counts["by_category"].items():
        in_category = rows["category_id"] == int(category)
        assert by == {
            "accepted": int(verdict[in_category].sum()),
            "rejected": int((~verdict[in_category]).sum()),
        }


COLUMN_LIST = ", ".join(POLICY_COLUMNS)

BAD_EXPRESSIONS = [
    ("stabilty > 0.9", f"--accept: unknown column 'stabilty' at character 1 (columns: {COLUMN_LIST})"),
    (
        "score > 0.5 and Score < 0.9",
        f"--accept: unknown column 'Score' at character 17 (columns: {COLUMN_LIST})",
    ),
    (
        "stability is 0.5",
        "--accept: expected a comparison operator after 'stability' at character 11, got 'is'",
    ),
    ("score", "--accept: unexpected end of expression after 'score' (expected a comparison operator)"),
    (
        "score > 0.5 and",
        "--accept: unexpected end of expression after 'and' (expected a number, a column, 'not' or '(')",
    ),
    ("not", "--accept: unexpected end of expression after 'not' (expected a number, a column, 'not' or '(')"),
    ("score >", "--accept: unexpected end of expression after '>' (expected a number or a column)"),
    ("(score > 0.5", "--accept: unmatched '(' at character 1"),
    ("area > 1 and ((score > 0.5)", "--accept: unmatched '(' at character 14"),
    ("score > 0.5)", "--accept: unmatched ')' at character 12"),
    ("score >= == 0.5", "--accept: expected a number or a column after '>=' at character 10, got '=='"),
    ("== 0.5", "--accept: expected a number, a column, 'not' or '(' at character 1, got '=='"),
    ("score > and", "--accept: expected a number or a column after '>' at character 9, got 'and'"),
    ("()", "--accept: expected a number, a column, 'not' or '(' after '(' at character 2, got ')'"),
    ("", "--accept: the expression is empty; give one such as 'iou_vs_original >= 0.5'"),
    ("   ", "--accept: the expression is empty; give one such as 'iou_vs_original >= 0.5'"),
    (
        "0.1 < 0.5",
        "--accept: '0.1 < 0.5' at character 1 compares two numbers; "
        "compare a column with a number (e.g. iou_vs_original >= 0.5)",
    ),
    (
        "area > 1 and score < stability",
        "--accept: 'score < stability' at character 14 compares two columns; "
        "compare a column with a number (e.g. iou_vs_original >= 0.5)",
    ),
    (
        "0.1 < score < stability",
        "--accept: 'score < stability' at character 7 compares two columns; "
        "compare a column with a number (e.g. iou_vs_original >= 0.5)",
    ),
    (
        # each link of a chain pairs a column with a number
        "10 < area <= 150 != 150",
        "--accept: '150 != 150' at character 14 compares two numbers; "
        "compare a column with a number (e.g. iou_vs_original >= 0.5)",
    ),
    (
        "score > 0.5 stability > 0.5",
        "--accept: expected 'and', 'or' or the end of the expression after '0.5' at character 13, got 'stability'",
    ),
    (
        "(score > 0.5 area > 1)",
        "--accept: expected 'and', 'or' or ')' after '0.5' at character 14, got 'area'",
    ),
    ("score = 0.5", "--accept: unexpected character '=' at character 7 (write '==' to test equality)"),
    ("score > 0.5 && area > 1", "--accept: unexpected character '&' at character 13"),
    ("score > - 1", "--accept: unexpected character '-' at character 9"),
    ("score ≥ 0.5", "--accept: unexpected character '≥' at character 7"),
    ("score > 5x", "--accept: malformed number '5x' at character 9"),
    ("score > 1e", "--accept: malformed number '1e' at character 9"),
    ("score > 0.5.3", "--accept: malformed number '0.5.3' at character 9"),
    ("score > 1e999", "--accept: number '1e999' at character 9 is too large"),
    # not Python: nothing is ever evaluated
    ("__import__('os').system('true')", '--accept: unexpected character "\'" at character 12'),
    ("score.real > 1", "--accept: unexpected character '.' at character 6"),
]


@pytest.mark.parametrize(
    ("expr", "message"), BAD_EXPRESSIONS, ids=[expr or "empty" for expr, _ in BAD_EXPRESSIONS]
)
def test_bad_expressions_name_the_token_and_where(expr: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        AcceptancePolicy.parse(expr)
    assert str(caught.value) == message
    assert isinstance(caught.value, HqsamError) and caught.value.exit_code == 2
    assert "\n" not in str(caught.value)


def test_position_counts_from_the_stripped_expression() -> None:
    with pytest.raises(PolicyError, match="unknown column 'stabilty' at character 1 "):
        AcceptancePolicy.parse("   stabilty > 1")


def test_judge_errors() -> None:
    policy = AcceptancePolicy.parse("score > 0.5 and stability > 0.5")
    with pytest.raises(PolicyError) as caught:
        policy.judge({"score": np.ones(3), "area": np.ones(3)})
    assert str(caught.value) == "--accept: the rows have no column 'stability' (they have: score, area)"
    with pytest.raises(PolicyError) as caught:
        policy.judge({"score": np.ones(3), "stability": np.array(["a", "b", "c"])})
    assert str(caught.value) == "--accept: column 'stability' is not numeric (dtype <U1)"
    with pytest.raises(PolicyError, match="one value per row"):
        policy.judge({"score": np.ones((3, 2)), "stability": np.ones(3)})


def test_help_is_short_and_complete() -> None:
    assert len(textwrap.wrap(HELP, 90)) <= 6
    assert "\n" not in HELP
    for name in POLICY_COLUMNS:
        assert name in HELP
    assert DEFAULT_POLICY in HELP and "missing" in HELP and "not" in HELP
    assert all(meaning and "\n" not in meaning for meaning in POLICY_COLUMNS.values())
    # every column the policy may use is a column of the refined rows
    from hqsam.schemas.refined import REFINED_ANNOTATION

    assert set(POLICY_COLUMNS) <= set(REFINED_ANNOTATION.names)
