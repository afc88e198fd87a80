//! Finds listed words and patterns in text, ignoring case in any script, and
//! reports where in characters of the original text, so that a mask keeps
//! the text's length and never splits a character.

use std::ops::Range;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::{Regex, RegexBuilder};

/// The words (one automaton) and patterns of one policy, built once.
pub struct Matcher {
    words: Option<AhoCorasick>,
    longest_word: usize,
    patterns: Vec<Regex>,
}

impl Matcher {
    /// Builds the automaton over the case-folded words and compiles the
    /// patterns case-insensitively. The error names the offending entry.
    pub fn new(words: &[String], patterns: &[String]) -> Result<Self, String> {
        let mut folded = Vec::with_capacity(words.len());
        for (i, word) in words.iter().enumerate() {
            if word.is_empty() {
                return Err(format!("`words[{i}]` is empty"));
            }
            folded.push(fold(word));
        }
        // Measured after folding: a hit in the original text is never longer
        // in characters than the folded word it matched, since every
        // character folds to at least one.
        let longest_word = folded.iter().map(|w| w.chars().count()).max().unwrap_or(0);
        let words = if folded.is_empty() {
            None
        } else {
            // Leftmost-longest: of "foo" and "foobar", mask all of "foobar".
            let automaton = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&folded)
                .map_err(|e| format!("cannot build the word automaton: {e}"))?;
            Some(automaton)
        };
        let patterns = patterns
            .iter()
            .map(|p| {
                RegexBuilder::new(p)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| format!("invalid pattern `{p}`: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Matcher {
            words,
            longest_word,
            patterns,
        })
    }

    /// The longest word, in characters once case-folded.
    pub fn longest_word(&self) -> usize {
        self.longest_word
    }

    /// Whether any pattern was configured.
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Whether `text` contains any word or pattern: [`Matcher::find`]
    /// without building position maps, for blocking.
    pub fn is_match(&self, text: &str) -> bool {
        if let Some(words) = &self.words {
            if words.is_match(&fold(text)) {
                return true;
            }
        }
        self.patterns.iter().any(|p| p.is_match(text))
    }

    /// Every hit in `text`, as character ranges of `text`, sorted and with
    /// overlapping hits merged.
    pub fn find(&self, text: &str) -> Vec<Range<usize>> {
        let mut hits = Vec::new();
        if let Some(words) = &self.words {
            let (folded, starts) = fold_with_starts(text);
            for hit in words.find_iter(&folded) {
                hits.push(char_range(&starts, hit.start(), hit.end()));
            }
        }
        if !self.patterns.is_empty() {
            let starts: Vec<usize> = text.char_indices().map(|(at, _)| at).collect();
            for pattern in &self.patterns {
                // A pattern that can match nothing (`x*`) would otherwise
                // report an empty hit between every two characters.
                for hit in pattern.find_iter(text).filter(|m| !m.is_empty()) {
                    hits.push(char_range(&starts, hit.start(), hit.end()));
                }
            }
        }
        merge(hits)
    }

    /// `text` with every character of every hit replaced by `*`; `None`
    /// when there is no hit.
    pub fn mask(&self, text: &str) -> Option<String> {
        let hits = self.find(text);
        if hits.is_empty() {
            return None;
        }
        let mut masked = String::with_capacity(text.len());
        let mut hits = hits.iter().peekable();
        for (at, c) in text.chars().enumerate() {
            while hits.next_if(|hit| hit.end <= at).is_some() {}
            let hidden = hits.peek().is_some_and(|hit| hit.start <= at);
            masked.push(if hidden { '*' } else { c });
        }
        Some(masked)
    }
}

/// Lower-cases character by character (not `str::to_lowercase`, whose
/// context rule for final sigma would fold words and text differently).
fn fold(text: &str) -> String {
    text.chars().flat_map(char::to_lowercase).collect()
}

/// The folded text, and for each character of `text` the byte offset in
/// the folded text where its folding starts.
fn fold_with_starts(text: &str) -> (String, Vec<usize>) {
    let mut folded = String::with_capacity(text.len());
    let mut starts = Vec::with_capacity(text.len());
    for c in text.chars() {
        starts.push(folded.len());
        folded.extend(c.to_lowercase());
    }
    (folded, starts)
}

/// Maps the non-empty byte range `start..end` of a text whose characters
/// begin at `starts` to the characters it touches: a hit that begins or
/// ends inside one character's folding covers that whole character.
fn char_range(starts: &[usize], start: usize, end: usize) -> Range<usize> {
    let containing = |byte: usize| starts.partition_point(|&s| s <= byte) - 1;
    containing(start)..containing(end - 1) + 1
}

