//! Countdown: reach a target with given numbers and `+ - * /`.
//!
//! The expression is parsed by a small recursive-descent parser (no `eval`): non-negative integer
//! literals, `+ - * /` (also spelled `×`, `÷`, `\times`, `\cdot`, `\div`, `−`), parentheses, whitespace. Arithmetic is exact
//! (rationals over `i128`, checked for overflow). Unary minus is rejected (every number must be one
//! of the given ones), as are division by zero, nesting deeper than 64 and expressions longer than
//! 1,000 characters.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::extract::{last_boxed, last_tagged};
use super::{Reward, RewardError, RewardFn};
use crate::error::{Error, Result};
use crate::sample::{Completion, Sample};

/// Why a Countdown answer is rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CountdownError {
    /// No `<answer>…</answer>` or `\boxed{}` in the completion.
    NoAnswer,
    /// The expression does not parse (with the byte offset).
    Syntax(usize),
    /// Nesting deeper than the limit, or an expression that is too long.
    TooComplex,
    /// A division by zero.
    DivisionByZero,
    /// An intermediate value overflows `i128`.
    Overflow,
    /// A number that is not among the given ones (or is used more often than given).
    UnknownNumber(i128),
    /// Not every given number is used (when all are required).
    UnusedNumbers,
    /// The sample does not say which numbers and target to use.
    BadGroundTruth,
}

impl fmt::Display for CountdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountdownError::NoAnswer => write!(f, "no answer found"),
            CountdownError::Syntax(at) => write!(f, "syntax error at byte {at}"),
            CountdownError::TooComplex => write!(f, "expression too long or too deeply nested"),
            CountdownError::DivisionByZero => write!(f, "division by zero"),
            CountdownError::Overflow => write!(f, "arithmetic overflow"),
            CountdownError::UnknownNumber(n) => {
                write!(f, "number {n} is not available (or used too often)")
            }
            CountdownError::UnusedNumbers => write!(f, "not all numbers are used"),
            CountdownError::BadGroundTruth => write!(f, "sample has no numbers/target"),
        }
    }
}

impl std::error::Error for CountdownError {}

/// A successfully evaluated Countdown expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountdownEval {
    /// The value as a reduced fraction `(numerator, denominator)`, denominator > 0.
    pub value: (i128, i128),
    /// The number literals in order of appearance.
    pub numbers_used: Vec<i128>,
}

impl CountdownEval {
    /// Whether the value equals the integer `target`.
    pub fn equals(&self, target: i128) -> bool {
        self.value == (target, 1)
    }
}

/// Parses and evaluates `expression`, checking that its numbers are drawn from `available` (each
/// at most as often as given; all of them if `require_all`).
///
/// ```
/// use rlrun_rollout::reward::{evaluate_countdown, CountdownError};
/// let ok = evaluate_countdown("(6 - 2) * 8 / 4", &[2, 4, 6, 8], true).unwrap();
/// assert!(ok.equals(8));
/// assert_eq!(evaluate_countdown("6 * 6", &[6, 2], false), Err(CountdownError::UnknownNumber(6)));
/// assert_eq!(evaluate_countdown("6 / (2 - 2)", &[6, 2, 2], true), Err(CountdownError::DivisionByZero));
/// ```
pub fn evaluate_countdown(
    expression: &str,
    available: &[i128],
    require_all: bool,
) -> std::result::Result<CountdownEval, CountdownError> {
    let (value, parser) = parse_arithmetic(expression)?;
    let mut pool: Vec<i128> = available.to_vec();
    for &n in &parser.numbers {
        match pool.iter().position(|&m| m == n) {
            Some(j) => {
                pool.swap_remove(j);
            }
            None => return Err(CountdownError::UnknownNumber(n)),
        }
    }
    if require_all && !pool.is_empty() {
        return Err(CountdownError::UnusedNumbers);
    }
    Ok(CountdownEval {
        value: (value.n, value.d),
        numbers_used: parser.numbers,
    })
}

/// The exact value `(numerator, denominator > 0)` of an arithmetic expression of integers with
/// `+ - * /` and parentheses (the calculator tool of multi-turn environments). No code runs.
pub fn evaluate_arithmetic(expression: &str) -> std::result::Result<(i128, i128), CountdownError> {
    parse_arithmetic(expression).map(|(v, _)| (v.n, v.d))
}

