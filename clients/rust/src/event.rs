//! Typed TTS stream events (PROTOCOL.md, "TTS replies").

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// PCM sample format: little-endian signed 16-bit or 32-bit IEEE float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleFormat {
    /// Signed 16-bit integers, little-endian (`"s16le"`, the broker's default).
    S16le,
    /// 32-bit IEEE floats, little-endian (`"f32le"`).
    F32le,
}

impl SampleFormat {
    /// The wire name: `"s16le"` or `"f32le"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleFormat::S16le => "s16le",
            SampleFormat::F32le => "f32le",
        }
    }

    /// Bytes per sample (2 or 4).
    pub fn sample_width(self) -> usize {
        match self {
            SampleFormat::S16le => 2,
            SampleFormat::F32le => 4,
        }
    }

    /// Parse a wire name (`"s16le"`, `"f32le"`); `None` for anything else.
    pub fn parse(s: &str) -> Option<SampleFormat> {
        match s {
            "s16le" => Some(SampleFormat::S16le),
            "f32le" => Some(SampleFormat::F32le),
            _ => None,
        }
    }
}

impl fmt::Display for SampleFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SampleFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<SampleFormat, String> {
        SampleFormat::parse(s).ok_or_else(|| format!("unknown sample format {s:?} (use s16le or f32le)"))
    }
}

/// How to play a stream's audio, from its `start` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioSpec {
    /// Hertz.
    pub sample_rate: u32,
    /// Interleaved channels (the broker sends mono: 1).
    pub channels: u16,
    /// Sample format of the PCM bytes.
    pub format: SampleFormat,
}

impl AudioSpec {
    /// Bytes per frame (one sample of every channel).
    pub fn frame_bytes(&self) -> usize {
        self.format.sample_width() * usize::from(self.channels)
    }
}

/// The worker that speaks a stream (`start.worker`, `failover.worker`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerInfo {
    /// Broker-side worker id.
    pub id: Option<String>,
    /// Operating-system process id of the synthesising process.
    pub pid: Option<u64>,
    /// Host name of the machine synthesising.
    pub host: Option<String>,
    /// The service the worker registered (`piper.en_US-joe-medium`, `xtts`…).
    pub service: Option<String>,
    /// The whole JSON object, including keys not listed above.
    pub raw: Map<String, Value>,
}

impl WorkerInfo {
    pub(crate) fn from_json(value: Option<&Value>) -> WorkerInfo {
        let raw = match value {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        WorkerInfo {
            id: str_field(&raw, "id"),
            pid: raw.get("pid").and_then(Value::as_u64),
            host: str_field(&raw, "host"),
            service: str_field(&raw, "service"),
            raw,
        }
    }
}

/// Statistics of a finished stream (the `end` event). Every field is optional
/// on the wire; [`Stats::raw`] has the whole object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    /// Samples delivered, at the output rate.
    pub samples: Option<u64>,
    /// Seconds of audio delivered.
    pub audio_s: Option<f64>,
    /// Audio chunks delivered.
    pub chunks: Option<u64>,
    /// Broker-measured time from request arrival to first audio, milliseconds.
    pub ttfa_ms: Option<f64>,
    /// Broker-measured time from request arrival to the `end`, milliseconds.
    pub total_ms: Option<f64>,
    /// Every engine that spoke, in order.
    pub engines: Vec<String>,
    /// Sentences delivered.
    pub segments: Option<u64>,
    /// Failovers during the stream.
    pub failovers: Option<u64>,
    /// Synthesis time / audio time, from the last worker.
    pub rtf: Option<f64>,
    /// The whole JSON object, including keys not listed above.
    pub raw: Map<String, Value>,
}

