//! LLM token stream -> speakable chunks for TTS.
//!
//! The first chunk is cut early (a clause of a few words) so the first audio leaves
//! while the model is still writing; later chunks end at sentences or longer clauses,
//! which sound better. A boundary is only decided once the character *after* the
//! punctuation is known, so "3.14", "$1,000", "10:30", "e.g." and URLs never split.
//!
//! Scripts written without spaces (Chinese, Japanese) are first-class: the fullwidth
//! marks `。！？` end a sentence and `、，；：` a clause with no space after them,
//! and a stretch with no boundary at all is cut at [`ChunkerConfig::max_chars`]
//! *characters* (at the last whitespace when there is one), never inside a
//! character. The model's text is untrusted input: no reply can panic the chunker or
//! grow a chunk past that bound.
//!
//! What TTS receives: each chunk is trimmed, newlines become spaces, and the
//! markdown markers `*`, `_`, `#` and `` ` `` are dropped; a chunk with nothing
//! alphanumeric left is not sent. Apart from that the chunks are the text, in order.

/// Chunking thresholds.
#[derive(Clone, Debug)]
pub struct ChunkerConfig {
    /// Words needed before a clause break (`,` `;` `:` dash) may end the first chunk.
    pub first_clause_min_words: usize,
    /// Words needed before a clause break may end a later chunk.
    pub clause_min_words: usize,
    /// Longest chunk, in characters: a stretch with no boundary is cut at the last
    /// whitespace within it (at exactly this many characters when there is none),
    /// so a run-on reply still streams.
    pub max_chars: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self {
            first_clause_min_words: 3,
            clause_min_words: 10,
            max_chars: 220,
        }
    }
}

/// Abbreviations whose trailing period does not end a sentence (compared lowercase,
/// without the period). Splitting too late is harmless; too early sounds broken.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ave", "vs", "etc", "inc", "ltd",
    "corp", "dept", "approx", "vol", "fig", "jan", "feb", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec",
];

/// Splits a token stream into chunks.
#[derive(Debug, Default)]
pub struct Chunker {
    cfg: ChunkerConfig,
    buf: String,
    emitted: usize,
}

impl Chunker {
    /// A chunker with the given thresholds.
    pub fn new(cfg: ChunkerConfig) -> Self {
        Self {
            cfg,
            buf: String::new(),
            emitted: 0,
        }
    }

    /// Feeds one token; returns the chunks it completed (usually none or one).
    pub fn push(&mut self, token: &str) -> Vec<String> {
        self.push_raw(token)
            .iter()
            .filter_map(|raw| speakable(raw))
            .collect()
    }

    /// The end of the stream: whatever is left is the last chunk.
    pub fn finish(&mut self) -> Option<String> {
        let chunk = std::mem::take(&mut self.buf);
        let c = speakable(&chunk)?;
        self.emitted += 1;
        Some(c)
    }

    /// Chunks emitted so far.
    pub fn emitted(&self) -> usize {
        self.emitted
    }

    /// Feeds one token; returns the pieces cut off the buffer exactly as written
    /// (spoken or not), so the pieces plus the buffer are always the text so far.
    /// Work is linear in the token's length, however long it is.
    fn push_raw(&mut self, token: &str) -> Vec<String> {
        self.buf.push_str(token);
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(len) = self.find_boundary(&self.buf[from..]) {
            let chunk = self.buf[from..from + len].to_string();
            from += len;
            if speakable(&chunk).is_some() {
                self.emitted += 1;
            }
            out.push(chunk);
        }
        self.buf.drain(..from);
        out
    }

