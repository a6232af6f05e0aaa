//! MATH answer equivalence: the last `\boxed{}` of a completion against the ground truth.
//!
//! Normalization follows the spirit of Hendrycks et al.'s `is_equiv` (MATH, arXiv 2103.03874) and
//! Minerva's `normalize_final_answer` (arXiv 2206.14858), written from scratch:
//!
//! 1. drop `$`, `\$`, `\left`/`\right`, `\displaystyle`, spacing commands (`\!`, `\,`, `\;`,
//!    `\quad`, `~`), degrees (`^\circ`, `°`), percent signs;
//! 2. drop units: a trailing `\text{ ...}` / `\mbox{ ...}` that starts with a space
//!    (`12\text{ cm}` → `12`), then unwrap the remaining `\text{X}`, `\textbf{X}`, `\mathrm{X}`,
//!    `\mbox{X}` to `X`;
//! 3. `\dfrac`/`\tfrac` → `\frac`, `bmatrix` → `pmatrix`, remove all whitespace, brace the
//!    arguments of `\frac` and `\sqrt` (`\frac 97` → `\frac{9}{7}`, `\sqrt3` → `\sqrt{3}`);
//! 4. thousands separators (`14,\!400`, `8{,}880` → `14400`, `8880`), a leading `x =` (a
//!    variable of at most two characters), a trailing `.`, `.5` → `0.5`, `(A)` → `A`.
//!
//! Two answers are then equivalent if the normalized strings are equal, or if both evaluate to the
//! same number (relative tolerance `1e-9`; integers, decimals, `\frac`, `\sqrt`, `\pi`, `+ - * /
//! ^`, `\cdot`, `\times`: so `0.5` ≡ `\frac{1}{2}` and `2\sqrt{3}` ≡ `\sqrt{12}`), or if both are
//! lists of the same length (top-level commas) whose elements are pairwise equivalent, in order
//! when bracketed (tuples, intervals; the brackets must match), in any order when bare (answer
//! sets such as `-3, 2`).

use serde::{Deserialize, Serialize};

use super::extract::{balanced_group, last_boxed};
use super::{Reward, RewardError, RewardFn};
use crate::sample::{Completion, Sample};

/// Parameters of [`MathMatch`] (`name = "math"`). No parameters yet; the struct exists so
/// parameters can be added without breaking recipes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathMatchConfig {}

/// 1 if the last `\boxed{}` of the completion is equivalent to the ground truth (see the
/// [module docs](self) for what "equivalent" means), else 0.
///
/// The ground truth may be the bare answer (`\frac{1}{2}`) or a full solution containing a
/// `\boxed{}` (its last one is used).
///
/// Metrics: `has_boxed` (the completion has a complete `\boxed{}`), `correct`, `no_ground_truth`.
#[derive(Clone, Debug, Default)]
pub struct MathMatch {
    _config: MathMatchConfig,
}

impl MathMatch {
    /// The MATH reward.
    pub fn new(config: MathMatchConfig) -> Self {
        Self { _config: config }
    }
}

impl RewardFn for MathMatch {
    fn name(&self) -> &str {
        "math"
    }

    fn score(&self, sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        Ok(self.reward_for(sample, completion))
    }
}

impl MathMatch {
    /// The reward of one completion (never fails).
    fn reward_for(&self, sample: &Sample, completion: &Completion<'_>) -> Reward {
        let Some(gt) = sample.ground_truth.as_deref() else {
            return Reward::new(0.0)
                .with_metric("no_ground_truth", 1.0)
                .with_metric("has_boxed", 0.0)
                .with_metric("correct", 0.0);
        };
        let gold = if gt.contains("\\boxed") || gt.contains("\\fbox") {
            last_boxed(gt).unwrap_or(gt)
        } else {
            gt
        };
        let predicted = last_boxed(completion.text);
        let correct = predicted.is_some_and(|p| is_equivalent(p, gold));
        Reward::binary(correct)
            .with_metric("has_boxed", f32::from(u8::from(predicted.is_some())))
            .with_metric("correct", f32::from(u8::from(correct)))
    }
}

