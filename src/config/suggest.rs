//! "Did you mean": the closest known word to a misspelled one, by edit distance.

/// Edit distance (Levenshtein) between two words, counted in characters.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a third of the word's length (at least 2 edits allowed).
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.len() / 3).max(2);
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

/// `; did you mean `x`?` when there is a close candidate, else nothing.
pub fn hint(word: &str, candidates: &[&str]) -> String {
    did_you_mean(word, candidates)
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("prefil", "prefill"), 1);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("abc", ""), 3);
        // Characters, not bytes.
        assert_eq!(levenshtein("é", "e"), 1);
    }

    #[test]
    fn suggests_only_close_words() {
        let known = ["prefill", "decode", "dual", "scheduling"];
        assert_eq!(did_you_mean("prefil", &known), Some("prefill"));
        assert_eq!(did_you_mean("decodes", &known), Some("decode"));
        assert_eq!(did_you_mean("schedulling", &known), Some("scheduling"));
        assert_eq!(did_you_mean("frobnicate", &known), None);
        assert_eq!(hint("frobnicate", &known), "");
        assert_eq!(hint("dua", &known), "; did you mean `dual`?");
    }
}
