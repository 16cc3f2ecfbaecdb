//! LLM token stream -> speakable chunks for TTS.
//!
//! The first chunk is cut early (a clause of a few words) so the first audio leaves
//! while the model is still writing; later chunks end at sentences or longer clauses,
//! which sound better. A boundary is only decided once the character *after* the
//! punctuation is known, so "3.14", "$1,000", "10:30", "e.g." and URLs never split.

/// Chunking thresholds.
#[derive(Clone, Debug)]
pub struct ChunkerConfig {
    /// Words needed before a clause break (`,` `;` `:` dash) may end the first chunk.
    pub first_clause_min_words: usize,
    /// Words needed before a clause break may end a later chunk.
    pub clause_min_words: usize,
    /// A chunk with no boundary at all is cut at the last space past this many bytes,
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
        self.buf.push_str(token);
        let mut out = Vec::new();
        while let Some(end) = self.find_boundary() {
            let rest = self.buf.split_off(end);
            let chunk = std::mem::replace(&mut self.buf, rest);
            if let Some(c) = speakable(&chunk) {
                self.emitted += 1;
                out.push(c);
            }
        }
        out
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

    /// Byte index just past the first decided boundary in the buffer.
    fn find_boundary(&self) -> Option<usize> {
        let s = self.buf.as_str();
        let chars: Vec<(usize, char)> = s.char_indices().collect();
        let clause_min = if self.emitted == 0 {
            self.cfg.first_clause_min_words
        } else {
            self.cfg.clause_min_words
        };
        let mut i = 0;
        while i < chars.len() {
            let (pos, c) = chars[i];
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
                while j + 1 < chars.len()
                    && (is_sentence_punct(chars[j + 1].1) || is_closer(chars[j + 1].1))
                {
                    j += 1;
                }
                let Some(&(_, next)) = chars.get(j + 1) else {
                    return None; // undecided until the next character arrives
                };
                if next.is_whitespace() {
                    let end = chars[j].0 + chars[j].1.len_utf8();
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
                let decided = match (c, next) {
                    (_, None) => return None,
                    // Dashes break with or without spaces ("well—maybe").
                    ('—' | '–', Some(_)) => true,
                    (_, Some(n)) => n.is_whitespace(),
                };
                if decided && word_count(&s[..end]) >= clause_min {
                    return Some(end);
                }
            }
            i += 1;
        }
        if s.len() > self.cfg.max_chars {
            // No punctuation for a long stretch: cut at the last space so it still streams.
            let cut = s[..self.cfg.max_chars].rfind(' ')?;
            if cut > 0 {
                return Some(cut + 1);
            }
        }
        None
    }
}

fn is_sentence_punct(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…')
}

fn is_closer(c: char) -> bool {
    // `*` and `_` close markdown emphasis ("**Sure!**").
    matches!(c, '"' | '\'' | ')' | ']' | '”' | '’' | '»' | '*' | '_')
}

fn is_clause_punct(c: char) -> bool {
    matches!(c, ',' | ';' | ':' | '—' | '–')
}

fn has_letter(s: &str) -> bool {
    s.chars().any(char::is_alphabetic)
}

fn word_count(s: &str) -> usize {
    s.split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count()
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
}