/// Whether two final answers (contents of `\boxed{}`) are equivalent; see the [module docs](self).
///
/// ```
/// use rlrun_rollout::reward::math::is_equivalent;
/// assert!(is_equivalent(r"\dfrac{1}{2}", "0.5"));
/// assert!(is_equivalent(r"\left( 3, \frac 12 \right)", r"(3,\frac{1}{2})"));
/// assert!(is_equivalent(r"10^\circ", "10"));
/// assert!(is_equivalent(r"12\text{ square units}", "12"));
/// assert!(!is_equivalent("(1, 2)", "[1, 2]"));
/// assert!(!is_equivalent(r"\frac{1}{3}", "0.333"));
/// ```
pub fn is_equivalent(predicted: &str, gold: &str) -> bool {
    let a = normalize_answer(predicted);
    let b = normalize_answer(gold);
    if a.is_empty() || b.is_empty() {
        return false;
    }
    equivalent_normalized(&a, &b, 0)
}

fn equivalent_normalized(a: &str, b: &str, depth: usize) -> bool {
    if a == b {
        return true;
    }
    if depth > 4 {
        return false;
    }
    if let (Some(x), Some(y)) = (evaluate(a), evaluate(b)) {
        return numbers_equal(x, y);
    }
    let (la, lb) = (split_list(a), split_list(b));
    match (la, lb) {
        (Some(la), Some(lb)) if la.open == lb.open && la.close == lb.close => {
            // Lists longer than 64 elements are only compared as strings (keeps this O(64²)).
            if la.items.len() != lb.items.len()
                || la.items.len() > 64
                || la.items.len() < 2 && la.open.is_none()
            {
                return false;
            }
            if la.open.is_some() {
                la.items
                    .iter()
                    .zip(&lb.items)
                    .all(|(x, y)| equivalent_normalized(x, y, depth + 1))
            } else {
                // A bare list is a set: match greedily in any order.
                let mut used = vec![false; lb.items.len()];
                la.items.iter().all(|x| {
                    let hit = lb
                        .items
                        .iter()
                        .enumerate()
                        .position(|(j, y)| !used[j] && equivalent_normalized(x, y, depth + 1));
                    hit.map(|j| used[j] = true).is_some()
                })
            }
        }
        _ => false,
    }
}

fn numbers_equal(x: f64, y: f64) -> bool {
    (x - y).abs() <= 1e-9 * x.abs().max(y.abs()) + 1e-12
}

struct List<'a> {
    open: Option<char>,
    close: Option<char>,
    items: Vec<&'a str>,
}

/// Splits `(a,b]`-style tuples/intervals or bare `a,b` lists at top-level commas.
fn split_list(s: &str) -> Option<List<'_>> {
    let first = s.chars().next()?;
    let last = s.chars().last()?;
    let (open, close, inner) =
        if matches!(first, '(' | '[') && matches!(last, ')' | ']') && s.len() >= 2 {
            (Some(first), Some(last), &s[1..s.len() - 1])
        } else {
            (None, None, s)
        };
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    items.push(&inner[start..]);
    if items.iter().any(|x| x.is_empty()) {
        return None;
    }
    Some(List { open, close, items })
}

