//! Answer extraction helpers shared by the built-in rewards and available to custom ones.
//!
//! All helpers run in time linear in the input and never panic, whatever the input (empty, huge,
//! unbalanced braces, any Unicode).

use std::sync::OnceLock;

use regex::Regex;

/// The content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, with nested braces
/// balanced; `\boxed 5` (no braces) gives the token after the space. `None` if there is none or the
/// last one is unterminated (a truncated generation).
///
/// ```
/// use rlrun_rollout::reward::extract::last_boxed;
/// assert_eq!(last_boxed(r"so \boxed{1} or \boxed{\frac{1}{2}}."), Some(r"\frac{1}{2}"));
/// assert_eq!(last_boxed(r"\boxed 5$"), Some("5"));
/// assert_eq!(last_boxed(r"\boxed{12"), None);
/// ```
pub fn last_boxed(text: &str) -> Option<&str> {
    let start = match (text.rfind("\\boxed"), text.rfind("\\fbox")) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    let command_len = if text[start..].starts_with("\\boxed") {
        "\\boxed".len()
    } else {
        "\\fbox".len()
    };
    let rest = &text[start + command_len..];
    if let Some(inner) = rest.strip_prefix('{') {
        return balanced_group(inner).map(|(content, _)| content);
    }
    // `\boxed 5`: a space, then a token up to whitespace or `$`.
    let rest = rest.strip_prefix(' ')?;
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '$')
        .unwrap_or(rest.len());
    let token = &rest[..end];
    (!token.is_empty()).then_some(token)
}

/// Given the text right after an opening `{`, returns the content up to the matching `}` and the
/// rest after it. `None` if braces never balance. Escaped braces `\{` `\}` count as text.
pub(crate) fn balanced_group(after_open: &str) -> Option<(&str, &str)> {
    let mut depth = 1usize;
    let bytes = after_open.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                // Skip the escaped character (ASCII braces are single bytes; any other byte is
                // skipped harmlessly because the next iteration only looks for ASCII).
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&after_open[..i], &after_open[i + 1..]));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The text of the last `<tag>...</tag>` element (non-nested), trimmed.
///
/// ```
/// use rlrun_rollout::reward::extract::last_tagged;
/// assert_eq!(last_tagged("<answer> 1 </answer><answer>2+3</answer>", "answer"), Some("2+3"));
/// assert_eq!(last_tagged("<answer>open", "answer"), None);
/// ```
pub fn last_tagged<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let end = text.rfind(&close)?;
    let start = text[..end].rfind(&open)? + open.len();
    Some(text[start..end].trim())
}

fn number_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // A number with optional sign, `$`, thousands commas and decimals: -1,234.5 / $18 / .5
    RE.get_or_init(|| {
        Regex::new(r"-?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)").expect("static regex compiles")
    })
}

/// Parses a number as written in an answer: strips `$`, `\$`, thousands commas, `%`, spaces and a
/// trailing `.`; accepts integers, decimals and simple fractions `a/b`.
///
/// ```
/// use rlrun_rollout::reward::extract::parse_number;
/// assert_eq!(parse_number("$1,234."), Some(1234.0));
/// assert_eq!(parse_number("-3/4"), Some(-0.75));
/// assert_eq!(parse_number("12 apples"), None);
/// ```
pub fn parse_number(s: &str) -> Option<f64> {
    let mut cleaned = String::with_capacity(s.len());
    let mut chars = s.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' | ',' | ' ' | '%' => {}
            '\\' if matches!(chars.peek(), Some('$') | Some('%') | Some('!') | Some(',')) => {
                chars.next();
            }
            _ => cleaned.push(c),
        }
    }
    let cleaned = cleaned.strip_suffix('.').unwrap_or(&cleaned);
    if cleaned.is_empty() || cleaned.len() > 64 {
        return None;
    }
    if let Some((num, den)) = cleaned.split_once('/') {
        let num: f64 = parse_plain(num)?;
        let den: f64 = parse_plain(den)?;
        if den == 0.0 {
            return None;
        }
        return Some(num / den);
    }
    parse_plain(cleaned)
}

