//! The JSON body of a TTS request (PROTOCOL.md, "TTS requests").

use serde_json::{Map, Value};

use crate::event::SampleFormat;
use crate::timing::TimingKind;

/// How a Piper worker decodes (the `stream` request key); other engines ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamMode {
    /// Decode by frames: first audio in constant time (workers started with
    /// `stream_mode` `auto` or `frames`).
    Frames,
    /// One sentence at a time.
    Sentence,
}

impl StreamMode {
    /// The wire value: `"frames"` or `"sentence"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamMode::Frames => "frames",
            StreamMode::Sentence => "sentence",
        }
    }

    /// Parse a wire value; `None` for anything else.
    pub fn parse(s: &str) -> Option<StreamMode> {
        match s {
            "frames" => Some(StreamMode::Frames),
            "sentence" => Some(StreamMode::Sentence),
            _ => None,
        }
    }
}

/// What to speak and how. Only `text` is required; unset options are left out
/// of the JSON so the broker applies its defaults.
///
/// ```
/// use tts_broker_client::{Request, SampleFormat};
/// let req = Request::new("Hello there.").language("en-US").format(SampleFormat::F32le).sample_rate(16000);
/// assert_eq!(req.to_json(), br#"{"format":"f32le","language":"en-US","sample_rate":16000,"text":"Hello there."}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// Text to speak: not blank, at most the broker's `max_text_chars` characters.
    pub text: String,
    /// BCP-47-like tag (`en`, `pt-BR`…); broker default `en`.
    pub language: Option<String>,
    /// A Piper voice name (`en_US-joe-medium`) or an XTTS speaker.
    pub voice: Option<String>,
    /// `"piper"` or `"xtts"`.
    pub engine: Option<String>,
    /// Broker default `s16le`.
    pub format: Option<SampleFormat>,
    /// 8000–48000 Hz; default the engine's native rate.
    pub sample_rate: Option<u32>,
    /// Audio per chunk, 10–1000 ms; by default each chunk is the audio the engine has just
    /// made (at most 1000 ms), so sizes vary (PROTOCOL.md, "Chunks").
    pub chunk_ms: Option<u32>,
    /// Timing kinds to receive as `timing` events (none when `None` or empty).
    pub timings: Option<Vec<TimingKind>>,
    /// Speaking-rate multiplier, > 0.25 and ≤ 4; broker default 1.0.
    pub speed: Option<f64>,
    /// Piper decoding mode; default the worker's.
    pub stream: Option<StreamMode>,
    /// −10–10, broker default 0: who goes first when not every stream can be served at once
    /// (PROTOCOL.md, "Priority"); a narrator at 1 is fed as if it had a second less audio in hand.
    pub priority: Option<i8>,
}

impl Request {
    /// A request to speak `text` with the broker's defaults.
    pub fn new(text: impl Into<String>) -> Request {
        Request {
            text: text.into(),
            ..Request::default()
        }
    }

    /// Set the language tag (`en`, `en-US`, `pt-BR`…).
    pub fn language(mut self, language: impl Into<String>) -> Request {
        self.language = Some(language.into());
        self
    }

    /// Set the voice: a Piper voice name or an XTTS speaker.
    pub fn voice(mut self, voice: impl Into<String>) -> Request {
        self.voice = Some(voice.into());
        self
    }

    /// Restrict to one engine (`"piper"`, `"xtts"`).
    pub fn engine(mut self, engine: impl Into<String>) -> Request {
        self.engine = Some(engine.into());
        self
    }

    /// Set the PCM sample format.
    pub fn format(mut self, format: SampleFormat) -> Request {
        self.format = Some(format);
        self
    }

    /// Set the output rate in Hz (8000–48000); the broker resamples.
    pub fn sample_rate(mut self, hz: u32) -> Request {
        self.sample_rate = Some(hz);
        self
    }

    /// Set the audio per chunk, in milliseconds (10–1000): for a player that wants blocks of one size.
    pub fn chunk_ms(mut self, ms: u32) -> Request {
        self.chunk_ms = Some(ms);
        self
    }