/// Removes every occurrence of the command `cmd` (e.g. `\left`) that is not the prefix of a longer
/// command name (so `\left` does not touch `\leftarrow`).
fn remove_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = &rest[i + cmd.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(cmd);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Replaces `\cmd{X}` by `X` for text-like wrappers.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let open = format!("{cmd}{{");
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(&open) {
        out.push_str(&rest[..i]);
        let after = &rest[i + open.len()..];
        match balanced_group(after) {
            Some((content, tail)) => {
                out.push_str(content);
                rest = tail;
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Takes the argument of a command like `\frac` starting at `s`: a braced group, a `\command`, or
/// one character. Returns (argument without braces, rest).
fn take_argument(s: &str) -> Option<(&str, &str)> {
    if let Some(after) = s.strip_prefix('{') {
        return balanced_group(after);
    }
    if let Some(after) = s.strip_prefix('\\') {
        let n = after
            .char_indices()
            .find(|(_, c)| !c.is_ascii_alphabetic())
            .map(|(i, _)| i)
            .unwrap_or(after.len());
        let n = if n == 0 {
            after.chars().next().map_or(0, char::len_utf8)
        } else {
            n
        };
        return Some((&s[..1 + n], &after[n..]));
    }
    let c = s.chars().next()?;
    if c == '}' {
        return None;
    }
    Some((&s[..c.len_utf8()], &s[c.len_utf8()..]))
}

/// Braces the arguments of `\frac` (two) and `\sqrt` (one, after an optional `[n]`), recursively.
fn brace_arguments(s: &str, depth: usize) -> String {
    if depth > 32 {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    loop {
        let next = [("\\frac", 2usize), ("\\sqrt", 1usize)]
            .iter()
            .filter_map(|&(cmd, n)| rest.find(cmd).map(|i| (i, cmd, n)))
            .min_by_key(|&(i, _, _)| i);
        let Some((i, cmd, nargs)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        out.push_str(cmd);
        let mut after = &rest[i + cmd.len()..];
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            // A longer command such as `\fracx`: leave it.
            rest = after;
            continue;
        }
        if cmd == "\\sqrt" && after.starts_with('[') {
            if let Some(end) = after.find(']') {
                out.push_str(&after[..=end]);
                after = &after[end + 1..];
            }
        }
        for _ in 0..nargs {
            match take_argument(after) {
                Some((arg, tail)) => {
                    out.push('{');
                    out.push_str(&brace_arguments(arg, depth + 1));
                    out.push('}');
                    after = tail;
                }
                None => break,
            }
        }
        rest = after;
    }
}

fn is_thousands_number(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if let Some(f) = frac {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    let groups: Vec<&str> = int.split(',').collect();
    groups.len() >= 2
        && (1..=3).contains(&groups[0].len())
        && groups[0].chars().all(|c| c.is_ascii_digit())
        && groups[1..]
            .iter()
            .all(|g| g.len() == 3 && g.chars().all(|c| c.is_ascii_digit()))
}

/// Normalizes a final answer for comparison; see the [module docs](self).
///
/// ```
/// use rlrun_rollout::reward::math::normalize_answer;
/// assert_eq!(normalize_answer(r"\dfrac 97"), r"\frac{9}{7}");
/// assert_eq!(normalize_answer(r"14,\!400"), "14400");
/// assert_eq!(normalize_answer(r"x = \left( 1, 2 \right)"), "(1,2)");
/// assert_eq!(normalize_answer(r"\text{(B)}"), "B");
/// ```
pub fn normalize_answer(answer: &str) -> String {
    // Protect LaTeX line breaks (`\\`, matrix rows) from the single-backslash rules below.
    let mut s = answer.trim().replace("\\\\", "\u{0}");
    // Spacing, delimiters, decorations.
    for (from, to) in [
        ("\\$", ""),
        ("$", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", " "),
        ("~", " "),
        ("\\%", ""),
        ("%", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("°", ""),
        ("{,}", ""),
        (",\\!", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("bmatrix", "pmatrix"),
    ] {
        if s.contains(from) {
            s = s.replace(from, to);
        }
    }
    for cmd in [
        "\\left",
        "\\right",
        "\\displaystyle",
        "\\qquad",
        "\\quad",
        "\\degree",
    ] {
        if s.contains(cmd) {
            s = remove_command(&s, cmd);
        }
    }
    // `\text {x}` → `\text{x}`; "a \text{ and } b" → "a, b".
    for cmd in ["\\text", "\\mbox", "\\textrm"] {
        let spaced = format!("{cmd} {{");
        if s.contains(&spaced) {
            s = s.replace(&spaced, &format!("{cmd}{{"));
        }
    }
    for and in [
        "\\text{ and }",
        "\\text{and}",
        "\\text{ and}",
        "\\text{and }",
    ] {
        if s.contains(and) {
            s = s.replace(and, ",");
        }
    }
    // Units: a `\text{ ...}` that starts with a space, after something.
    for unit in ["\\text{ ", "\\mbox{ ", "\\textrm{ "] {
        if let Some(i) = s.find(unit) {
            if !s[..i].trim().is_empty() {
                s.truncate(i);
            }
        }
    }
    strip_trailing_unit_words(&mut s);
    for cmd in [
        "\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\boxed",
    ] {
        if s.contains(cmd) {
            s = unwrap_command(&s, cmd);
        }
    }
    s.retain(|c| !c.is_whitespace());
    while s.contains(",,") {
        s = s.replace(",,", ",");
    }
    if s.contains('\u{0}') {
        s = s.replace('\u{0}', "\\\\");
    }
    if s.contains("\\frac") || s.contains("\\sqrt") {
        s = brace_arguments(&s, 0);
    }
    if is_thousands_number(&s) {
        s.retain(|c| c != ',');
    }
    // `x=5` → `5` (a short variable name on the left of the only `=`).
    if s.matches('=').count() == 1 {
        if let Some((lhs, rhs)) = s.split_once('=') {
            if !rhs.is_empty() && (lhs.chars().count() <= 2 || is_single_command(lhs)) {
                s = rhs.to_string();
            }
        }
    }
    while s.ends_with('.') && s.len() > 1 {
        s.pop();
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    } else if s.starts_with("-.") {
        s.insert(1, '0');
    }
    // `(A)` → `A`
    let chars: Vec<char> = s.chars().collect();
    if chars.len() == 3 && chars[0] == '(' && chars[2] == ')' && chars[1].is_ascii_alphabetic() {
        s = chars[1].to_string();
    }
    // `a/b` with integers → `\frac{a}{b}`
    if let Some((a, b)) = s.split_once('/') {
        let int = |x: &str| {
            let d = x.strip_prefix('-').unwrap_or(x);
            !d.is_empty() && d.len() < 20 && d.chars().all(|c| c.is_ascii_digit())
        };
        if int(a) && int(b) {
            s = format!("\\frac{{{a}}}{{{b}}}");
        }
    }
    s
}

/// Drops a trailing `\text{words}` / `\mbox{words}` after a number or closing brace
/// (`10\text{edges}` → `10`): a unit written without a leading space.
fn strip_trailing_unit_words(s: &mut String) {
    for cmd in ["\\text{", "\\mbox{", "\\textrm{"] {
        let Some(i) = s.rfind(cmd) else { continue };
        let Some((content, rest)) = balanced_group(&s[i + cmd.len()..]) else {
            continue;
        };
        let prefix = s[..i].trim_end();
        let words = !content.trim().is_empty()
            && content
                .chars()
                .all(|c| c.is_alphabetic() || c == ' ' || c == '.');
        let after_number = prefix.ends_with(|c: char| c.is_ascii_digit() || c == '}');
        let unit_tail = rest.trim().is_empty() || rest.trim_start().starts_with('^');
        if words && after_number && unit_tail {
            s.truncate(i);
            return;
        }
    }
}

fn is_single_command(s: &str) -> bool {
    s.strip_prefix('\\')
        .is_some_and(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphabetic()))
}

/// Evaluates a normalized answer as a real number if it is a closed-form numeric expression.
///
/// ```
/// use rlrun_rollout::reward::math::evaluate;
/// assert_eq!(evaluate(r"\frac{1}{2}"), Some(0.5));
/// assert_eq!(evaluate(r"2^{10}-1"), Some(1023.0));
/// assert_eq!(evaluate("2x"), None);
/// ```
pub fn evaluate(normalized: &str) -> Option<f64> {
    if normalized.is_empty() || normalized.len() > 4096 {
        return None;
    }
    let mut p = Evaluator {
        s: normalized.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.expr()?;
    (p.i == p.s.len() && v.is_finite()).then_some(v)
}

struct Evaluator<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Evaluator<'_> {
    const MAX_DEPTH: usize = 64;

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.s[self.i..].starts_with(token.as_bytes()) {
            // A command must not continue with letters (`\pi` vs `\pipe`).
            let next = self.s.get(self.i + token.len()).copied();
            if token.starts_with('\\') && next.is_some_and(|c| c.is_ascii_alphabetic()) {
                return false;
            }
            self.i += token.len();
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= Self::MAX_DEPTH).then_some(())
    }

    fn expr(&mut self) -> Option<f64> {
        self.enter()?;
        let mut v = self.term()?;
        loop {
            if self.eat("+") {
                v += self.term()?;
            } else if self.eat("-") {
                v -= self.term()?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(v)
    }

    fn term(&mut self) -> Option<f64> {
        let mut v = self.unary()?;
        loop {
            if self.eat("*") || self.eat("\\cdot") || self.eat("\\times") {
                v *= self.unary()?;
            } else if self.eat("/") || self.eat("\\div") {
                let d = self.unary()?;
                if d == 0.0 {
                    return None;
                }
                v /= d;
            } else if self.starts_atom() {
                v *= self.power()?; // implicit multiplication: 2\sqrt{3}, 3\pi, 2(1+1)
            } else {
                break;
            }
        }
        Some(v)
    }

    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(b'0'..=b'9' | b'(' | b'{' | b'.') => true,
            Some(b'\\') => {
                let rest = &self.s[self.i..];
                rest.starts_with(b"\\frac")
                    || rest.starts_with(b"\\sqrt")
                    || rest.starts_with(b"\\pi")
            }
            _ => false,
        }
    }

    fn unary(&mut self) -> Option<f64> {
        self.enter()?;
        let v = if self.eat("-") {
            -self.unary()?
        } else if self.eat("+") {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Some(v)
    }

    fn power(&mut self) -> Option<f64> {
        let base = self.atom()?;
        if self.eat("^") {
            let exponent = if self.peek() == Some(b'{') {
                self.atom()?
            } else {
                // A single digit or a parenthesized atom: `2^3`, `2^(1/2)`.
                self.unary()?
            };
            if exponent.abs() > 1024.0 {
                return None;
            }
            let v = base.powf(exponent);
            return v.is_finite().then_some(v);
        }
        Some(base)
    }

    fn atom(&mut self) -> Option<f64> {
        self.enter()?;
        let v = match self.peek()? {
            b'(' => {
                self.i += 1;
                let v = self.expr()?;
                self.eat(")").then_some(v)?
            }
            b'{' => self.group()?,
            b'0'..=b'9' | b'.' => self.number()?,
            b'\\' => {
                if self.eat("\\frac") {
                    let n = self.group()?;
                    let d = self.group()?;
                    if d == 0.0 {
                        return None;
                    }
                    n / d
                } else if self.eat("\\sqrt") {
                    let index = if self.eat("[") {
                        let k = self.expr()?;
                        self.eat("]").then_some(k)?
                    } else {
                        2.0
                    };
                    let x = self.group()?;
                    if index == 0.0 || x < 0.0 {
                        return None;
                    }
                    x.powf(1.0 / index)
                } else if self.eat("\\pi") {
                    std::f64::consts::PI
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        self.depth -= 1;
        Some(v)
    }

    fn group(&mut self) -> Option<f64> {
        if !self.eat("{") {
            return None;
        }
        let v = self.expr()?;
        self.eat("}").then_some(v)
    }

    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9' | b'.')) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if text.len() > 40 || text.matches('.').count() > 1 || text == "." {
            return None;
        }
        text.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalences() {
        let yes = [
            (r"\frac{1}{2}", "0.5"),
            (r"\dfrac12", r"\frac{1}{2}"),
            (r"\tfrac{3}{4}", "3/4"),
            (r"\left(3,\frac{1}{2}\right)", r"( 3 , \frac12 )"),
            ("90^\\circ", "90"),
            ("90°", "90"),
            ("\\$5.00", "5"),
            ("50\\%", "50"),
            (r"5\text{ cm}^2", "5"),
            (r"\text{Devon}", "Devon"),
            ("x = 4", "4"),
            (r"2\sqrt3", r"2\sqrt{3}"),
            (r"\sqrt{12}", r"2\sqrt{3}"),
            ("1,000,000", "1000000"),
            (r"8{,}880", "8880"),
            ("-6, -3, 2", "2,-3,-6"),
            (".5", "1/2"),
            (
                r"\begin{bmatrix}1\\2\end{bmatrix}",
                r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
            ),
            (r"\frac{\sqrt6}3", r"\frac{\sqrt{6}}{3}"),
            (r"\pi/2", r"\frac{\pi}{2}"),
            ("(A)", r"\text{A}"),
            (r"10\;\text{edges}", "10"),
            (r"8\sqrt{3} \text { square inches}", r"8\sqrt{3}"),
            (r"25 \, \text{km}", "25"),
            (r"7, -2, \text{ and } -5", "7,-2,-5"),
            (r"19 \text{ and }43", "19, 43"),
        ];
        for (a, b) in yes {
            assert!(is_equivalent(a, b), "{a:?} should equal {b:?}");
            assert!(is_equivalent(b, a), "{b:?} should equal {a:?}");
        }
        let no = [
            ("1", "2"),
            (r"\frac{1}{3}", "0.333"),
            ("(1,2)", "[1,2]"),
            ("(1,2)", "(2,1)"),
            ("1,2", "1,2,3"),
            ("x+1", "x+2"),
            ("", ""),
            ("2x", "2y"),
            (r"\sqrt{2}", "1.414"),
        ];
        for (a, b) in no {
            assert!(!is_equivalent(a, b), "{a:?} should differ from {b:?}");
        }
    }

    #[test]
    fn evaluate_rejects_garbage_and_deep_nesting() {
        assert_eq!(evaluate("1/0"), None);
        assert_eq!(evaluate(r"\frac{1}{0}"), None);
        assert_eq!(evaluate("2^{100000}"), None);
        assert_eq!(evaluate(r"\sqrt{-1}"), None);
        let deep = "(".repeat(10_000) + "1" + &")".repeat(10_000);
        assert_eq!(evaluate(&deep), None);
        assert_eq!(evaluate("1.2.3"), None);
        assert_eq!(evaluate("(1+2)*3"), Some(9.0));
        assert_eq!(evaluate(r"3\pi"), Some(3.0 * std::f64::consts::PI));
    }

    #[test]
    fn brace_arguments_nested() {
        assert_eq!(
            normalize_answer(r"\frac{\frac12}{3}"),
            r"\frac{\frac{1}{2}}{3}"
        );
        assert_eq!(normalize_answer(r"\sqrt[3]2"), r"\sqrt[3]{2}");
    }
}
