//! One request inside the engine: its tokens, its place in the KV cache, its
//! sampler, and the incremental text with stop-string detection.

use super::request::{FinishReason, RequestId, RequestOutput, RequestParams};
use crate::error::Result;
use crate::kv_cache::BlockTable;
use crate::sampling::Sampler;
use crate::text::TextCodec;

pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt, then the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Its blocks; `table.len()` tokens of `tokens` are in the cache.
    pub table: BlockTable,
    pub params: RequestParams,
    pub sampler: Sampler,
    /// The output decoded so far (whole characters), built incrementally.
    text: String,
    /// Output tokens `prefix_offset..read_offset` are the window the next
    /// decode starts from (vLLM's incremental detokenizer): decoding it with
    /// and without the new tokens and keeping the difference costs O(window)
    /// per token, not O(output), and keeps decoders that treat a sequence's
    /// first token specially (leading spaces) consistent.
    prefix_offset: usize,
    read_offset: usize,
    /// Bytes of `text` searched for stop strings.
    searched: usize,
    /// Bytes of `text` emitted.
    emitted: usize,
    pub cached_tokens: usize,
}

impl Sequence {
    pub fn new(id: RequestId, prompt: Vec<u32>, params: RequestParams) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            table: BlockTable::new(),
            sampler: Sampler::new(params.sampling.clone()),
            params,
            text: String::new(),
            prefix_offset: 0,
            read_offset: 0,
            searched: 0,
            emitted: 0,
            cached_tokens: 0,
        }
    }

    pub fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The last output of a request that ends here without a new token.
    pub fn ended(&self, reason: FinishReason, error: Option<String>) -> RequestOutput {
        RequestOutput {
            id: self.id,
            finish: Some(reason),
            error,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.output_len(),
            ..Default::default()
        }
    }

    /// Tokens not yet in the cache.
    pub fn pending(&self) -> usize {
        self.tokens.len().saturating_sub(self.table.len())
    }

    /// Appends a sampled token; returns whether it ends the request and the
    /// text that became final.
    pub fn push(
        &mut self,
        token: u32,
        eos: &[u32],
        max_model_len: usize,
        codec: Option<&dyn TextCodec>,
    ) -> Result<(Option<FinishReason>, String)> {
        self.tokens.push(token);
        let stop_token = (!self.params.ignore_eos && eos.contains(&token))
            || self.params.stop_token_ids.contains(&token);
        let mut finish = if stop_token {
            Some(FinishReason::Stop)
        } else if self.output_len() >= self.params.max_tokens || self.tokens.len() >= max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        let Some(codec) = codec else {
            return Ok((finish, String::new()));
        };
        // a stop token adds no text
        let out_len = self.output_len() - usize::from(stop_token);
        self.detokenize(out_len, codec, finish.is_some())?;
        let text = &self.text;
        // stop strings: only where the new text can complete one
        let longest = self.params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.searched.saturating_sub(longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.searched = text.len();
        let mut end = text.len();
        if let Some(cut) = self
            .params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p))
            .min()
        {
            end = cut;
            finish = Some(FinishReason::Stop);
        } else if finish.is_none() {
            end = self.settled_end(text);
        }
        let start = self.emitted.min(end);
        let delta = text[start..end].to_string();
        self.emitted = self.emitted.max(end);
        Ok((finish, delta))
    }

    /// Decodes output tokens up to `out_len` into `text`: the window since
    /// the last decoded character, with and without the new tokens. An
    /// incomplete character (U+FFFD at the end) waits for the next token
    /// unless the request ends (`flush`).
    fn detokenize(&mut self, out_len: usize, codec: &dyn TextCodec, flush: bool) -> Result<()> {
        if out_len <= self.read_offset {
            return Ok(());
        }
        let ids = &self.tokens[self.prompt_len..self.prompt_len + out_len];
        let prefix = codec.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = codec.decode(&ids[self.prefix_offset..])?;
        if full.ends_with('\u{FFFD}') && !flush {
            return Ok(());
        }
        // the window's own text, past what it decoded to before
        let new = full.get(prefix.len()..).unwrap_or_default();
        self.text.push_str(new);
        self.prefix_offset = self.read_offset;
        self.read_offset = out_len;
        Ok(())
    }

    /// Where the text stops being final: before an incomplete character
    /// (U+FFFD at the end) and before a tail that may still grow into a
    /// stop string.
    fn settled_end(&self, text: &str) -> usize {
        let mut end = text.trim_end_matches('\u{FFFD}').len();
        let longest = self.params.stop.iter().map(String::len).max().unwrap_or(0);
        let lo = end.saturating_sub(longest.saturating_sub(1));
        for i in lo..end {
            if !text.is_char_boundary(i) {
                continue;
            }
            let tail = &text[i..end];
            if self.params.stop.iter().any(|s| s.starts_with(tail)) {
                end = i;
                break;
            }
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One character per token: token t decodes to char `b'a' + t`, and
    /// token 30 is half of a two-byte character until token 31 follows.
    struct Chars;
    impl TextCodec for Chars {
        fn encode(&self, _: &str) -> Result<Vec<u32>> {
            Ok(vec![])
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let mut s = String::new();
            let mut i = 0;
            while i < ids.len() {
                if ids[i] == 30 {
                    s.push(if ids.get(i + 1) == Some(&31) {
                        'é'
                    } else {
                        '\u{FFFD}'
                    });
                    i += 2;
                    continue;
                }
                s.push((b'a' + ids[i] as u8) as char);
                i += 1;
            }
            Ok(s)
        }
    }

    fn feed(stop: &[&str], toks: &[u32]) -> (Vec<String>, Option<FinishReason>) {
        let mut s = Sequence::new(
            1,
            vec![0],
            RequestParams {
                max_tokens: 100,
                stop: stop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        );
        let mut deltas = vec![];
        for &t in toks {
            let (f, d) = s.push(t, &[25], 1000, Some(&Chars)).unwrap();
            deltas.push(d);
            if f.is_some() {
                return (deltas, f);
            }
        }
        (deltas, None)
    }

    #[test]
    fn stop_strings_split_across_tokens_are_held_back_then_cut() {
        // "a b c d" with stop "cd": "c" waits, then the stop cuts it
        let (d, f) = feed(&["cd"], &[0, 1, 2, 3, 4]);
        assert_eq!(d, vec!["a", "b", "", ""]);
        assert_eq!(f, Some(FinishReason::Stop));
        // "c" then "e": the held "c" is released with "e"
        let (d, f) = feed(&["cd"], &[2, 4]);
        assert_eq!((d, f), (vec!["".to_string(), "ce".to_string()], None));
        // an incomplete character waits for its second half
        let (d, _) = feed(&[], &[0, 30, 31]);
        assert_eq!(d, vec!["a", "", "é"]);
        // EOS (25) ends with Stop and adds no text
        let (d, f) = feed(&[], &[0, 25]);
        assert_eq!(
            (d, f),
            (
                vec!["a".to_string(), String::new()],
                Some(FinishReason::Stop)
            )
        );
    }

    /// Token by token, the deltas add up to the whole output decoded at
    /// once: the Qwen byte-level tokenizer splits emoji and CJK characters
    /// across tokens, and the test codec's two-token character too.
    #[test]
    fn incremental_text_equals_the_whole_decode() {
        use crate::text::HfTokenizer;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tiny-qwen2-moe/tokenizer.json");
        let tok = HfTokenizer::from_file(std::path::Path::new(path)).unwrap();
        let text = "Grüße 😀🎉 中文字符 and   spaces\n\ttabs — “quotes” 12345 ½ ĀĒĪŌŪ".repeat(8);
        let ids = tok.encode(&text).unwrap();
        assert!(ids.len() > 200, "{}", ids.len());
        let mut s = Sequence::new(
            1,
            vec![0],
            RequestParams {
                max_tokens: ids.len(),
                ..Default::default()
            },
        );
        let mut got = String::new();
        for (i, &t) in ids.iter().enumerate() {
            let (f, d) = s.push(t, &[], 100_000, Some(&tok)).unwrap();
            got.push_str(&d);
            assert_eq!(f.is_some(), i + 1 == ids.len());
        }
        assert_eq!(got, text);
        // the test codec, with its split character at random places
        let mut toks = vec![];
        for i in 0..60u32 {
            toks.extend(if i % 7 == 3 {
                vec![30, 31]
            } else {
                vec![i % 20]
            });
        }
        let (d, _) = feed(&[], &toks);
        assert_eq!(d.concat(), Chars.decode(&toks).unwrap());
    }
}