    /// Byte index just past the first decided boundary in `s`; always a character
    /// boundary, greater than zero, and at most `max_chars` characters in. Looks at
    /// no more than `max_chars + 2` characters.
    fn find_boundary(&self, s: &str) -> Option<usize> {
        let max_chars = self.cfg.max_chars.max(1);
        let chars: Vec<(usize, char)> = s.char_indices().take(max_chars + 2).collect();
        // More text than one chunk may hold: a boundary must come within the limit.
        let longer = chars.len() > max_chars;
        // Byte length of the first `max_chars` characters: no chunk ends past it.
        let limit = chars.get(max_chars).map_or(s.len(), |&(pos, _)| pos);
        let clause_min = if self.emitted == 0 {
            self.cfg.first_clause_min_words
        } else {
            self.cfg.clause_min_words
        };
        let mut i = 0;
        while i < chars.len() {
            let (pos, c) = chars[i];
            if pos >= limit {
                break;
            }
            // A blank line is a paragraph break.
            if c == '\n' && chars.get(i + 1).is_some_and(|&(_, n)| n == '\n') {
                let end = pos + 1;
                if has_letter(&s[..end]) {
                    return Some(end);
                }
            }
            if is_sentence_punct(c) {
                // The run of terminal punctuation plus closing quotes/brackets.
                let mut j = i;
                let mut wide = is_wide_sentence_punct(c);
                while let Some(&(_, n)) = chars.get(j + 1) {
                    if !(is_sentence_punct(n) || is_closer(n)) {
                        break;
                    }
                    wide |= is_wide_sentence_punct(n);
                    j += 1;
                }
                let Some(&(_, next)) = chars.get(j + 1) else {
                    if longer {
                        break; // the run reaches past the limit
                    }
                    return None; // undecided until the next character arrives
                };
                let end = chars[j].0 + chars[j].1.len_utf8();
                // Fullwidth marks need no space after them; Latin ones do ("3.14").
                if end <= limit && (wide || next.is_whitespace()) {
                    let run = &s[pos..end];
                    let single_period = run.trim_end_matches(is_closer) == ".";
                    if !(single_period && ends_with_abbreviation(&s[..pos]))
                        && has_letter(&s[..pos])
                    {
                        return Some(end);
                    }
                }
                i = j + 1;
                continue;
            }
            if is_clause_punct(c) {
                let end = pos + c.len_utf8();
                let next = chars.get(i + 1).map(|&(_, n)| n);
                let wide = is_wide_clause_punct(c);
                let decided = match (c, next) {
                    (_, None) if longer => break,
                    (_, None) => return None,
                    // Dashes break with or without spaces ("well—maybe"), and so do
                    // fullwidth commas ("はい、そうです").
                    ('—' | '–', Some(_)) => true,
                    (_, Some(_)) if wide => true,
                    (_, Some(n)) => n.is_whitespace(),
                };
                let weight = if wide {
                    unspaced_weight(&s[..end])
                } else {
                    word_count(&s[..end])
                };
                if decided && end <= limit && weight >= clause_min {
                    return Some(end);
                }
            }
            i += 1;
        }
        if longer {
            // No boundary for a long stretch: cut after the last whitespace so it still
            // streams, or at the character limit when there is none (unspaced scripts).
            let cut = s[..limit]
                .char_indices()
                .rev()
                .find(|&(p, c)| p > 0 && c.is_whitespace())
                .map_or(limit, |(p, c)| p + c.len_utf8());
            return Some(cut);
        }
        None
    }
}

/// Sentence ends: Latin (need whitespace after), fullwidth, and other scripts' kin.
fn is_sentence_punct(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | '…' | '‼' | '⁇' | '⁈' | '⁉' | '؟' | '۔' | '।' | '॥' | '።'
    ) || is_wide_sentence_punct(c)
}

/// Sentence ends of scripts written without spaces: a boundary with no space after.
fn is_wide_sentence_punct(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡' | '︒' | '﹒' | '﹖' | '﹗')
}

fn is_closer(c: char) -> bool {
    // `*` and `_` close markdown emphasis ("**Sure!**").
    matches!(
        c,
        '"' | '\''
            | ')'
            | ']'
            | '”'
            | '’'
            | '»'
            | '*'
            | '_'
            | '」'
            | '』'
            | '）'
            | '］'
            | '｝'
            | '】'
            | '〕'
            | '〉'
            | '》'
            | '〗'
            | '〙'
            | '〛'
            | '＂'
            | '＇'
            | '｣'
    )
}

fn is_clause_punct(c: char) -> bool {
    matches!(c, ',' | ';' | ':' | '—' | '–' | '،' | '؛') || is_wide_clause_punct(c)
}

