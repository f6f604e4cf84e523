//! JSON and `repr` text exactly as CPython writes it, because the image
//! config's bytes decide the image ID.
//!
//! The reference serialises the config and manifest with
//! `json.dumps(obj, indent=4)`: `ensure_ascii=True` (every non-ASCII
//! character becomes a lowercase `\uXXXX`, astral ones a surrogate pair),
//! `", "`/`": "` separators reduced to `","` at line ends, empty containers as
//! `[]`/`{}`, Python's number forms (JSON integers kept exactly, JSON numbers
//! with a fraction or exponent printed as `repr(float)`), and keys in the
//! order they were read.  The history comments embed `repr(list_of_str)`.
//! `serde_json` is used for parsing only (with `preserve_order` and
//! `arbitrary_precision`); its own formatter differs in all of the above.

use serde_json::Value;

/// `json.dumps(value, indent=4)`.
pub fn dumps_indent4(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, 0, &mut out);
    out
}

fn newline_indent(level: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(value: &Value, level: usize, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => out.push_str(&python_number(&n.to_string())),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(level + 1, out);
                write_value(item, level + 1, out);
            }
            newline_indent(level, out);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(level + 1, out);
                write_string(k, out);
                out.push_str(": ");
                write_value(v, level + 1, out);
            }
            newline_indent(level, out);
            out.push('}');
        }
    }
}

/// `json.encoder.py_encode_basestring_ascii`.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// How Python's `json` module re-prints a number literal it parsed: an
/// integer (no fraction, no exponent) exactly, anything else as
/// `repr(float(literal))`, with `Infinity` for overflow.
pub fn python_number(literal: &str) -> String {
    if !literal.contains(['.', 'e', 'E']) {
        // Python ints are unbounded; only "-0" changes.
        return if literal == "-0" { "0".to_string() } else { literal.to_string() };
    }
    match literal.parse::<f64>() {
        Ok(f) => float_repr(f),
        Err(_) => literal.to_string(),
    }
}

/// `float.__repr__` (`format_float_short` with mode 'r'): the shortest
/// round-tripping digits, in fixed notation when the decimal point position
/// is in (-4, 16], otherwise `d.ddde±XX` with at least two exponent digits.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let sign = if f.is_sign_negative() { "-" } else { "" };
    // Rust's `{:e}` gives the same shortest digits: "d.ddde<exp>".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1;
    let body = if (-4 < decpt) && (decpt <= 16) {
        if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(decpt as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        }
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits.clone() };
        let e = decpt - 1;
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

/// `repr(list_of_str)`: `['a', 'b']`.
pub fn repr_str_list<S: AsRef<str>>(items: &[S]) -> String {
    let mut out = String::from("[");
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        repr_str(s.as_ref(), &mut out);
    }
    out.push(']');
    out
}

/// `repr(str)` (`unicode_repr`): single quotes unless the text has a single
/// quote and no double quote; backslash escapes for the quote, `\\`, `\t`,
/// `\n`, `\r`, and `\x`/`\u`/`\U` for characters Python deems unprintable.
pub fn repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (c as u32) < 0x7f => out.push(c),
            c if is_printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
}

/// `str.isprintable` for one character: not in categories Cc, Cf, Cs, Co,
/// Cn, Zl, Zp, and not a space separator other than ASCII space.
fn is_printable(c: char) -> bool {
    use unicode_general_category::{get_general_category, GeneralCategory as G};
    !matches!(
        get_general_category(c),
        G::Control
            | G::Format
            | G::Surrogate
            | G::PrivateUse
            | G::Unassigned
            | G::LineSeparator
            | G::ParagraphSeparator
            | G::SpaceSeparator
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(text: &str) -> String {
        dumps_indent4(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn layout_matches_json_dumps_indent_4() {
        assert_eq!(
            dumps(r#"{"a": [1, {}], "b": {"c": []}}"#),
            "{\n    \"a\": [\n        1,\n        {}\n    ],\n    \"b\": {\n        \"c\": []\n    }\n}"
        );
    }

    #[test]
    fn keys_keep_input_order_and_last_duplicate_wins_in_place() {
        assert_eq!(dumps(r#"{"z": 1, "a": 2, "z": 3}"#), "{\n    \"z\": 3,\n    \"a\": 2\n}");
    }

    #[test]
    fn strings_are_ascii_escaped_like_python() {
        assert_eq!(
            dumps(r#""h\u00e9llo \u2713 \"q\" \\ \u007f \u0001 \ud83d\ude00""#),
            r#""h\u00e9llo \u2713 \"q\" \\ \u007f \u0001 \ud83d\ude00""#
        );
        assert_eq!(dumps("\"\\b\\f\\n\\r\\t/\""), "\"\\b\\f\\n\\r\\t/\"");
    }

    #[test]
    fn numbers_follow_python_int_and_float_repr() {
        for (input, want) in [
            ("0", "0"),
            ("-0", "0"),
            ("123456789012345678901234567890", "123456789012345678901234567890"),
            ("1.0", "1.0"),
            ("1.5", "1.5"),
            ("1E5", "100000.0"),
            ("1e16", "1e+16"),
            ("1e15", "1000000000000000.0"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("-0.0", "-0.0"),
            ("1.23e-7", "1.23e-07"),
            ("12345678901234567890.5", "1.2345678901234567e+19"),
            ("1e400", "Infinity"),
            ("0.1", "0.1"),
        ] {
            assert_eq!(python_number(input), want, "{input}");
        }
    }

    #[test]
    fn repr_quotes_and_escapes_like_python() {
        let mut s = String::new();
        repr_str("it's", &mut s);
        assert_eq!(s, "\"it's\"");
        assert_eq!(repr_str_list(&["a", "b\"'"]), r#"['a', 'b"\'']"#);
        assert_eq!(repr_str_list::<&str>(&[]), "[]");
        assert_eq!(repr_str_list(&["\u{e9}\t\u{7f}\u{a0}\u{200b}"]), r"['é\t\x7f\xa0\u200b']");
    }
}
