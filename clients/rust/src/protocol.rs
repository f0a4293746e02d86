//! MDP/0.2 client framing and the TTS event layer, without sockets.
//!
//! Everything here is pure: encode a request into frames, decode a reply's
//! frames, parse an event, and check a stream's order ([`StreamTracker`]).
//! No function panics on input from the wire; malformed input is a
//! [`ProtocolError`].

use serde_json::{Map, Value};

use crate::error::{Error, ErrorCode, ProtocolError};
use crate::event::{str_field, AudioSpec, Event, SampleFormat, Stats, WorkerInfo};

/// Frame 0 of every client command.
pub const CLIENT_HEADER: &[u8] = b"MDPC02";
/// REQUEST (client → broker).
pub const REQUEST: u8 = 0x01;
/// PARTIAL (broker → client).
pub const PARTIAL: u8 = 0x02;
/// FINAL (broker → client).
pub const FINAL: u8 = 0x03;

/// The TTS front door.
pub const TTS_SERVICE: &str = "tts";
/// Cancel one of your streams.
pub const CANCEL_SERVICE: &str = "tts.cancel";
/// JSON status of services and workers.
pub const STATUS_SERVICE: &str = "tts.status";
/// RFC 8 service discovery.
pub const MMI_SERVICE: &str = "mmi.service";

/// Longest request id and service name, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Frames of a message.
pub type Frames = Vec<Vec<u8>>;

/// Check a service name: printable ASCII without spaces, 1–255 bytes.
pub fn check_service_name(name: &[u8]) -> Result<(), ProtocolError> {
    if name.is_empty() || name.len() > MAX_ID_BYTES {
        return Err(ProtocolError::new("service name must be 1-255 bytes"));
    }
    if !name.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ProtocolError::new(
            "service name must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Encode a REQUEST: `"MDPC02", 0x01, service, body...`.
pub fn encode_request(service: &str, body: &[&[u8]]) -> Frames {
    let mut frames = Vec::with_capacity(3 + body.len());
    frames.push(CLIENT_HEADER.to_vec());
    frames.push(vec![REQUEST]);
    frames.push(service.as_bytes().to_vec());
    frames.extend(body.iter().map(|f| f.to_vec()));
    frames
}

/// Encode a TTS request: `"MDPC02", 0x01, service, request id, JSON`.
pub fn encode_tts_request(service: &str, request_id: &[u8], json: &[u8]) -> Frames {
    encode_request(service, &[request_id, json])
}

/// Encode the cancel of one stream: `"MDPC02", 0x01, "tts.cancel", request id`.
pub fn encode_cancel(request_id: &[u8]) -> Frames {
    encode_request(CANCEL_SERVICE, &[request_id])
}

/// A decoded broker → client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The service name the request used (frame 2).
    pub service: String,
    /// FINAL (true) or PARTIAL (false).
    pub is_final: bool,
    /// Frames 3 and later.
    pub body: Frames,
}

/// Decode a broker → client message: `"MDPC02", 0x02|0x03, service, body...`.
pub fn decode_reply(mut frames: Frames) -> Result<Reply, ProtocolError> {
    if frames.len() < 3 {
        return Err(ProtocolError::new(format!(
            "reply has {} frames; at least 3 expected",
            frames.len()
        )));
    }
    if frames[0] != CLIENT_HEADER {
        return Err(ProtocolError::new(
            "not an MDP/0.2 client reply (frame 0 is not MDPC02)",
        ));
    }
    let is_final = match frames[1].as_slice() {
        [PARTIAL] => false,
        [FINAL] => true,
        _ => {
            return Err(ProtocolError::new(
                "reply command must be PARTIAL (0x02) or FINAL (0x03)",
            ))
        }
    };
    check_service_name(&frames[2])?;
    let body = frames.split_off(3);
    let service =
        String::from_utf8(frames.swap_remove(2)).map_err(|_| ProtocolError::new("service name is not ASCII"))?;
    Ok(Reply {
        service,
        is_final,
        body,
    })
}

/// A reply body split into request id, event name and the frames after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFrames {
    /// Frame 3: the request id.
    pub request_id: Vec<u8>,
    /// Frame 4: the event name (`start`, `audio`…).
    pub name: Vec<u8>,
    /// Frames 5 and later.
    pub args: Frames,
}