/// Clause marks of scripts written without spaces.
fn is_wide_clause_punct(c: char) -> bool {
    matches!(
        c,
        '、' | '，' | '；' | '：' | '､' | '﹐' | '﹑' | '﹔' | '﹕' | '︐' | '︑'
    )
}

fn has_letter(s: &str) -> bool {
    s.chars().any(char::is_alphabetic)
}

fn word_count(s: &str) -> usize {
    s.split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count()
}

/// "Words" of text that may have no spaces: space-separated words, or two
/// characters of an unspaced script (CJK, kana, Thai: three UTF-8 bytes or more)
/// per word, whichever is larger.
fn unspaced_weight(s: &str) -> usize {
    let unspaced = s
        .chars()
        .filter(|c| c.is_alphanumeric() && c.len_utf8() >= 3)
        .count();
    word_count(s).max(unspaced / 2)
}
/// Whether the text before a period ends in an abbreviation ("Dr", "e.g", "U.S", "J").
fn ends_with_abbreviation(before: &str) -> bool {
    let word = before
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    if word.is_empty() {
        return false;
    }
    // Internal periods: "e.g", "i.e", "U.S", "a.m".
    if word.contains('.') && word.chars().filter(|c| c.is_alphabetic()).count() <= 4 {
        return true;
    }
    // Single-letter initials: "J. R. R. Tolkien".
    let mut letters = word.chars();
    if let (Some(c), None) = (letters.next(), letters.next())
        && c.is_alphabetic()
        && c.is_uppercase()
    {
        return true;
    }
    let lower = word.to_lowercase();
    ABBREVIATIONS.contains(&lower.as_str())
}

