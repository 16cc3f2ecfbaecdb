//! Phone numbers as text: people's spellings normalised to E.164, and masking for
//! logs (a number is personal data; logs keep its last four digits).

/// A phone number as written by people (`+1 (415) 555-0100`, `0041 44 668 18 00`)
/// in E.164 (`+14155550100`): spaces, dots, dashes and parentheses go, a leading
/// `00` becomes `+`. `None` when the result is not E.164 (a national number without
/// its country code cannot be normalised without guessing the country).
pub fn normalize_e164(raw: &str) -> Option<String> {
    let compact: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}'))
        .collect();
    let e164 = match compact.strip_prefix("00") {
        Some(rest) if !compact.starts_with('+') => format!("+{rest}"),
        _ => compact,
    };
    callmeback_api::is_e164(&e164).then_some(e164)
}

/// A phone number for logs: all but the last four digits masked (`*******0100`).
/// Anything shorter than five characters is masked entirely.
pub fn mask_number(n: &str) -> String {
    let chars: Vec<char> = n.chars().collect();
    if chars.len() < 5 {
        return "*".repeat(chars.len());
    }
    let keep = chars.len() - 4;
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| if i < keep { '*' } else { *c })
        .collect()
}

/// Free text (a Twilio error message such as "The number +14155550100 is
/// unverified") with every phone-number-like run of 7 or more digits masked but its
/// last four, so it can be logged.
pub fn mask_numbers_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if digits >= 7 {
            out.push_str(&mask_number(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    // Numbers as people write them become E.164; national numbers and junk do not.
    #[test]
    fn numbers_normalise_to_e164() {
        assert_eq!(
            super::normalize_e164("+1 (415) 555-0100").as_deref(),
            Some("+14155550100")
        );
        assert_eq!(
            super::normalize_e164("0041 44 668 18 00").as_deref(),
            Some("+41446681800")
        );
        assert_eq!(
            super::normalize_e164("+44.20.7946.0018").as_deref(),
            Some("+442079460018")
        );
        assert_eq!(super::normalize_e164("415 555 0100"), None);
        assert_eq!(super::normalize_e164("+1 415 CALL ME"), None);
        assert_eq!(super::normalize_e164(""), None);
    }

    #[test]
    fn numbers_are_masked_but_the_last_four() {
        // Proves log masking keeps only the last four digits.
        assert_eq!(super::mask_number("+14155550100"), "********0100");
        assert_eq!(super::mask_number("123"), "***");
    }

    #[test]
    fn numbers_inside_twilio_messages_are_masked_for_logs() {
        // Proves a Twilio error naming the callee keeps only its last four digits,
        // while error codes and short numbers stay readable.
        assert_eq!(
            super::mask_numbers_in("The number +14155550100 is unverified (code 21219)."),
            "The number ********0100 is unverified (code 21219)."
        );
        assert_eq!(
            super::mask_numbers_in("To 4155550100, from +1"),
            "To ******0100, from +1"
        );
        assert_eq!(super::mask_numbers_in("é+日"), "é+日");
    }
}
