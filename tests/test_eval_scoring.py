"""Scorers and metrics by themselves: hand-checked cases, no model."""

import math

import pytest

from dgbatch.config import ConfigError, EvalSection
from dgbatch.eval import scorers
from dgbatch.eval.metrics import Metrics, Sample, majority, pass_at_k


def score(out, ref, **cfg):
    return scorers.build(EvalSection(**cfg))(out, ref, {})


def test_builtin_scorers_compare_what_they_say():
    assert score("  Hello   World\n", "hello world") == (1.0, "hello world")
    assert score("Hello World", "hello world", ignore_case=False) == (0.0, "Hello World")
    assert score("Hello  World", "Hello World", normalize_whitespace=False)[0] == 0.0
    assert score("the answer is Paris.", "paris", scorer="contains")[0] == 1.0
    assert score("Answer: B) blue", "b", scorer="regex", regex=r"Answer: (\w)\)") == (1.0, "B")
    assert score("no answer here", "b", scorer="regex", regex=r"Answer: (\w)") == (0.0, None)
    assert score("so 3 + 4 = 1,234.50 total", "1234.5", scorer="numeric") == (1.0, "1,234.50")
    assert score("about 3.1416", 3.14159, scorer="numeric", tolerance=1e-3)[0] == 1.0
    assert score("about 3.15", 3.14159, scorer="numeric", tolerance=1e-3)[0] == 0.0
    assert score("#### 42 and then 7", "42", scorer="numeric", regex=r"#### (\S+)") == (1.0, "42")
    with pytest.raises(scorers.ScoreError, match="reference is null"):
        score("x", None)
    with pytest.raises(scorers.ScoreError, match="holds no number"):
        score("3", "three", scorer="numeric")


def test_a_user_scorer_is_imported_from_the_working_directory(tmp_path):
    (tmp_path / "my_scorers_x1.py").write_text(
        "def overlap(output, reference, row):\n"
        "    a, b = set(output.split()), set(reference.split())\n"
        "    return len(a & b) / len(b), ' '.join(sorted(a & b))\n"
        "def broken(output, reference, row):\n"
        "    raise KeyError(row['missing'])\n")
    fn = scorers.build(EvalSection(scorer="my_scorers_x1:overlap"), str(tmp_path))
    assert fn("a b c", "b c d e", {}) == (0.5, "b c")
    with pytest.raises(scorers.ScoreError, match="my_scorers_x1:broken raised KeyError"):
        scorers.build(EvalSection(scorer="my_scorers_x1:broken"), str(tmp_path))("x", "y", {})
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_x1' from the working directory"):
        scorers.build(EvalSection(scorer="no_such_module_x1:f"), str(tmp_path))
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        scorers.build(EvalSection(scorer="my_scorers_x1:nope"), str(tmp_path))


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5) and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)


def test_majority_vote_takes_the_most_common_answer_and_the_first_on_a_tie():
    assert majority(["x", "y", "x", "y"], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert majority(["y", "x", "x"], [0.0, 1.0, 1.0]) == 1.0
    assert majority([None, None, "b"], [1.0, 1.0, 0.0]) == 0.0  # no answer does not outvote an answer


def sample(score, answer="a", error=False):
    return Sample(score, answer, error, None if error else 2.0, 0 if error else 3)


def test_pass_at_k_and_maj_at_k_on_a_hand_checked_case():
    m = Metrics(num_samples=4, pass_k=[1, 2, 4])
    m.add_prompt([sample(1, "x"), sample(0, "y"), sample(1, "x"), sample(0, "y")])  # 2 of 4 pass, tie x/y -> x
    m.add_prompt([sample(0, "a"), sample(0, "a"), sample(0, "b"), sample(0, None)])  # none pass
    m.add_prompt([sample(1, "z")] * 4)  # all pass
    m.add_prompt([sample(1, "q"), sample(0, "r"), sample(0, "r"), sample(None, error=True)])  # 3 scored: no pass@4
    d = m.to_dict()
    assert d["rows"] == 16 and d["error_rows"] == 1 and d["n"] == 15 and d["n_prompts"] == 4
    assert d["accuracy"] == pytest.approx(7 / 15) and d["accuracy_all_rows"] == pytest.approx(7 / 16)
    assert d["pass@1"] == pytest.approx((2 / 4 + 0 + 1 + 1 / 3) / 4)
    assert d["pass@2"] == pytest.approx((5 / 6 + 0 + 1 + (1 - math.comb(2, 2) / math.comb(3, 2))) / 4)
    assert d["pass@4"] == pytest.approx((1 + 0 + 1) / 3)  # the prompt with 3 scored samples is left out
    values = [1.0, 0.0, 1.0]
    mean = sum(values) / 3
    assert d["pass@4_stderr"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2 / 3))
    assert d["maj@4"] == pytest.approx((1 + 0 + 1 + 0) / 4)  # the last prompt's majority is "r", scored 0
    # the accuracy's standard error is over prompts' mean scores (samples of a prompt are not independent)
    means = [0.5, 0.0, 1.0, 1 / 3]
    mu = sum(means) / 4
    assert d["accuracy_stderr"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in means) / 3 / 4))
    assert d["tokens_per_forward"]["mean"] == 2.0 and d["decoder_forwards"]["total"] == 45


def test_one_sample_per_prompt_reports_lm_evals_mean_stderr():
    m = Metrics(num_samples=1, pass_k=[1])
    scores = [1, 0, 1, 1, 0, 1, 1, 1]
    for s in scores:
        m.add_prompt([sample(float(s))])
    d = m.to_dict()
    mu = sum(scores) / len(scores)
    assert d["accuracy"] == mu and "pass@1" not in d
    assert d["accuracy_stderr"] == pytest.approx(math.sqrt(sum((s - mu) ** 2 for s in scores) / 7) / math.sqrt(8))