/// Trims a chunk and drops markdown markers TTS would read aloud; `None` when
/// nothing speakable remains.
fn speakable(chunk: &str) -> Option<String> {
    let cleaned: String = chunk
        .chars()
        .filter(|c| !matches!(c, '*' | '#' | '`' | '_'))
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    let t = cleaned.trim();
    if t.chars().any(char::is_alphanumeric) {
        Some(t.to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_tokens(tokens: &[&str]) -> Vec<String> {
        let mut c = Chunker::new(ChunkerConfig::default());
        let mut out = Vec::new();
        for t in tokens {
            out.extend(c.push(t));
        }
        out.extend(c.finish());
        out
    }

    /// Streams text one character at a time, the worst case for lookahead.
    fn run_chars(text: &str) -> Vec<String> {
        let tokens: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        run_tokens(&refs)
    }

    #[test]
    fn sentences_split_at_terminal_punctuation() {
        // Proves each sentence becomes its own chunk, whatever the tokenization.
        let text = "Hello there. How are you today? I am great!";
        let want = vec!["Hello there.", "How are you today?", "I am great!"];
        assert_eq!(run_chars(text), want);
        assert_eq!(
            run_tokens(&[
                "Hello",
                " there",
                ".",
                " How are",
                " you today",
                "?",
                " I am great!"
            ]),
            want
        );
    }

    #[test]
    fn first_chunk_breaks_at_a_comma_after_three_words_later_chunks_wait_longer() {
        // Proves the first chunk is short for latency and later ones prefer longer clauses.
        let text =
            "Well, I think that, all things considered, it is fine, really, and then we go home.";
        let got = run_chars(text);
        assert_eq!(got[0], "Well, I think that,");
        assert_eq!(
            got[1],
            "all things considered, it is fine, really, and then we go home."
        );
    }

    #[test]
    fn numbers_money_times_and_urls_never_split() {
        // Proves decimals, thousands separators, clock times and URLs stay whole.
        let text = "Pi is 3.14 and it costs $1,000 at 10:30 on example.com/a.b today.";
        assert_eq!(run_chars(text), vec![text.to_string()]);
        assert_eq!(
            run_chars("See https://x.example.org/p?q=1. Then call."),
            vec!["See https://x.example.org/p?q=1.", "Then call."]
        );
    }

    #[test]
    fn abbreviations_and_initials_do_not_end_sentences() {
        // Proves "Dr.", "Mr.", "e.g." and initials keep the sentence together.
        let text = "Dr. Smith met Mr. Jones, e.g. at J. R. R. Tolkien's house. Then left.";
        assert_eq!(
            run_chars(text),
            vec![
                "Dr. Smith met Mr. Jones,",
                "e.g. at J. R. R. Tolkien's house.",
                "Then left."
            ]
        );
    }

    #[test]
    fn ellipses_and_closing_quotes_end_a_sentence_as_one_run() {
        // Proves "..." and `?"` are kept with their sentence.
        assert_eq!(
            run_chars("Well... maybe. She said \"really?\" Yes."),
            vec!["Well...", "maybe.", "She said \"really?\"", "Yes."]
        );
        assert_eq!(run_chars("Hmm… okay."), vec!["Hmm…", "okay."]);
    }

    #[test]
    fn remainder_is_flushed_at_the_end_and_a_pending_boundary_waits_for_lookahead() {
        // Proves a trailing period is not emitted before the next char, and finish() flushes.
        let mut c = Chunker::new(ChunkerConfig::default());
        assert!(c.push("It costs 3.").is_empty());
        assert!(c.push("5 dollars").is_empty());
        assert_eq!(c.finish().as_deref(), Some("It costs 3.5 dollars"));
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn run_on_text_without_punctuation_is_cut_at_a_space() {
        // Proves a long unpunctuated reply still streams in bounded chunks.
        let text = "word ".repeat(100);
        let got = run_chars(&text);
        assert!(got.len() > 1);
        assert!(got.iter().all(|c| c.len() <= 220));
        assert_eq!(got.join(" ").split_whitespace().count(), 100);
    }

    #[test]
    fn markdown_markers_and_empty_chunks_are_dropped() {
        // Proves TTS never receives "**" or a chunk of pure punctuation.
        assert_eq!(
            run_chars("**Sure!** Here. ... ok"),
            vec!["Sure!", "Here.", "... ok"]
        );
    }

    #[test]
    fn dashes_break_clauses_after_enough_words() {
        // Proves an em dash acts as a clause break even without spaces.
        assert_eq!(
            run_chars("I was going to go—but then I did not."),
            vec!["I was going to go—", "but then I did not."]
        );
    }

    #[test]
    fn numbered_list_markers_do_not_become_chunks() {
        // Proves "1." alone (no letters) never becomes a chunk of its own.
        assert_eq!(
            run_chars("1. Call me. 2. Text me."),
            vec!["1. Call me.", "2. Text me."]
        );
    }

    #[test]
    fn japanese_reply_splits_at_fullwidth_marks_without_spaces() {
        // Proves 。！？ end a sentence and 、 a clause with no space after them, so a
        // Japanese reply streams sentence by sentence instead of panicking mid-character.
        assert_eq!(
            run_chars("こんにちは。今日はいい天気ですね！散歩に行きませんか？"),
            vec![
                "こんにちは。",
                "今日はいい天気ですね！",
                "散歩に行きませんか？"
            ]
        );
        assert_eq!(
            run_chars("「はい。」と彼は言った。"),
            vec!["「はい。」", "と彼は言った。"]
        );
        assert_eq!(
            run_chars("ええと、明日の午後三時から会議室で打ち合わせをしましょう。"),
            vec!["ええと、明日の午後三時から会議室で打ち合わせをしましょう。"],
            "a short first clause waits for enough text"
        );
        assert_eq!(
            run_chars("明日の午後三時からは、会議室で打ち合わせをしましょう。"),
            vec!["明日の午後三時からは、", "会議室で打ち合わせをしましょう。"]
        );
    }

    #[test]
    fn unpunctuated_multibyte_text_is_cut_on_character_boundaries_within_the_limit() {
        // Proves 300 characters of CJK (or accented Latin) with no punctuation and no
        // spaces stream in chunks of at most `max_chars` characters, losing nothing.
        for unit in ["日本語", "é", "한"] {
            let text = unit.repeat(300 / unit.chars().count());
            let got = run_chars(&text);
            assert!(got.len() > 1, "{unit}: {got:?}");
            assert!(got.iter().all(|c| c.chars().count() <= 220), "{unit}");
            assert_eq!(got.concat(), text, "{unit}");
            let whole = run_tokens(&[text.as_str()]);
            assert_eq!(whole.concat(), text, "{unit}: one big token");
        }
    }

    #[test]
    fn a_huge_token_is_chunked_in_linear_time() {
        // Proves one 2 MB token (a model or emulator gone wrong) is cut into bounded
        // chunks quickly: the chunker never rescans or copies the whole remainder per
        // chunk (4 s is > 50x the time it takes in a debug build).
        let text = "語".repeat(700_000);
        let started = std::time::Instant::now();
        let got = run_tokens(&[text.as_str()]);
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        assert_eq!(got.concat().len(), text.len());
        assert!(got.iter().all(|c| c.chars().count() <= 220));
    }

    use proptest::prelude::*;

    /// Text that exercises the boundaries: any character, or one of the marks and
    /// scripts the chunker treats specially.
    fn texty() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            ' ', '\n', '.', '!', '?', ',', ';', ':', '—', '…', '"', ')', '*', '_', '#', '。', '！',
            '？', '、', '，', '；', '：', '」', '）', 'a', 'Z', '1', 'é', '日', 'か', 'ก', '🙂',
            '\u{200b}', '\u{301}',
        ]);
        prop::collection::vec(prop_oneof![any::<char>(), special], 0..700)
            .prop_map(|v| v.into_iter().collect())
    }

    /// Splits `text` into tokens at the given (character) cut points.
    fn tokens_of(text: &str, cuts: &[usize]) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| c % (chars.len() + 1))
            .chain([0, chars.len()])
            .collect();
        points.sort_unstable();
        points.dedup();
        points
            .windows(2)
            .map(|w| chars[w[0]..w[1]].iter().collect())
            .collect()
    }

    proptest! {
        // 512 by default; a campaign (scripts/parser-campaign.sh) sets PROPTEST_CASES.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
        ))]

        #[test]
        fn any_unicode_reply_chunks_without_panic_losslessly_and_bounded(
            text in prop_oneof![any::<String>(), texty()],
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            max_chars in 1usize..300,
        ) {
            // Proves for arbitrary Unicode and tokenization: no panic, the raw pieces
            // concatenate back to the input exactly, each piece has at most
            // `max_chars` characters, and each spoken chunk is its piece minus only
            // whitespace and markdown markers.
            let cfg = ChunkerConfig { max_chars, ..ChunkerConfig::default() };
            let mut c = Chunker::new(cfg);
            let mut pieces = Vec::new();
            for t in tokens_of(&text, &cuts) {
                pieces.extend(c.push_raw(&t));
            }
            pieces.push(std::mem::take(&mut c.buf));
            prop_assert_eq!(pieces.concat(), text);
            for p in &pieces[..pieces.len() - 1] {
                prop_assert!(!p.is_empty());
                prop_assert!(p.chars().count() <= max_chars, "{} > {}", p.chars().count(), max_chars);
            }
            for p in &pieces {
                let kept: String = p
                    .chars()
                    .filter(|c| !c.is_whitespace() && !matches!(c, '*' | '#' | '`' | '_'))
                    .collect();
                match speakable(p) {
                    Some(spoken) => {
                        let spoken: String = spoken.chars().filter(|c| !c.is_whitespace()).collect();
                        prop_assert_eq!(spoken, kept);
                    }
                    None => prop_assert!(!kept.chars().any(char::is_alphanumeric)),
                }
            }
        }

        #[test]
        fn any_unicode_through_the_public_api_never_panics(
            tokens in prop::collection::vec(any::<String>(), 0..20),
        ) {
            // Proves push/finish accept any token sequence and every chunk they
            // return is bounded and speakable.
            let mut c = Chunker::new(ChunkerConfig::default());
            let mut out = Vec::new();
            for t in &tokens {
                out.extend(c.push(t));
            }
            out.extend(c.finish());
            for chunk in &out {
                prop_assert!(chunk.chars().any(char::is_alphanumeric));
                prop_assert!(chunk.chars().count() <= ChunkerConfig::default().max_chars);
            }
            prop_assert_eq!(out.len(), c.emitted());
        }
    }
}
