//! Phoneme, word and viseme timings (PROTOCOL.md, "Timings").
//!
//! Ask for them with [`crate::Request::timings`]; each sentence's
//! [`crate::Event::Timing`] arrives before its first audio chunk. Offsets are
//! samples of the stream's own clock (the rate `start` announced, counted from
//! the stream's first sample), so a player that counts the samples it has
//! played can ask a [`TimingTrack`] which word and viseme are current.

use serde_json::{Map, Value};

use crate::error::ProtocolError;

/// A kind of timing a request may ask for (the `timings` request key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimingKind {
    /// The voice's phonemes and pauses, tiling each sentence's audio.
    Phonemes,
    /// The words of the request's text, with their character spans.
    Words,
    /// Mouth shapes: the 15 Oculus/Meta LipSync visemes.
    Visemes,
}

impl TimingKind {
    /// The wire value: `"phonemes"`, `"words"` or `"visemes"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimingKind::Phonemes => "phonemes",
            TimingKind::Words => "words",
            TimingKind::Visemes => "visemes",
        }
    }

    /// Parse a wire value; `None` for anything else.
    pub fn parse(s: &str) -> Option<TimingKind> {
        match s {
            "phonemes" => Some(TimingKind::Phonemes),
            "words" => Some(TimingKind::Words),
            "visemes" => Some(TimingKind::Visemes),
            _ => None,
        }
    }
}

/// One phoneme (or pause: `^`, `$`, a space, punctuation), `[start, end)` in stream samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonemeSpan {
    /// First sample.
    pub start: u64,
    /// One past the last sample.
    pub end: u64,
    /// The phonemizer's symbol with its modifiers (`"ˈɑː"`).
    pub phoneme: String,
}

/// One word of the request's text, `[start, end)` in stream samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordSpan {
    /// First sample.
    pub start: u64,
    /// One past the last sample.
    pub end: u64,
    /// The word as written in the request's text.
    pub text: String,
    /// Half-open character span in the request's text (Unicode scalar values, as `Mark::end`).
    pub chars: (u64, u64),
}

/// One mouth shape (`sil`, `PP`, `FF`, `TH`, `DD`, `kk`, `CH`, `SS`, `nn`, `RR`, `aa`, `E`, `ih`, `oh`, `ou`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisemeSpan {
    /// First sample.
    pub start: u64,
    /// One past the last sample.
    pub end: u64,
    /// The viseme's name.
    pub viseme: String,
}

/// The body of a `timing` event: one list per kind the request asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Timing {
    /// Present if phonemes were asked for.
    pub phonemes: Option<Vec<PhonemeSpan>>,
    /// Present if words were asked for.
    pub words: Option<Vec<WordSpan>>,
    /// Present if visemes were asked for.
    pub visemes: Option<Vec<VisemeSpan>>,
}

fn span<'a>(kind: &str, v: &'a Value) -> Result<(u64, u64, &'a Map<String, Value>), ProtocolError> {
    let m = v
        .as_object()
        .ok_or_else(|| ProtocolError::new(format!("timing event: {kind} entries must be objects")))?;
    let start = m.get("start").and_then(Value::as_u64);
    let end = m.get("end").and_then(Value::as_u64);
    match (start, end) {
        (Some(s), Some(e)) if s <= e => Ok((s, e, m)),
        _ => Err(ProtocolError::new(format!("timing event: {kind} needs start <= end, both integers"))),
    }
}

fn text(kind: &str, m: &Map<String, Value>, key: &str) -> Result<String, ProtocolError> {
    m.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ProtocolError::new(format!("timing event: {kind}.{key} must be a string")))
}

fn entries<'a>(m: &'a Map<String, Value>, kind: &str) -> Result<Option<&'a Vec<Value>>, ProtocolError> {
    match m.get(kind) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(ProtocolError::new(format!("timing event: {kind} must be a list"))),
    }
}

impl Timing {
    pub(crate) fn from_json(m: &Map<String, Value>) -> Result<Timing, ProtocolError> {
        let mut t = Timing::default();
        if let Some(items) = entries(m, "phonemes")? {
            let mut out = Vec::with_capacity(items.len());
            for v in items {
                let (start, end, e) = span("phonemes", v)?;
                out.push(PhonemeSpan { start, end, phoneme: text("phonemes", e, "phoneme")? });
            }
            t.phonemes = Some(out);
        }
        if let Some(items) = entries(m, "words")? {
            let mut out = Vec::with_capacity(items.len());
            for v in items {
                let (start, end, e) = span("words", v)?;
                let chars = match e.get("char").and_then(Value::as_array).map(|c| c.iter().map(Value::as_u64).collect::<Vec<_>>()) {
                    Some(c) if c.len() == 2 && c[0].is_some() && c[1].is_some() && c[0] <= c[1] => (c[0].unwrap_or(0), c[1].unwrap_or(0)),
                    _ => return Err(ProtocolError::new("timing event: words.char must be [start, end]")),
                };
                out.push(WordSpan { start, end, text: text("words", e, "text")?, chars });
            }
            t.words = Some(out);
        }
        if let Some(items) = entries(m, "visemes")? {
            let mut out = Vec::with_capacity(items.len());
            for v in items {
                let (start, end, e) = span("visemes", v)?;
                out.push(VisemeSpan { start, end, viseme: text("visemes", e, "viseme")? });
            }
            t.visemes = Some(out);
        }
        Ok(t)
    }
}