fn merge(mut hits: Vec<Range<usize>>) -> Vec<Range<usize>> {
    hits.sort_by_key(|hit| (hit.start, hit.end));
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(hits.len());
    for hit in hits {
        match merged.last_mut() {
            Some(last) if hit.start < last.end => last.end = last.end.max(hit.end),
            _ => merged.push(hit),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(words: &[&str], patterns: &[&str]) -> Matcher {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Matcher::new(&words, &patterns).expect("valid test matcher")
    }

    #[test]
    fn chinese_words_are_found_in_characters() {
        let m = matcher(&["敏感词", "机密"], &[]);
        let text = "这是一个敏感词和机密信息";
        assert_eq!(m.find(text), vec![4..7, 8..10]);
        assert_eq!(m.mask(text).as_deref(), Some("这是一个***和**信息"));
    }

    #[test]
    fn case_is_ignored_in_any_script() {
        let m = matcher(&["äpfel", "Secret", "ΣΟΦΊΑ"], &[]);
        assert_eq!(m.find("ÄPFEL und Äpfel"), vec![0..5, 10..15]);
        assert_eq!(m.mask("top SECRET").as_deref(), Some("top ******"));
        assert!(m.is_match("η σοφία"));
        assert!(!m.is_match("apfel"));
    }

    #[test]
    fn positions_survive_characters_that_fold_longer() {
        // "İ" lower-cases to two characters: positions after it must still
        // be those of the original text.
        let m = matcher(&["secret", "İ"], &[]);
        assert_eq!(m.find("İstanbul secret"), vec![0..1, 9..15]);
        assert_eq!(
            m.mask("İstanbul secret").as_deref(),
            Some("*stanbul ******")
        );
    }

    #[test]
    fn overlapping_hits_are_masked_once() {
        let m = matcher(&["foo", "foobar", "barbaz"], &[r"bar\d+"]);
        // Leftmost-longest prefers "foobar" to "foo"; the pattern overlaps
        // it and the two merge into one hit.
        assert_eq!(m.find("a FOOBAR42 b"), vec![2..10]);
        assert_eq!(m.mask("a FOOBAR42 b").as_deref(), Some("a ******** b"));
        // "barbaz" overlaps "foobar" in "foobarbaz": the automaton reports
        // the leftmost, and no character of either word stays readable.
        assert_eq!(m.mask("foobarbaz").as_deref(), Some("******baz"));
    }

    #[test]
    fn masks_keep_the_character_count() {
        let m = matcher(&["机密", "ÄPFEL", "naïve"], &[]);
        for text in ["机密文件", "grüne äpfel", "NAÏVE approach", "nothing here"] {
            let masked = m.mask(text).unwrap_or_else(|| text.to_string());
            assert_eq!(masked.chars().count(), text.chars().count(), "{text}");
        }
    }

    #[test]
    fn patterns_match_case_insensitively() {
        let m = matcher(&[], &[r"\b\d{3}-\d{4}\b", r"password:\s*\S+"]);
        assert_eq!(m.find("call 555-1234 now"), vec![5..13]);
        assert_eq!(
            m.mask("PASSWORD: hunter2 ok").as_deref(),
            Some("***************** ok")
        );
        assert!(m.is_match("Password:x"));
        assert_eq!(m.mask("nothing"), None);
    }

    #[test]
    fn patterns_that_match_nothing_report_nothing() {
        let m = matcher(&[], &["x*"]);
        assert_eq!(m.find("abc"), Vec::<Range<usize>>::new());
        assert_eq!(m.find("axxb"), vec![1..3]);
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        let err = Matcher::new(&["ok".into(), String::new()], &[]).err();
        assert_eq!(err.as_deref(), Some("`words[1]` is empty"));
        let err = Matcher::new(&[], &["(unclosed".into()])
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("invalid pattern `(unclosed`"), "{err}");
    }

    #[test]
    fn longest_word_is_counted_in_characters() {
        assert_eq!(matcher(&["机密", "abc"], &[]).longest_word(), 3);
        assert_eq!(matcher(&["中华人民共和国"], &[]).longest_word(), 7);
        assert_eq!(matcher(&[], &["a"]).longest_word(), 0);
    }

    #[test]
    fn thousands_of_words_find_the_planted_ones() {
        // Deterministic pseudo-random words over Latin and CJK letters.
        let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyzäöü机密敏感词数据泄露内部"
            .chars()
            .collect();
        let mut state: u64 = 0x5EED;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words: Vec<String> = (0..5_000)
            .map(|_| {
                let len = 6 + (next() % 7) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            })
            .collect();
        let m = Matcher::new(&words, &[]).expect("5,000 words build");

        // Filler of digits and spaces cannot contain any word; plant a few
        // words, upper-cased, at known character positions.
        let planted = [17, 1234, 2500, 4999];
        let mut text = String::new();
        let mut expected = Vec::new();
        let mut filler = 0u32;
        while text.len() < 4096 {
            let i = expected.len();
            if i < planted.len() && text.len() > 100 * (i + 1) * (i + 1) {
                let word = words[planted[i]].to_uppercase();
                let start = text.chars().count();
                expected.push(start..start + word.chars().count());
                text.push_str(&word);
            }
            text.push(char::from(b'0' + (filler % 10) as u8));
            if filler.is_multiple_of(7) {
                text.push(' ');
            }
            filler += 1;
        }
        assert_eq!(expected.len(), planted.len());

        assert_eq!(m.find(&text), expected);
        let masked = m.mask(&text).expect("planted words are found");
        assert_eq!(masked.chars().count(), text.chars().count());
        let stars = masked.chars().filter(|&c| c == '*').count();
        assert_eq!(stars, expected.iter().map(|r| r.len()).sum::<usize>());
    }
}