/// Split a TTS reply body (`request id, event, ...`).
pub fn split_event(mut body: Frames) -> Result<EventFrames, ProtocolError> {
    if body.len() < 2 {
        return Err(ProtocolError::new("event body needs a request id and an event name"));
    }
    let args = body.split_off(2);
    let name = body.pop().unwrap_or_default();
    let request_id = body.pop().unwrap_or_default();
    Ok(EventFrames { request_id, name, args })
}

/// What a reply carries for a stream, before ordering checks.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WireEvent {
    /// A known event.
    Event(Event),
    /// The FINAL `error` event.
    Error {
        /// The error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// An event this version does not know (ignored when PARTIAL).
    Unknown {
        /// Its name, lossily decoded.
        name: String,
        /// Frames 5 and later.
        args: Frames,
    },
}

fn one_json_object(name: &str, args: &[Vec<u8>]) -> Result<Map<String, Value>, ProtocolError> {
    if args.len() != 1 {
        return Err(ProtocolError::new(format!(
            "{name} event needs exactly one JSON frame, got {}",
            args.len()
        )));
    }
    match serde_json::from_slice::<Value>(&args[0]) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ProtocolError::new(format!("{name} event: JSON is not an object"))),
        Err(e) => Err(ProtocolError::new(format!("{name} event: invalid JSON: {e}"))),
    }
}

fn required_u64(name: &str, m: &Map<String, Value>, key: &str) -> Result<u64, ProtocolError> {
    m.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| ProtocolError::new(format!("{name} event: {key:?} must be a non-negative integer")))
}

/// Parse one event from its name and argument frames.
pub fn parse_event(name: &[u8], args: Frames) -> Result<WireEvent, ProtocolError> {
    let event = match name {
        b"start" => {
            let mut m = one_json_object("start", &args)?;
            let sample_rate = u32::try_from(required_u64("start", &m, "sample_rate")?)
                .ok()
                .filter(|r| *r > 0)
                .ok_or_else(|| ProtocolError::new("start event: sample_rate out of range"))?;
            let channels = match m.get("channels") {
                None => 1,
                Some(v) => v
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .filter(|c| *c > 0)
                    .ok_or_else(|| ProtocolError::new("start event: channels must be a positive integer"))?,
            };
            let format = m
                .get("format")
                .and_then(Value::as_str)
                .and_then(SampleFormat::parse)
                .ok_or_else(|| ProtocolError::new("start event: format must be s16le or f32le"))?;
            let engine = str_field(&m, "engine").unwrap_or_default();
            let voice = str_field(&m, "voice").unwrap_or_default();
            let worker = WorkerInfo::from_json(m.get("worker"));
            for key in ["sample_rate", "channels", "format", "engine", "voice", "worker"] {
                m.remove(key);
            }
            Event::Start {
                sample_rate,
                channels,
                format,
                engine,
                voice,
                worker,
                extra: m,
            }
        }
        b"audio" => {
            if args.len() != 2 {
                return Err(ProtocolError::new(format!(
                    "audio event needs a sequence frame and a PCM frame, got {} frames",
                    args.len()
                )));
            }
            let mut args = args;
            let pcm = args.pop().unwrap_or_default();
            let seq_frame = args.pop().unwrap_or_default();
            let seq: [u8; 4] = seq_frame.as_slice().try_into().map_err(|_| {
                ProtocolError::new(format!("audio sequence frame must be 4 bytes, got {}", seq_frame.len()))
            })?;
            // The format is the stream's: [`StreamTracker`] sets it from `start`.
            Event::Audio {
                seq: u32::from_be_bytes(seq),
                pcm,
                format: SampleFormat::S16le,
            }
        }
        b"mark" => {
            let m = one_json_object("mark", &args)?;
            Event::Mark {
                segment: required_u64("mark", &m, "segment")?,
                end: required_u64("mark", &m, "end")?,
            }
        }
        b"failover" => {
            let m = one_json_object("failover", &args)?;
            Event::Failover {
                engine: str_field(&m, "engine").unwrap_or_default(),
                voice: str_field(&m, "voice").unwrap_or_default(),
                worker: WorkerInfo::from_json(m.get("worker")),
                reason: str_field(&m, "reason").unwrap_or_default(),
                resume_at: required_u64("failover", &m, "resume_at")?,
                timings: m
                    .get("timings")
                    .and_then(Value::as_array)
                    .map(|kinds| kinds.iter().filter_map(|k| k.as_str().map(str::to_string)).collect()),
            }
        }
        b"timing" => Event::Timing(crate::timing::Timing::from_json(&one_json_object("timing", &args)?)?),
        b"end" => Event::End {
            stats: Stats::from_json(one_json_object("end", &args)?),
        },
        b"error" => {
            let m = one_json_object("error", &args)?;
            let code = m.get("code").and_then(Value::as_str).unwrap_or("internal");
            return Ok(WireEvent::Error {
                code: ErrorCode::parse(code),
                message: str_field(&m, "message").unwrap_or_default(),
            });
        }
        other => {
            return Ok(WireEvent::Unknown {
                name: String::from_utf8_lossy(other).into_owned(),
                args,
            });
        }
    };
    Ok(WireEvent::Event(event))
}