fn parse_plain(s: &str) -> Option<f64> {
    // Only plain decimal notation: `f64::from_str` would also accept "inf", "NaN" and "1e5".
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        || digits.chars().filter(|&c| c == '.').count() > 1
        || digits == "."
    {
        return None;
    }
    s.parse::<f64>().ok()
}

/// The last number in `text` (GSM8K's "last number" rule), with `$` and thousands commas removed.
///
/// ```
/// use rlrun_rollout::reward::extract::last_number;
/// assert_eq!(last_number("costs $1,200.50 for 3 days, so 400."), Some(400.0));
/// assert_eq!(last_number("no digits"), None);
/// ```
pub fn last_number(text: &str) -> Option<f64> {
    number_regex()
        .find_iter(text)
        .last()
        .and_then(|m| signed_number(text, m))
}

/// The first number in `text`.
pub fn first_number(text: &str) -> Option<f64> {
    number_regex()
        .find_iter(text)
        .next()
        .and_then(|m| signed_number(text, m))
}

/// Parses a number match, deciding whether a `-` is a sign or a binary minus: `50-5` is 5,
/// `is -5` and `is - 5` are -5.
fn signed_number(text: &str, m: regex::Match<'_>) -> Option<f64> {
    let before = &text[..m.start()];
    let binary_context = |s: &str| {
        s.trim_end()
            .ends_with(|c: char| c.is_ascii_digit() || c == ')')
    };
    let matched = m.as_str();
    if let Some(unsigned) = matched.strip_prefix('-') {
        let v = parse_number(unsigned)?;
        return Some(if binary_context(before) { v } else { -v });
    }
    let v = parse_number(matched)?;
    // `- 10`: a detached minus sign that is not a subtraction.
    let trimmed = before.trim_end_matches(' ');
    if trimmed.len() < before.len() {
        if let Some(prefix) = trimmed.strip_suffix('-') {
            if !binary_context(prefix) {
                return Some(-v);
            }
        }
    }
    Some(v)
}

/// The first number on the line after the last `#### ` marker (GSM8K's gold format).
///
/// ```
/// use rlrun_rollout::reward::extract::hash_answer;
/// assert_eq!(hash_answer("6 * 3 = 18\n#### 18"), Some(18.0));
/// assert_eq!(hash_answer("#### $1,000."), Some(1000.0));
/// ```
pub fn hash_answer(text: &str) -> Option<f64> {
    let at = text.rfind("####")?;
    let line = text[at + 4..].lines().next().unwrap_or("");
    first_number(line)
}

/// The first number after the last `Answer:` (case-insensitive) on the same line.
///
/// ```
/// use rlrun_rollout::reward::extract::answer_line;
/// assert_eq!(answer_line("work...\nAnswer: 42"), Some(42.0));
/// ```
pub fn answer_line(text: &str) -> Option<f64> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"(?i)answer\s*:").expect("static regex compiles"));
    let m = re.find_iter(text).last()?;
    let line = text[m.end()..].lines().next().unwrap_or("");
    first_number(line)
}

/// The number inside the last `\boxed{}`: the whole content if it parses as a number (after
/// dropping `\text{...}` units), else the last number inside it.
///
/// ```
/// use rlrun_rollout::reward::extract::boxed_number;
/// assert_eq!(boxed_number(r"\boxed{\$1,000}"), Some(1000.0));
/// assert_eq!(boxed_number(r"\boxed{x = 7}"), Some(7.0));
/// ```
pub fn boxed_number(text: &str) -> Option<f64> {
    let content = last_boxed(text)?;
    let without_text = match content.find("\\text") {
        Some(i) if i > 0 => &content[..i],
        _ => content,
    };
    parse_number(without_text).or_else(|| last_number(content))
}