fn parse_arithmetic(
    expression: &str,
) -> std::result::Result<(Rational, Parser<'_>), CountdownError> {
    if expression.len() > 1000 {
        return Err(CountdownError::TooComplex);
    }
    let mut parser = Parser {
        s: expression.as_bytes(),
        i: 0,
        depth: 0,
        numbers: Vec::new(),
    };
    let value = parser.expr()?;
    parser.skip_ws();
    if parser.i != parser.s.len() {
        return Err(CountdownError::Syntax(parser.i));
    }
    Ok((value, parser))
}

#[derive(Clone, Copy, Debug)]
struct Rational {
    n: i128,
    d: i128, // > 0, gcd(n, d) == 1
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    fn int(n: i128) -> Self {
        Self { n, d: 1 }
    }

    fn new(n: i128, d: i128) -> std::result::Result<Self, CountdownError> {
        if d == 0 {
            return Err(CountdownError::DivisionByZero);
        }
        let g = gcd(n, d).max(1);
        let (mut n, mut d) = (n / g, d / g);
        if d < 0 {
            n = n.checked_neg().ok_or(CountdownError::Overflow)?;
            d = d.checked_neg().ok_or(CountdownError::Overflow)?;
        }
        Ok(Self { n, d })
    }

    fn add(self, o: Self, sign: i128) -> std::result::Result<Self, CountdownError> {
        let of = CountdownError::Overflow;
        let left = self.n.checked_mul(o.d).ok_or(of.clone())?;
        let right =
            o.n.checked_mul(self.d)
                .and_then(|x| x.checked_mul(sign))
                .ok_or(of.clone())?;
        let n = left.checked_add(right).ok_or(of.clone())?;
        let d = self.d.checked_mul(o.d).ok_or(of)?;
        Self::new(n, d)
    }

    fn mul(self, o: Self) -> std::result::Result<Self, CountdownError> {
        let n = self.n.checked_mul(o.n).ok_or(CountdownError::Overflow)?;
        let d = self.d.checked_mul(o.d).ok_or(CountdownError::Overflow)?;
        Self::new(n, d)
    }

    fn div(self, o: Self) -> std::result::Result<Self, CountdownError> {
        if o.n == 0 {
            return Err(CountdownError::DivisionByZero);
        }
        self.mul(Self { n: o.d, d: o.n })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
    numbers: Vec<i128>,
}

impl Parser<'_> {
    const MAX_DEPTH: usize = 64;

    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// Consumes one of the operator spellings; returns the canonical ASCII operator.
    fn operator(&mut self, ops: &[(&str, u8)]) -> Option<u8> {
        self.skip_ws();
        for &(spelling, op) in ops {
            if self.s[self.i..].starts_with(spelling.as_bytes()) {
                self.i += spelling.len();
                return Some(op);
            }
        }
        None
    }

    fn expr(&mut self) -> std::result::Result<Rational, CountdownError> {
        let mut v = self.term()?;
        while let Some(op) = self.operator(&[("+", b'+'), ("-", b'-'), ("−", b'-')]) {
            let t = self.term()?;
            v = v.add(t, if op == b'+' { 1 } else { -1 })?;
        }
        Ok(v)
    }

    fn term(&mut self) -> std::result::Result<Rational, CountdownError> {
        let mut v = self.factor()?;
        while let Some(op) = self.operator(&[
            ("*", b'*'),
            ("×", b'*'),
            ("\\times", b'*'),
            ("\\cdot", b'*'),
            ("/", b'/'),
            ("÷", b'/'),
            ("\\div", b'/'),
        ]) {
            let f = self.factor()?;
            v = if op == b'*' { v.mul(f)? } else { v.div(f)? };
        }
        Ok(v)
    }

