//! Text to token ids and back: bytes as tokens by default, or any Hugging
//! Face `tokenizer.json` through the `tokenizers` crate (the library
//! `transformers` itself uses, so ids agree exactly).

use std::path::{Path, PathBuf};

pub enum Tokenizer {
    /// Each byte is a token (vocabularies of at least 256).
    Bytes,
    /// A `tokenizer.json`, and the id that pads a batch.
    Hf { tokenizer: Box<tokenizers::Tokenizer>, pad: usize },
}

impl Tokenizer {
    /// Reads a `tokenizer.json`. The padding and truncation it may carry
    /// (sentence-transformers' files pad every text to 128 tokens and cut
    /// it there) are turned off: callers pad batches with a mask of their
    /// own and truncate where the model needs it ([`Tokenizer::truncate`]),
    /// as `transformers` does when it is called with `padding=True`.
    pub fn open(path: Option<&Path>) -> Result<Tokenizer, String> {
        let Some(p) = path else { return Ok(Tokenizer::Bytes) };
        let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read the tokenizer {}: {e}", p.display()))?;
        // The tokenizers crate panics on some malformed files (an unwrap in
        // its decoders' and normalizers' deserialisers): a panic is taken as
        // the error it is, and a file that is not JSON at all is named with
        // the line and column where it stops being JSON.
        let mut t = match without_panics(|| text.parse::<tokenizers::Tokenizer>()) {
            Some(Ok(t)) => t,
            failed => {
                if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                    return Err(format!("the tokenizer {} is not valid JSON: {e}", p.display()));
                }
                let why = match failed {
                    Some(Err(e)) => e.to_string(),
                    _ => "its contents are not a tokenizer the tokenizers library reads".into(),
                };
                return Err(format!("cannot read the tokenizer {}: {why}", p.display()));
            }
        };
        let pad = t
            .get_padding()
            .map(|p| p.pad_id as usize)
            .or_else(|| t.token_to_id("[PAD]").or_else(|| t.token_to_id("<pad>")).map(|i| i as usize))
            .unwrap_or(0);
        t.with_padding(None);
        t.with_truncation(None).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Tokenizer::Hf { tokenizer: Box::new(t), pad })
    }

    /// Cuts every later encoding to `max_len` tokens, special tokens
    /// included (the end of the text goes; `[SEP]` stays).
    pub fn truncate(&mut self, max_len: usize) -> Result<(), String> {
        if let Tokenizer::Hf { tokenizer, .. } = self {
            let params = tokenizers::TruncationParams { max_length: max_len, ..Default::default() };
            tokenizer.with_truncation(Some(params)).map_err(|e| format!("cannot truncate to {max_len}: {e}"))?;
        }
        Ok(())
    }

    /// `--tokenizer`, else a `tokenizer.json` beside (or in) the weights.
    pub fn find(flag: Option<&Path>, weights: Option<&Path>) -> Option<PathBuf> {
        if let Some(f) = flag {
            return Some(f.to_path_buf());
        }
        let w = weights?;
        let dir = if w.is_dir() { w } else { w.parent()? };
        let candidate = dir.join("tokenizer.json");
        candidate.exists().then_some(candidate)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<usize>, String> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(usize::from).collect()),
            Tokenizer::Hf { tokenizer, .. } => tokenizer
                .encode(text, true)
                .map(|e| e.get_ids().iter().map(|i| *i as usize).collect())
                .map_err(|e| format!("cannot tokenize the text: {e}")),
        }
    }

    /// The byte span in `text` of each of its tokens, special tokens left
    /// out and nothing cut (to split a document into passages by tokens).
    pub fn spans(&self, text: &str) -> Result<Vec<(usize, usize)>, String> {
        match self {
            Tokenizer::Bytes => Ok((0..text.len()).map(|i| (i, i + 1)).collect()),
            Tokenizer::Hf { tokenizer, .. } => {
                let mut whole = (**tokenizer).clone();
                whole.with_truncation(None).map_err(|e| e.to_string())?;
                let encoding = whole.encode(text, false).map_err(|e| format!("cannot tokenize the text: {e}"))?;
                Ok(encoding.get_offsets().iter().copied().filter(|(a, b)| b > a).collect())
            }
        }
    }

    /// The bytes of the text `ids` stand for.
    pub fn decode(&self, ids: &[usize]) -> Vec<u8> {
        match self {
            Tokenizer::Bytes => ids.iter().map(|t| *t as u8).collect(),
            Tokenizer::Hf { tokenizer, .. } => {
                let ids: Vec<u32> = ids.iter().map(|i| *i as u32).collect();
                tokenizer.decode(&ids, false).unwrap_or_default().into_bytes()
            }
        }
    }

    /// The id that pads a batch: the tokenizer's own padding token, else 0.
    pub fn pad_id(&self) -> usize {
        match self {
            Tokenizer::Bytes => 0,
            Tokenizer::Hf { pad, .. } => *pad,
        }
    }

    /// The id of `token` (`[MASK]`), if the tokenizer has it.
    pub fn id_of(&self, token: &str) -> Option<usize> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf { tokenizer, .. } => tokenizer.token_to_id(token).map(|i| i as usize),
        }
    }

    /// The ids of the special tokens (`[CLS]`, `[SEP]`, `[PAD]`, ...).
    pub fn special_ids(&self) -> Vec<usize> {
        match self {
            Tokenizer::Bytes => Vec::new(),
            Tokenizer::Hf { tokenizer, .. } => {
                let mut ids: Vec<usize> = (tokenizer.get_added_tokens_decoder().iter())
                    .filter(|(_, t)| t.special)
                    .map(|(id, _)| *id as usize)
                    .collect();
                ids.sort();
                ids
            }
        }
    }

    pub fn vocab_size(&self) -> Option<usize> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf { tokenizer, .. } => Some(tokenizer.get_vocab_size(true)),
        }
    }
}

/// Prints generated text as tokens arrive. A multi-token character (or an
/// incomplete UTF-8 sequence of byte tokens) is held back until it is whole.
pub struct Stream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<usize>,
    printed: usize,
}

impl<'a> Stream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Stream<'a> {
        Stream { tokenizer, ids: Vec::new(), printed: 0 }
    }

    /// The new text that `id` completes.
    pub fn push(&mut self, id: usize) -> Vec<u8> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids);
        let whole = match std::str::from_utf8(&text[self.printed..]) {
            Ok(s) if !s.ends_with('\u{FFFD}') => text.len(),
            Ok(_) => self.printed,
            Err(e) if e.error_len().is_none() => self.printed + e.valid_up_to(),
            Err(_) => text.len(),
        };
        let new = text[self.printed..whole].to_vec();
        self.printed = whole;
        new
    }

    /// Whatever is still held back at the end.
    pub fn finish(&mut self) -> Vec<u8> {
        let text = self.tokenizer.decode(&self.ids);
        let rest = text[self.printed.min(text.len())..].to_vec();
        self.printed = text.len();
        rest
    }
}

/// `f`'s result, or `None` where it panicked, without the panic's message
/// (the caller says what failed).
fn without_panics<R>(f: impl FnOnce() -> R) -> Option<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    std::panic::set_hook(hook);
    out
}