/// What the broker answered to a `tts.cancel` (PROTOCOL.md, "Cancel").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The stream was in flight and is now cancelled (it ends with `cancelled`).
    Cancelled,
    /// No stream with that id was in flight (it had already ended, or never existed).
    Unknown,
}

/// Decode the body of a `tts.cancel` FINAL: `[request id, "cancelled" | "unknown"]`.
pub fn decode_cancel_reply(body: &[Vec<u8>]) -> Result<(Vec<u8>, CancelOutcome), ProtocolError> {
    match body {
        [rid, outcome] => {
            let outcome = match outcome.as_slice() {
                b"cancelled" => CancelOutcome::Cancelled,
                b"unknown" => CancelOutcome::Unknown,
                other => {
                    return Err(ProtocolError::new(format!(
                        "tts.cancel reply: unknown outcome {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            };
            Ok((rid.clone(), outcome))
        }
        _ => Err(ProtocolError::new(format!(
            "tts.cancel reply has {} body frames; 2 expected",
            body.len()
        ))),
    }
}

/// An RFC 8 `mmi.service` answer (PROTOCOL.md, "`mmi.service`").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceStatus {
    /// `"200"`: at least one live worker serves it (for `tts`: a request could be routed now).
    Ready,
    /// `"404"`: no live worker serves it now (it may come).
    NotReady,
    /// `"501"`: an `mmi.*` service the broker does not implement.
    NotImplemented,
    /// Any other answer, verbatim.
    Other(String),
}

impl ServiceStatus {
    /// Decode the FINAL body of an `mmi.service` reply.
    pub fn from_body(body: &[Vec<u8>]) -> ServiceStatus {
        match body.first().map(Vec::as_slice) {
            Some(b"200") => ServiceStatus::Ready,
            Some(b"404") => ServiceStatus::NotReady,
            Some(b"501") => ServiceStatus::NotImplemented,
            Some(other) => ServiceStatus::Other(String::from_utf8_lossy(other).into_owned()),
            None => ServiceStatus::Other(String::new()),
        }
    }

    /// True for [`ServiceStatus::Ready`].
    pub fn is_ready(&self) -> bool {
        matches!(self, ServiceStatus::Ready)
    }
}

/// The broker's own FINAL for an opaque request it had to end
/// (PROTOCOL.md, "Opaque services"): two frames, `"error"` and a JSON
/// `{"code", "message"}`. `None` for any other body.
pub fn decode_opaque_error(body: &[Vec<u8>]) -> Option<(ErrorCode, String)> {
    match body {
        [name, json] if name.as_slice() == b"error" => match serde_json::from_slice::<Value>(json) {
            Ok(Value::Object(m)) => {
                let code = m.get("code").and_then(Value::as_str)?;
                Some((ErrorCode::parse(code), str_field(&m, "message").unwrap_or_default()))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Checks one stream's events in arrival order and turns them into what the
/// stream yields: exactly one `start` before audio, audio numbered from 0
/// without gaps and in whole samples, `end`/`error` last.
///
/// The first problem finishes the stream with an error; after that (or after
/// the FINAL) everything for the stream is ignored.
#[derive(Debug, Clone, Default)]
pub struct StreamTracker {
    next_seq: u32,
    spec: Option<AudioSpec>,
    finished: bool,
}

impl StreamTracker {
    /// A tracker for a stream that has received nothing yet.
    pub fn new() -> StreamTracker {
        StreamTracker::default()
    }

    /// True once the stream has its last item (FINAL or a client-side error).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The audio format announced by `start`, once it arrived.
    pub fn audio_spec(&self) -> Option<AudioSpec> {
        self.spec
    }

    /// End the stream from outside (timeout, lost connection): ignore what follows.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Next expected audio sequence number.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Accept one decoded reply for this stream. `None`: nothing to yield
    /// (an unknown PARTIAL, or the stream is already finished).
    pub fn accept(&mut self, is_final: bool, event: Result<WireEvent, ProtocolError>) -> Option<Result<Event, Error>> {
        if self.finished {
            return None;
        }
        let item = self.check(is_final, event);
        if is_final || matches!(item, Some(Err(_))) || matches!(item, Some(Ok(Event::End { .. }))) {
            self.finished = true;
        }
        item
    }

    fn check(&mut self, is_final: bool, event: Result<WireEvent, ProtocolError>) -> Option<Result<Event, Error>> {
        let event = match event {
            Err(e) => return Some(Err(e.into())),
            Ok(WireEvent::Error { code, message }) => return Some(Err(Error::Tts { code, message })),
            Ok(WireEvent::Unknown { name, .. }) => {
                if is_final {
                    return Some(Err(ProtocolError::new(format!(
                        "stream ended with unknown event {name:?}"
                    ))
                    .into()));
                }
                return None;
            }
            Ok(WireEvent::Event(event)) => event,
        };
        let protocol = |m: String| Some(Err(Error::Protocol(ProtocolError::new(m))));
        if is_final && !matches!(event, Event::End { .. }) {
            return protocol(format!("{} event arrived as FINAL", event.name()));
        }
        match &event {
            Event::Start { .. } => {
                if self.spec.is_some() {
                    return protocol("second start event".into());
                }
                self.spec = event.audio_spec();
            }
            Event::Audio { seq, pcm, .. } => {
                let spec = match self.spec {
                    Some(spec) => spec,
                    None => return protocol("audio before start".into()),
                };
                if *seq != self.next_seq {
                    return Some(Err(Error::SequenceGap {
                        expected: self.next_seq,
                        got: *seq,
                    }));
                }
                if pcm.len() % spec.frame_bytes() != 0 {
                    return protocol(format!(
                        "audio chunk of {} bytes is not whole {} samples",
                        pcm.len(),
                        spec.format
                    ));
                }
                self.next_seq = match self.next_seq.checked_add(1) {
                    Some(n) => n,
                    None => return protocol("audio sequence number overflow".into()),
                };
            }
            Event::End { .. } if !is_final => return protocol("end event arrived as PARTIAL".into()),
            _ => {}
        }
        let mut event = event;
        if let (Event::Audio { format, .. }, Some(spec)) = (&mut event, self.spec) {
            *format = spec.format;
        }
        Some(Ok(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_cancel_replies() {
        assert_eq!(
            decode_cancel_reply(&f(&[b"r1", b"cancelled"])).unwrap(),
            (b"r1".to_vec(), CancelOutcome::Cancelled)
        );
        assert_eq!(
            decode_cancel_reply(&f(&[b"r2", b"unknown"])).unwrap(),
            (b"r2".to_vec(), CancelOutcome::Unknown)
        );
        assert!(decode_cancel_reply(&f(&[b"r2", b"maybe"])).is_err());
        assert!(decode_cancel_reply(&f(&[b"r2"])).is_err());
    }

    #[test]
    fn mmi_answers_tell_404_from_501() {
        assert_eq!(ServiceStatus::from_body(&f(&[b"200"])), ServiceStatus::Ready);
        assert_eq!(ServiceStatus::from_body(&f(&[b"404"])), ServiceStatus::NotReady);
        assert_eq!(ServiceStatus::from_body(&f(&[b"501"])), ServiceStatus::NotImplemented);
        assert_eq!(
            ServiceStatus::from_body(&f(&[b"418"])),
            ServiceStatus::Other("418".into())
        );
        assert_eq!(ServiceStatus::from_body(&[]), ServiceStatus::Other(String::new()));
        assert!(ServiceStatus::Ready.is_ready() && !ServiceStatus::NotImplemented.is_ready());
    }

    #[test]
    fn decodes_the_brokers_opaque_error_final() {
        assert_eq!(
            decode_opaque_error(&f(&[b"error", br#"{"code":"timeout","message":"waited 10 s"}"#])),
            Some((ErrorCode::Timeout, "waited 10 s".to_string()))
        );
        assert_eq!(decode_opaque_error(&f(&[b"error", b"not json"])), None);
        assert_eq!(decode_opaque_error(&f(&[b"error", br#"{"message":"x"}"#])), None);
        assert_eq!(decode_opaque_error(&f(&[b"result", b"{}"])), None);
        assert_eq!(decode_opaque_error(&f(&[b"error"])), None);
    }

    #[test]
    fn audio_events_carry_the_announced_format() {
        let mut t = StreamTracker::new();
        let f32_start: &[u8] = br#"{"sample_rate":24000,"channels":1,"format":"f32le"}"#;
        t.accept(false, parse(b"start", &[f32_start]));
        match t.accept(false, audio(0, &0.5f32.to_le_bytes())) {
            Some(Ok(
                ev @ Event::Audio {
                    format: SampleFormat::F32le,
                    ..
                },
            )) => {
                assert_eq!(ev.samples_f32(), Some(vec![0.5]))
            }
            other => panic!("{other:?}"),
        }
    }

    fn f(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    fn start_json() -> &'static [u8] {
        br#"{"sample_rate":22050,"channels":1,"format":"s16le","engine":"piper","voice":"en_US-joe-medium","worker":{"id":"w/1","pid":4242,"host":"box","service":"piper.en_US-joe-medium"},"new_key":7}"#
    }

    fn parse(name: &[u8], args: &[&[u8]]) -> Result<WireEvent, ProtocolError> {
        parse_event(name, f(args))
    }

    fn event(name: &[u8], args: &[&[u8]]) -> Event {
        match parse(name, args) {
            Ok(WireEvent::Event(e)) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn encodes_tts_request() {
        let frames = encode_tts_request("tts", b"r1", br#"{"text":"Hello there."}"#);
        assert_eq!(
            frames,
            f(&[b"MDPC02", &[0x01], b"tts", b"r1", br#"{"text":"Hello there."}"#])
        );
    }

    #[test]
    fn encodes_cancel_and_mmi() {
        assert_eq!(encode_cancel(b"r1"), f(&[b"MDPC02", &[0x01], b"tts.cancel", b"r1"]));
        assert_eq!(
            encode_request(MMI_SERVICE, &[b"tts"]),
            f(&[b"MDPC02", &[0x01], b"mmi.service", b"tts"])
        );
    }

    #[test]
    fn decodes_partial_and_final() {
        let r = decode_reply(f(&[b"MDPC02", &[0x02], b"tts", b"r1", b"mark", b"{}"])).unwrap();
        assert_eq!(
            r,
            Reply {
                service: "tts".into(),
                is_final: false,
                body: f(&[b"r1", b"mark", b"{}"])
            }
        );
        let r = decode_reply(f(&[b"MDPC02", &[0x03], b"mmi.service", b"200"])).unwrap();
        assert!(r.is_final);
        assert_eq!(r.service, "mmi.service");
        assert_eq!(r.body, f(&[b"200"]));
        // A reply with no body is valid MDP; the TTS layer rejects it later.
        assert!(decode_reply(f(&[b"MDPC02", &[0x03], b"echo"])).unwrap().body.is_empty());
    }

    #[test]
    fn rejects_malformed_replies() {
        let cases: Vec<Frames> = vec![
            vec![],
            f(&[b"MDPC02"]),
            f(&[b"MDPC02", &[0x02]]),
            f(&[b"MDPC01", &[0x02], b"tts", b"r1"]),
            f(&[b"MDPW02", &[0x02], b"tts", b"r1"]),
            f(&[b"MDPC02", &[0x01], b"tts", b"r1"]),
            f(&[b"MDPC02", &[0x04], b"tts", b"r1"]),
            f(&[b"MDPC02", &[0x02, 0x00], b"tts", b"r1"]),
            f(&[b"MDPC02", b"", b"tts", b"r1"]),
            f(&[b"MDPC02", &[0x02], b"", b"r1"]),
            f(&[b"MDPC02", &[0x02], b"has space", b"r1"]),
            f(&[b"MDPC02", &[0x02], &[0xff, 0xfe], b"r1"]),
            f(&[b"MDPC02", &[0x02], &[b'a'; 256], b"r1"]),
        ];
        for frames in cases {
            assert!(decode_reply(frames.clone()).is_err(), "{frames:?}");
        }
    }

    #[test]
    fn splits_event_body() {
        let e = split_event(f(&[b"r1", b"audio", &[0, 0, 0, 1], b"pcm"])).unwrap();
        assert_eq!(e.request_id, b"r1");
        assert_eq!(e.name, b"audio");
        assert_eq!(e.args, f(&[&[0, 0, 0, 1], b"pcm"]));
        assert!(split_event(f(&[b"r1"])).is_err());
        assert!(split_event(vec![]).is_err());
    }

    #[test]
    fn parses_start() {
        match event(b"start", &[start_json()]) {
            Event::Start {
                sample_rate,
                channels,
                format,
                engine,
                voice,
                worker,
                extra,
            } => {
                assert_eq!((sample_rate, channels, format), (22050, 1, SampleFormat::S16le));
                assert_eq!((engine.as_str(), voice.as_str()), ("piper", "en_US-joe-medium"));
                assert_eq!(worker.id.as_deref(), Some("w/1"));
                assert_eq!(worker.pid, Some(4242));
                assert_eq!(worker.host.as_deref(), Some("box"));
                assert_eq!(worker.service.as_deref(), Some("piper.en_US-joe-medium"));
                assert_eq!(extra.get("new_key"), Some(&Value::from(7)));
            }
            other => panic!("{other:?}"),
        }
        let e = event(b"start", &[br#"{"sample_rate":16000,"format":"f32le"}"#]);
        assert_eq!(
            e.audio_spec(),
            Some(AudioSpec {
                sample_rate: 16000,
                channels: 1,
                format: SampleFormat::F32le
            })
        );
    }

    #[test]
    fn parses_audio() {
        assert_eq!(
            event(b"audio", &[&[0, 0, 1, 2], &[1, 0, 2, 0]]),
            Event::Audio {
                seq: 258,
                pcm: vec![1, 0, 2, 0],
                format: SampleFormat::S16le
            }
        );
        assert_eq!(
            event(b"audio", &[&[0xff, 0xff, 0xff, 0xff], b""]),
            Event::Audio {
                seq: u32::MAX,
                pcm: vec![],
                format: SampleFormat::S16le
            }
        );
    }

    #[test]
    fn parses_timing_and_failover_timings() {
        match event(b"timing", &[br#"{"words":[{"start":0,"end":10,"text":"Hi","char":[0,2]}]}"#]) {
            Event::Timing(t) => assert_eq!(t.words.map(|w| w[0].chars), Some((0, 2))),
            other => panic!("not a timing: {other:?}"),
        }
        let fo = event(
            b"failover",
            &[br#"{"engine":"xtts","voice":"v","worker":{},"reason":"r","resume_at":13,"timings":[]}"#],
        );
        assert_eq!(fo.timing_kinds(), Some(vec![]));
        let start = event(b"start", &[br#"{"sample_rate":22050,"format":"s16le","timings":["words"]}"#]);
        assert_eq!(start.timing_kinds(), Some(vec!["words".to_string()]));
    }

    #[test]
    fn parses_mark_failover_end() {
        assert_eq!(
            event(b"mark", &[br#"{"segment":1,"end":28}"#]),
            Event::Mark { segment: 1, end: 28 }
        );
        match event(
            b"failover",
            &[br#"{"engine":"piper","voice":"v","worker":{"pid":4243},"reason":"heartbeat lost","resume_at":13}"#],
        ) {
            Event::Failover {
                engine,
                voice,
                worker,
                reason,
                resume_at,
                ..
            } => {
                assert_eq!(
                    (engine.as_str(), voice.as_str(), reason.as_str(), resume_at),
                    ("piper", "v", "heartbeat lost", 13)
                );
                assert_eq!(worker.pid, Some(4243));
                assert_eq!(worker.id, None);
            }
            other => panic!("{other:?}"),
        }
        match event(
            b"end",
            &[br#"{"samples":2279,"audio_s":0.1034,"chunks":3,"ttfa_ms":61.9,"total_ms":63,"engines":["piper"],"segments":1,"failovers":0,"rtf":0.592}"#],
        ) {
            Event::End { stats } => {
                assert_eq!(stats.samples, Some(2279));
                assert_eq!(stats.audio_s, Some(0.1034));
                assert_eq!(stats.chunks, Some(3));
                assert_eq!(stats.ttfa_ms, Some(61.9));
                assert_eq!(stats.total_ms, Some(63.0));
                assert_eq!(stats.engines, vec!["piper".to_string()]);
                assert_eq!((stats.segments, stats.failovers, stats.rtf), (Some(1), Some(0), Some(0.592)));
                assert_eq!(stats.raw.len(), 9);
            }
            other => panic!("{other:?}"),
        }
        // Every statistic is optional.
        assert_eq!(
            event(b"end", &[b"{}"]),
            Event::End {
                stats: Stats::default()
            }
        );
    }

    #[test]
    fn parses_error_and_unknown() {
        assert_eq!(
            parse(
                b"error",
                &[br#"{"code":"cancelled","message":"cancelled by the client"}"#]
            )
            .unwrap(),
            WireEvent::Error {
                code: ErrorCode::Cancelled,
                message: "cancelled by the client".into()
            }
        );
        assert_eq!(
            parse(b"error", &[br#"{"code":"brand_new"}"#]).unwrap(),
            WireEvent::Error {
                code: ErrorCode::Other("brand_new".into()),
                message: String::new()
            }
        );
        assert_eq!(
            parse(b"error", &[b"{}"]).unwrap(),
            WireEvent::Error {
                code: ErrorCode::Internal,
                message: String::new()
            }
        );
        assert_eq!(
            parse(b"progress", &[b"x", b"y"]).unwrap(),
            WireEvent::Unknown {
                name: "progress".into(),
                args: f(&[b"x", b"y"])
            }
        );
        assert!(matches!(parse(&[0xff, 0x00], &[]).unwrap(), WireEvent::Unknown { .. }));
    }

    #[test]
    fn malformed_events_are_errors() {
        let cases: Vec<(&[u8], Vec<&[u8]>)> = vec![
            (b"start", vec![]),
            (b"start", vec![b"not json"]),
            (b"start", vec![b"[1,2]"]),
            (b"start", vec![&[0xff, 0xfe]]),
            (b"start", vec![br#"{"format":"s16le"}"#]),
            (b"start", vec![br#"{"sample_rate":0,"format":"s16le"}"#]),
            (b"start", vec![br#"{"sample_rate":-1,"format":"s16le"}"#]),
            (b"start", vec![br#"{"sample_rate":99999999999,"format":"s16le"}"#]),
            (b"start", vec![br#"{"sample_rate":"22050","format":"s16le"}"#]),
            (b"start", vec![br#"{"sample_rate":22050,"format":"mp3"}"#]),
            (b"start", vec![br#"{"sample_rate":22050}"#]),
            (
                b"start",
                vec![br#"{"sample_rate":22050,"format":"s16le","channels":0}"#],
            ),
            (b"start", vec![br#"{"sample_rate":22050,"format":"s16le"}"#, b"extra"]),
            (b"audio", vec![]),
            (b"audio", vec![&[0, 0, 0, 0]]),
            (b"audio", vec![&[0, 0, 0], b"pcm"]),
            (b"audio", vec![&[0, 0, 0, 0, 0], b"pcm"]),
            (b"audio", vec![&[0, 0, 0, 0], b"pcm", b"more"]),
            (b"mark", vec![br#"{"segment":0}"#]),
            (b"mark", vec![br#"{"segment":-1,"end":3}"#]),
            (b"mark", vec![br#"{"segment":0.5,"end":3}"#]),
            (b"mark", vec![]),
            (b"failover", vec![br#"{"engine":"piper"}"#]),
            (b"end", vec![b"null"]),
            (b"end", vec![]),
            (b"error", vec![b"\"oops\""]),
            (b"error", vec![]),
        ];
        for (name, args) in cases {
            assert!(
                parse(name, &args).is_err(),
                "{} {args:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    fn start() -> Result<WireEvent, ProtocolError> {
        parse(b"start", &[start_json()])
    }

    fn audio(seq: u32, pcm: &[u8]) -> Result<WireEvent, ProtocolError> {
        Ok(WireEvent::Event(Event::Audio {
            seq,
            pcm: pcm.to_vec(),
            format: SampleFormat::S16le,
        }))
    }

    fn end() -> Result<WireEvent, ProtocolError> {
        parse(b"end", &[b"{}"])
    }

    #[test]
    fn tracker_accepts_a_normal_stream() {
        let mut t = StreamTracker::new();
        assert!(matches!(t.accept(false, start()), Some(Ok(Event::Start { .. }))));
        assert_eq!(t.audio_spec().map(|s| s.sample_rate), Some(22050));
        for seq in 0..3 {
            assert!(matches!(
                t.accept(false, audio(seq, &[0, 0])),
                Some(Ok(Event::Audio { .. }))
            ));
        }
        assert!(
            t.accept(false, parse(b"progress", &[])).is_none(),
            "unknown PARTIAL is skipped"
        );
        assert!(matches!(
            t.accept(false, parse(b"mark", &[br#"{"segment":0,"end":12}"#])),
            Some(Ok(Event::Mark { .. }))
        ));
        assert!(!t.is_finished());
        assert!(matches!(t.accept(true, end()), Some(Ok(Event::End { .. }))));
        assert!(t.is_finished());
        assert!(t.accept(false, audio(3, &[0, 0])).is_none(), "nothing after the FINAL");
        assert!(t.accept(true, end()).is_none());
    }

    #[test]
    fn tracker_detects_sequence_gap() {
        let mut t = StreamTracker::new();
        t.accept(false, start());
        assert!(t.accept(false, audio(0, &[0, 0])).is_some());
        match t.accept(false, audio(2, &[0, 0])) {
            Some(Err(Error::SequenceGap { expected: 1, got: 2 })) => {}
            other => panic!("{other:?}"),
        }
        assert!(t.is_finished());
        assert!(t.accept(false, audio(1, &[0, 0])).is_none());
    }

    #[test]
    fn tracker_detects_repeated_and_first_seq() {
        let mut t = StreamTracker::new();
        t.accept(false, start());
        assert!(matches!(
            t.accept(false, audio(1, &[0, 0])),
            Some(Err(Error::SequenceGap { expected: 0, got: 1 }))
        ));
        let mut t = StreamTracker::new();
        t.accept(false, start());
        t.accept(false, audio(0, &[0, 0]));
        assert!(matches!(
            t.accept(false, audio(0, &[0, 0])),
            Some(Err(Error::SequenceGap { expected: 1, got: 0 }))
        ));
    }

    #[test]
    fn tracker_error_final_is_typed() {
        let mut t = StreamTracker::new();
        let e = parse(
            b"error",
            &[br#"{"code":"bad_request","message":"text: text is empty"}"#],
        );
        match t.accept(true, e) {
            Some(Err(Error::Tts {
                code: ErrorCode::BadRequest,
                message,
            })) => assert_eq!(message, "text: text is empty"),
            other => panic!("{other:?}"),
        }
        assert!(t.is_finished());
    }

    #[test]
    fn tracker_rejects_out_of_order_streams() {
        let is_protocol = |r: Option<Result<Event, Error>>| matches!(r, Some(Err(Error::Protocol(_))));
        let mut t = StreamTracker::new();
        assert!(is_protocol(t.accept(false, audio(0, &[0, 0]))), "audio before start");
        let mut t = StreamTracker::new();
        t.accept(false, start());
        assert!(is_protocol(t.accept(false, start())), "second start");
        let mut t = StreamTracker::new();
        t.accept(false, start());
        assert!(is_protocol(t.accept(false, audio(0, &[0, 0, 0]))), "half a sample");
        let mut t = StreamTracker::new();
        assert!(is_protocol(t.accept(true, start())), "start as FINAL");
        let mut t = StreamTracker::new();
        assert!(is_protocol(t.accept(false, end())), "end as PARTIAL");
        let mut t = StreamTracker::new();
        assert!(is_protocol(t.accept(true, parse(b"progress", &[]))), "unknown FINAL");
        let mut t = StreamTracker::new();
        assert!(
            is_protocol(t.accept(false, parse(b"audio", &[b"xx", b"yy"]))),
            "malformed"
        );
        assert!(t.is_finished());
    }

    /// Deterministic pseudo-random frames through every decoder: errors, never panics.
    #[test]
    fn random_input_never_panics() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let names: [&[u8]; 8] = [b"start", b"audio", b"mark", b"failover", b"end", b"error", b"x", b""];
        let jsons: [&[u8]; 6] = [
            start_json(),
            br#"{"segment":1,"end":2}"#,
            br#"{"code":5,"message":[]}"#,
            b"{",
            b"[]",
            br#"{"sample_rate":1e99,"format":"f32le","channels":70000}"#,
        ];
        for _ in 0..20_000 {
            let n = (next() % 7) as usize;
            let mut frames: Frames = Vec::new();
            for i in 0..n {
                let r = next();
                let frame = match (i, r % 5) {
                    (0, 0..=2) => b"MDPC02".to_vec(),
                    (1, 0..=2) => vec![(r >> 8) as u8 % 5],
                    (2, 0..=2) => b"tts".to_vec(),
                    (4, 0..=2) => names[(r >> 8) as usize % names.len()].to_vec(),
                    (5, _) if r % 2 == 0 => jsons[(r >> 8) as usize % jsons.len()].to_vec(),
                    _ => (0..(r >> 16) % 9).map(|k| (r >> (k * 3)) as u8).collect(),
                };
                frames.push(frame);
            }
            let mut tracker = StreamTracker::new();
            tracker.accept(false, start());
            if let Ok(reply) = decode_reply(frames) {
                if let Ok(ev) = split_event(reply.body) {
                    let _ = tracker.accept(reply.is_final, parse_event(&ev.name, ev.args));
                }
            }
        }
    }
}