    fn factor(&mut self) -> std::result::Result<Rational, CountdownError> {
        self.skip_ws();
        match self.s.get(self.i) {
            Some(b'(') => {
                self.depth += 1;
                if self.depth > Self::MAX_DEPTH {
                    return Err(CountdownError::TooComplex);
                }
                self.i += 1;
                let v = self.expr()?;
                self.skip_ws();
                if self.s.get(self.i) != Some(&b')') {
                    return Err(CountdownError::Syntax(self.i));
                }
                self.i += 1;
                self.depth -= 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i])
                    .map_err(|_| CountdownError::Syntax(start))?;
                let n: i128 = text.parse().map_err(|_| CountdownError::Overflow)?;
                self.numbers.push(n);
                Ok(Rational::int(n))
            }
            _ => Err(CountdownError::Syntax(self.i)),
        }
    }
}

/// Parameters of [`CountdownReward`] (`name = "countdown"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountdownConfig {
    /// Reward for an expression that parses and uses valid numbers but misses the target
    /// (TinyZero uses 0.1; default 0).
    #[serde(default)]
    pub format_score: f32,
    /// Whether every given number must be used exactly once (default `true`, as in the
    /// generated task's prompt). When `false`, each may be used at most once.
    #[serde(default = "yes")]
    pub require_all_numbers: bool,
}

fn yes() -> bool {
    true
}

impl Default for CountdownConfig {
    fn default() -> Self {
        Self {
            format_score: 0.0,
            require_all_numbers: true,
        }
    }
}

/// 1 if the completion's final expression uses the given numbers and equals the target.
///
/// The expression is the content of the last `<answer>…</answer>`, else of the last `\boxed{}`;
/// an `= N` part is dropped (the longest side of `=` is evaluated). The numbers and target come from
/// the sample: `extra.numbers` (array of integers) and the ground truth (the target, an integer),
/// or a ground truth that is a JSON object `{"target": T, "numbers": [...]}` (verl/TinyZero
/// layout).
///
/// Metrics: `has_answer`, `valid_expression` (parses, uses allowed numbers), `correct`, and
/// `bad_ground_truth`.
#[derive(Clone, Debug)]
pub struct CountdownReward {
    config: CountdownConfig,
}

impl CountdownReward {
    /// The Countdown reward.
    pub fn new(config: CountdownConfig) -> Result<Self> {
        if !config.format_score.is_finite() {
            return Err(Error::Config {
                what: "reward `countdown`".into(),
                message: "format_score must be finite".into(),
            });
        }
        Ok(Self { config })
    }
}

fn json_ints(v: &serde_json::Value) -> Option<Vec<i128>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_i64().map(i128::from))
        .collect()
}

fn json_int(v: &serde_json::Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The (numbers, target) of a Countdown sample.
pub(crate) fn countdown_problem(sample: &Sample) -> Option<(Vec<i128>, i128)> {
    let gt = sample.ground_truth.as_deref()?.trim();
    if gt.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(gt).ok()?;
        return Some((json_ints(v.get("numbers")?)?, json_int(v.get("target")?)?));
    }
    let target: i128 = gt.parse().ok()?;
    let numbers = json_ints(sample.extra.get("numbers")?)?;
    Some((numbers, target))
}

impl RewardFn for CountdownReward {
    fn name(&self) -> &str {
        "countdown"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(sample, completion))
    }
}