impl Stats {
    pub(crate) fn from_json(raw: Map<String, Value>) -> Stats {
        let engines = match raw.get("engines") {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        Stats {
            samples: raw.get("samples").and_then(Value::as_u64),
            audio_s: raw.get("audio_s").and_then(Value::as_f64),
            chunks: raw.get("chunks").and_then(Value::as_u64),
            ttfa_ms: raw.get("ttfa_ms").and_then(Value::as_f64),
            total_ms: raw.get("total_ms").and_then(Value::as_f64),
            engines,
            segments: raw.get("segments").and_then(Value::as_u64),
            failovers: raw.get("failovers").and_then(Value::as_u64),
            rtf: raw.get("rtf").and_then(Value::as_f64),
            raw,
        }
    }
}

/// One event of a TTS stream, in the order the broker sent it.
///
/// A stream yields exactly one `Start` before any `Audio`, `Audio` chunks
/// numbered 0, 1, 2… (checked by the client), `Mark`s after each sentence,
/// `Failover`s when another worker takes over, and `End` last. A FINAL
/// `error` is not an event: the stream yields [`crate::Error::Tts`].
/// Events this version does not know are skipped.
///
/// Character offsets (`Mark::end`, `Failover::resume_at`) count Unicode
/// scalar values (`text.chars()`), not bytes.
///
/// More events may be added (the enum is `#[non_exhaustive]`): keep a `_` arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// How to play what follows. `extra` holds keys not listed here.
    Start {
        /// Output rate in Hz.
        sample_rate: u32,
        /// Interleaved channels (1).
        channels: u16,
        /// Sample format of every `Audio` chunk that follows.
        format: SampleFormat,
        /// The engine speaking (`piper`, `xtts`…).
        engine: String,
        /// The voice or speaker.
        voice: String,
        /// The worker speaking.
        worker: WorkerInfo,
        /// Keys of the `start` JSON not listed above.
        extra: Map<String, Value>,
    },
    /// A chunk of little-endian PCM in the format `Start` announced; use
    /// [`Event::samples_f32`] for float samples whichever format that is.
    Audio {
        /// Sequence number: 0, 1, 2… without gaps (checked by the client).
        seq: u32,
        /// Little-endian PCM bytes, whole samples.
        pcm: Vec<u8>,
        /// The format of `pcm`, as `Start` announced it.
        format: SampleFormat,
    },
    /// Sentence `segment` has been sent in full; the next starts at character `end`.
    Mark {
        /// Sentence index, from 0.
        segment: u64,
        /// Character offset in the request's text where the next sentence starts.
        end: u64,
    },
    /// Another worker took over; it speaks the text from character `resume_at`.
    Failover {
        /// The engine taking over.
        engine: String,
        /// Its voice or speaker.
        voice: String,
        /// The worker taking over.
        worker: WorkerInfo,
        /// Why the previous worker failed the stream.
        reason: String,
        /// Character offset in the request's text it speaks from.
        resume_at: u64,
        /// Only when the request asked for timings: the kinds carried from here on
        /// (fewer than `start` announced, e.g. none after a failover to XTTS: those stopped).
        timings: Option<Vec<String>>,
    },
    /// When the sounds of the sentence(s) whose audio comes next fall, in stream samples
    /// (PROTOCOL.md, "Timings"); only for a request that asked for timings. Feed a
    /// [`crate::TimingTrack`] to know the current word and viseme while playing.
    Timing(crate::timing::Timing),
    /// The stream finished successfully.
    End {
        /// The broker's statistics.
        stats: Stats,
    },
}

impl Event {
    /// The wire name of the event (`"start"`, `"audio"`…).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::Audio { .. } => "audio",
            Event::Mark { .. } => "mark",
            Event::Failover { .. } => "failover",
            Event::Timing(_) => "timing",
            Event::End { .. } => "end",
        }
    }

    /// The samples of an `Audio` event as `f32` in [-1, 1) (16-bit samples are
    /// divided by 32768), whichever wire format was asked; `None` for other events.
    pub fn samples_f32(&self) -> Option<Vec<f32>> {
        match self {
            Event::Audio { pcm, format, .. } => Some(crate::audio::pcm_to_f32(pcm, *format)),
            _ => None,
        }
    }

    /// Append the samples of an `Audio` event to `out` as `f32` (see
    /// [`Event::samples_f32`]); returns how many were appended (0 for other events).
    pub fn extend_f32(&self, out: &mut Vec<f32>) -> usize {
        match self {
            Event::Audio { pcm, format, .. } => crate::audio::extend_f32(out, pcm, *format),
            _ => 0,
        }
    }

    /// The timing kinds a `Start` or `Failover` says the stream carries (from then on);
    /// `None` for other events and when the request asked for no timings.
    pub fn timing_kinds(&self) -> Option<Vec<String>> {
        match self {
            Event::Start { extra, .. } => extra
                .get("timings")
                .and_then(Value::as_array)
                .map(|kinds| kinds.iter().filter_map(|k| k.as_str().map(str::to_string)).collect()),
            Event::Failover { timings, .. } => timings.clone(),
            _ => None,
        }
    }

    /// The audio format of a `Start` event.
    pub fn audio_spec(&self) -> Option<AudioSpec> {
        match self {
            Event::Start {
                sample_rate,
                channels,
                format,
                ..
            } => Some(AudioSpec {
                sample_rate: *sample_rate,
                channels: *channels,
                format: *format,
            }),
            _ => None,
        }
    }
}

pub(crate) fn str_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_string)
}