/// A stream's timings, gathered as they come, answering "at played sample N, which word and viseme".
///
/// Feed it every [`crate::Event::Timing`] with [`TimingTrack::add`], and call
/// [`TimingTrack::failover`] with the samples received so far on each
/// [`crate::Event::Failover`]: the entries of the sentence cut off by the
/// failover that lie beyond them never played (the new worker speaks that
/// sentence again, with its own timing), so they are dropped.
///
/// ```
/// use tts_broker_client::{Timing, TimingTrack, VisemeSpan, WordSpan};
/// let mut track = TimingTrack::default();
/// track.add(&Timing {
///     words: Some(vec![WordSpan { start: 100, end: 200, text: "Open".into(), chars: (0, 4) }]),
///     visemes: Some(vec![VisemeSpan { start: 100, end: 200, viseme: "oh".into() }]),
///     ..Timing::default()
/// });
/// assert_eq!(track.word_at(150).map(|w| w.text.as_str()), Some("Open"));
/// assert_eq!(track.viseme_at(150), "oh");
/// assert_eq!(track.viseme_at(250), "sil");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimingTrack {
    /// Every word so far, in stream order.
    pub words: Vec<WordSpan>,
    /// Every viseme so far, in stream order.
    pub visemes: Vec<VisemeSpan>,
}

fn find<T>(items: &[T], sample: u64, bounds: impl Fn(&T) -> (u64, u64)) -> Option<&T> {
    // Entries are in stream order and do not overlap: the last one starting at or before `sample`.
    let i = items.partition_point(|e| bounds(e).0 <= sample);
    if i == 0 {
        return None;
    }
    let e = &items[i - 1];
    if sample < bounds(e).1 {
        Some(e)
    } else {
        None
    }
}

impl TimingTrack {
    /// Add one `timing` event's words and visemes.
    pub fn add(&mut self, timing: &Timing) {
        if let Some(w) = &timing.words {
            self.words.extend(w.iter().cloned());
        }
        if let Some(v) = &timing.visemes {
            self.visemes.extend(v.iter().cloned());
        }
    }

    /// Another worker took over after `received` samples: drop what lies beyond them.
    pub fn failover(&mut self, received: u64) {
        self.words.retain(|w| w.start < received);
        self.visemes.retain(|v| v.start < received);
    }

    /// The word sounding at stream sample `sample`; `None` between words.
    pub fn word_at(&self, sample: u64) -> Option<&WordSpan> {
        find(&self.words, sample, |w| (w.start, w.end))
    }

    /// The viseme at stream sample `sample`; `"sil"` where no timing covers it.
    pub fn viseme_at(&self, sample: u64) -> &str {
        find(&self.visemes, sample, |v| (v.start, v.end)).map_or("sil", |v| v.viseme.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Timing, ProtocolError> {
        match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => Timing::from_json(&m),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn kinds_round_trip() {
        for k in [TimingKind::Phonemes, TimingKind::Words, TimingKind::Visemes] {
            assert_eq!(TimingKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(TimingKind::parse("syllables"), None);
    }

    #[test]
    fn parses_a_timing_event_and_refuses_garbage() {
        let t = parse(
            r#"{"words":[{"start":1536,"end":7424,"text":"Open","char":[0,4]}],"visemes":[{"start":0,"end":1536,"viseme":"sil"}]}"#,
        )
        .expect("valid");
        assert_eq!(t.phonemes, None);
        assert_eq!(
            t.words,
            Some(vec![WordSpan { start: 1536, end: 7424, text: "Open".into(), chars: (0, 4) }])
        );
        assert_eq!(t.visemes.map(|v| v.len()), Some(1));
        assert!(parse(r#"{"words":[{"start":5,"end":4,"text":"a","char":[0,1]}]}"#).is_err());
        assert!(parse(r#"{"words":[{"start":1,"end":4,"text":"a","char":[2]}]}"#).is_err());
        assert!(parse(r#"{"phonemes":"a"}"#).is_err());
        assert!(parse(r#"{"visemes":[{"start":0,"end":1}]}"#).is_err());
    }

    #[test]
    fn track_answers_word_and_viseme_and_forgets_what_a_failover_voided() {
        let mut track = TimingTrack::default();
        track.add(
            &parse(
                r#"{"words":[{"start":100,"end":200,"text":"Open","char":[0,4]},{"start":250,"end":400,"text":"gates","char":[5,10]}],
                    "visemes":[{"start":0,"end":100,"viseme":"sil"},{"start":100,"end":200,"viseme":"oh"},{"start":200,"end":400,"viseme":"kk"}]}"#,
            )
            .expect("valid"),
        );
        assert_eq!(track.word_at(99), None);
        assert_eq!(track.word_at(100).map(|w| w.text.as_str()), Some("Open"));
        assert_eq!(track.word_at(220), None);
        assert_eq!(track.word_at(399).map(|w| w.chars), Some((5, 10)));
        assert_eq!(track.viseme_at(150), "oh");
        assert_eq!(track.viseme_at(400), "sil");
        track.failover(240);
        assert_eq!(track.words.len(), 1);
        assert_eq!(track.word_at(300), None);
        assert_eq!(track.viseme_at(300), "kk");
    }
}