impl CountdownReward {
    /// The reward of one completion (never fails).
    fn reward_for(&self, sample: &Sample, completion: &Completion<'_>) -> Reward {
        let mut reward = Reward::new(0.0);
        let Some((numbers, target)) = countdown_problem(sample) else {
            return reward
                .with_metric("bad_ground_truth", 1.0)
                .with_metric("correct", 0.0);
        };
        let answer = last_tagged(completion.text, "answer").or_else(|| last_boxed(completion.text));
        reward = reward.with_metric("has_answer", f32::from(u8::from(answer.is_some())));
        let Some(answer) = answer else {
            return reward
                .with_metric("valid_expression", 0.0)
                .with_metric("correct", 0.0);
        };
        let expression = answer
            .split('=')
            .max_by_key(|side| side.trim().len())
            .unwrap_or(answer);
        let eval = evaluate_countdown(expression, &numbers, self.config.require_all_numbers);
        let correct = eval.as_ref().is_ok_and(|e| e.equals(target));
        reward.value = match (&eval, correct) {
            (_, true) => 1.0,
            (Ok(_), false) => self.config.format_score,
            (Err(_), _) => 0.0,
        };
        reward
            .with_metric("valid_expression", f32::from(u8::from(eval.is_ok())))
            .with_metric("correct", f32::from(u8::from(correct)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Prompt;

    #[test]
    fn parser_accepts_and_rejects() {
        let e = evaluate_countdown("(25 - 5) * 3 + 4 / 2", &[25, 5, 3, 4, 2], true).unwrap();
        assert_eq!(e.value, (62, 1));
        assert_eq!(e.numbers_used, vec![25, 5, 3, 4, 2]);
        // Exact rationals: 1/3 * 3 = 1.
        let e = evaluate_countdown("1 / 3 * 3", &[1, 3, 3], true).unwrap();
        assert!(e.equals(1));
        assert_eq!(
            evaluate_countdown("5 + 5", &[5, 3], false),
            Err(CountdownError::UnknownNumber(5))
        );
        assert_eq!(
            evaluate_countdown("5 + 7", &[5, 3], false),
            Err(CountdownError::UnknownNumber(7))
        );
        assert_eq!(
            evaluate_countdown("5 / (3 - 3)", &[5, 3, 3], true),
            Err(CountdownError::DivisionByZero)
        );
        assert_eq!(
            evaluate_countdown("5 + 3", &[5, 3, 1], true),
            Err(CountdownError::UnusedNumbers)
        );
        assert!(evaluate_countdown("5 + 3", &[5, 3, 1], false).is_ok());
        assert!(matches!(
            evaluate_countdown("-5 + 3", &[5, 3], true),
            Err(CountdownError::Syntax(0))
        ));
        assert!(matches!(
            evaluate_countdown("5 +", &[5], true),
            Err(CountdownError::Syntax(_))
        ));
        assert!(matches!(
            evaluate_countdown("import os", &[5], true),
            Err(CountdownError::Syntax(_))
        ));
        assert!(matches!(
            evaluate_countdown("5 ** 3", &[5, 3], true),
            Err(CountdownError::Syntax(_))
        ));
        assert!(matches!(
            evaluate_countdown("", &[5], true),
            Err(CountdownError::Syntax(0))
        ));
        let deep = "(".repeat(500) + "1" + &")".repeat(500);
        assert_eq!(
            evaluate_countdown(&deep, &[1], true),
            Err(CountdownError::TooComplex)
        );
        let huge = "9".repeat(60);
        assert_eq!(
            evaluate_countdown(&huge, &[1], true),
            Err(CountdownError::Overflow)
        );
        let big = format!("{0} * {0} * {0}", i64::MAX);
        let n = i128::from(i64::MAX);
        assert_eq!(
            evaluate_countdown(&big, &[n, n, n], true),
            Err(CountdownError::Overflow)
        );
        assert!(evaluate_countdown("3 × 4 ÷ 2", &[3, 4, 2], true)
            .unwrap()
            .equals(6));
    }

    #[test]
    fn reward_reads_both_ground_truth_layouts() {
        let r = CountdownReward::new(CountdownConfig {
            format_score: 0.1,
            require_all_numbers: true,
        })
        .unwrap();
        let ours = Sample::new(0, Prompt::text("q"))
            .with_ground_truth("24")
            .with_extra(serde_json::json!({"numbers": [2, 3, 4]}));
        let verl = Sample::new(0, Prompt::text("q"))
            .with_ground_truth(r#"{"target": 24, "numbers": [2, 3, 4]}"#);
        for s in [&ours, &verl] {
            let c = |t: &str| r.score(s, &Completion::from_text(t)).unwrap().value;
            assert_eq!(c("<think>..</think><answer>2 * 3 * 4</answer>"), 1.0);
            assert_eq!(c("<answer>(2 * 3 * 4) = 24</answer>"), 1.0);
            assert_eq!(c(r"\boxed{4 * 3 * 2}"), 1.0);
            assert_eq!(c("<answer>2 + 3 + 4</answer>"), 0.1);
            assert_eq!(c("<answer>24</answer>"), 0.0);
            assert_eq!(c("2 * 3 * 4"), 0.0);
        }
        let bad = Sample::new(0, Prompt::text("q")).with_ground_truth("24");
        let out = r
            .score(&bad, &Completion::from_text("<answer>24</answer>"))
            .unwrap();
        assert_eq!(out.value, 0.0);
        assert_eq!(out.metrics["bad_ground_truth"], 1.0);
    }
}