    /// Set the speaking-rate multiplier (> 0.25, ≤ 4).
    pub fn speed(mut self, speed: f64) -> Request {
        self.speed = Some(speed);
        self
    }

    /// Set the Piper decoding mode (the `stream` key).
    pub fn stream(mut self, mode: StreamMode) -> Request {
        self.stream = Some(mode);
        self
    }

    /// Set the priority, −10–10: each step counts as a second of audio less in hand when the
    /// worker chooses whom to feed, and a request waiting for a free worker goes before those
    /// of lower priority.
    pub fn priority(mut self, priority: i8) -> Request {
        self.priority = Some(priority);
        self
    }

    /// Ask for `timing` events of these kinds (PROTOCOL.md, "Timings"); see [`crate::TimingTrack`].
    pub fn timings(mut self, kinds: &[TimingKind]) -> Request {
        self.timings = Some(kinds.to_vec());
        self
    }

    /// The JSON object (frame 4 of the REQUEST), as a value.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("text".into(), Value::from(self.text.as_str()));
        if let Some(v) = &self.language {
            m.insert("language".into(), Value::from(v.as_str()));
        }
        if let Some(v) = &self.voice {
            m.insert("voice".into(), Value::from(v.as_str()));
        }
        if let Some(v) = &self.engine {
            m.insert("engine".into(), Value::from(v.as_str()));
        }
        if let Some(v) = self.format {
            m.insert("format".into(), Value::from(v.as_str()));
        }
        if let Some(v) = self.sample_rate {
            m.insert("sample_rate".into(), Value::from(v));
        }
        if let Some(v) = self.chunk_ms {
            m.insert("chunk_ms".into(), Value::from(v));
        }
        if let Some(v) = self.speed {
            // A non-finite speed becomes null, which the broker refuses (bad_request).
            m.insert("speed".into(), Value::from(v));
        }
        if let Some(v) = self.stream {
            m.insert("stream".into(), Value::from(v.as_str()));
        }
        if let Some(v) = self.priority {
            m.insert("priority".into(), Value::from(v));
        }
        if let Some(kinds) = &self.timings {
            if !kinds.is_empty() {
                m.insert("timings".into(), Value::from(kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>()));
            }
        }
        Value::Object(m)
    }

    /// The JSON object as UTF-8 bytes.
    pub fn to_json(&self) -> Vec<u8> {
        self.to_value().to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_encoded_only_when_some_are_asked_for() {
        let req = Request::new("Hi.").timings(&[TimingKind::Words, TimingKind::Visemes]);
        assert_eq!(req.to_json(), br#"{"text":"Hi.","timings":["words","visemes"]}"#);
        assert_eq!(Request::new("Hi.").timings(&[]).to_json(), br#"{"text":"Hi."}"#);
    }

    #[test]
    fn stream_mode_round_trips() {
        for m in [StreamMode::Frames, StreamMode::Sentence] {
            assert_eq!(StreamMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(StreamMode::parse("chunks"), None);
        assert_eq!(
            Request::new("x").stream(StreamMode::Sentence).to_json(),
            br#"{"stream":"sentence","text":"x"}"#.to_vec()
        );
    }

    #[test]
    fn minimal_request_has_only_text() {
        assert_eq!(
            Request::new("Hi \"you\"\n").to_json(),
            br#"{"text":"Hi \"you\"\n"}"#.to_vec()
        );
    }

    #[test]
    fn every_option_is_encoded() {
        let r = Request::new("héllo")
            .language("pt-BR")
            .voice("v")
            .engine("piper")
            .format(SampleFormat::S16le)
            .sample_rate(22050)
            .chunk_ms(20)
            .speed(1.5)
            .stream(StreamMode::Frames)
            .priority(-3);
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"text": "héllo", "language": "pt-BR", "voice": "v", "engine": "piper",
                               "format": "s16le", "sample_rate": 22050, "chunk_ms": 20, "speed": 1.5,
                               "stream": "frames", "priority": -3})
        );
    }
}
