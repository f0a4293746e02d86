//! What both clients do with a broker message, whoever reads the socket:
//! route it (a stream's event, a cancel's answer, a plain call's reply),
//! feed a stream's order checks, collect a call's replies, and follow what a
//! reader has seen of its stream.

use std::time::{Duration, Instant};

use crate::audio::Audio;
use crate::error::{Error, ProtocolError};
use crate::event::{AudioSpec, Event, SampleFormat, Stats};
use crate::protocol::{
    decode_cancel_reply, decode_opaque_error, decode_reply, parse_event, split_event, CancelOutcome, Frames, Reply,
    ServiceStatus, StreamTracker, WireEvent, CANCEL_SERVICE, STATUS_SERVICE,
};
use crate::request::Request;

/// Where one broker → client message goes.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// The broker's answer to a `tts.cancel`.
    Cancel(Vec<u8>, CancelOutcome),
    /// An event of the stream with this request id.
    Stream {
        rid: Vec<u8>,
        is_final: bool,
        event: Result<WireEvent, ProtocolError>,
    },
    /// A reply to a plain call (MMI, `tts.status`, an opaque service).
    Call(Reply),
}

/// Decode and route one message. `is_stream` says whether a request id is one
/// of the client's streams in flight. `None`: nothing to do with it (not
/// MDP/0.2, or a malformed cancel answer: neither names a stream to blame).
pub(crate) fn classify(frames: Frames, is_stream: impl FnOnce(&[u8]) -> bool) -> Option<Incoming> {
    let reply = decode_reply(frames).ok()?;
    if reply.service == CANCEL_SERVICE {
        return decode_cancel_reply(&reply.body)
            .ok()
            .map(|(rid, outcome)| Incoming::Cancel(rid, outcome));
    }
    let plain = reply.service.starts_with("mmi.") || reply.service == STATUS_SERVICE;
    match reply.body.first() {
        Some(rid) if !plain && is_stream(rid) => {
            let rid = rid.clone();
            let is_final = reply.is_final;
            let event = split_event(reply.body).and_then(|ev| parse_event(&ev.name, ev.args));
            Some(Incoming::Stream { rid, is_final, event })
        }
        _ => Some(Incoming::Call(reply)),
    }
}

/// Feed one event to a stream's order checks. Returns what the stream
/// yields (if anything) and whether the client must cancel it at the broker:
/// true when the client itself ended a stream the broker still runs (a
/// sequence gap, a malformed event).
pub(crate) fn track(
    tracker: &mut StreamTracker,
    is_final: bool,
    event: Result<WireEvent, ProtocolError>,
) -> (Option<Result<Event, Error>>, bool) {
    let item = tracker.accept(is_final, event);
    let cancel = tracker.is_finished() && !is_final;
    (item, cancel)
}

/// The replies of one plain call, PARTIALs first, FINAL last.
#[derive(Debug, Default)]
pub(crate) struct CallReplies {
    got: Vec<Reply>,
}

impl CallReplies {
    /// Take one reply; `Some` once the call is over: every reply, or the
    /// error the broker ended it with (its FINAL `"error"`).
    pub(crate) fn push(&mut self, reply: Reply) -> Option<Result<Vec<Reply>, Error>> {
        if !reply.is_final {
            self.got.push(reply);
            return None;
        }
        if let Some((code, message)) = decode_opaque_error(&reply.body) {
            return Some(Err(Error::Tts { code, message }));
        }
        self.got.push(reply);
        Some(Ok(std::mem::take(&mut self.got)))
    }
}

/// The error for a call or cancel to `service` that got no answer in time.
pub(crate) fn no_answer(service: &str, waited: Duration) -> Error {
    Error::Timeout {
        waited,
        what: format!("from {service}"),
    }
}

/// The error for a stream that received nothing for `waited`.
pub(crate) fn stream_silent(rid: &[u8], waited: Duration) -> Error {
    Error::Timeout {
        waited,
        what: format!("for stream {}", String::from_utf8_lossy(rid)),
    }
}

/// The `tts.status` JSON from a FINAL body.
pub(crate) fn status_json(body: &[Vec<u8>]) -> Result<serde_json::Value, Error> {
    let first = body
        .first()
        .ok_or_else(|| ProtocolError::new("empty tts.status reply"))?;
    serde_json::from_slice(first).map_err(|e| ProtocolError::new(format!("tts.status reply is not JSON: {e}")).into())
}

/// `wait_ready`: how long one `mmi.service` attempt may wait, given the overall deadline.
pub(crate) fn ready_attempt(deadline: Option<Instant>) -> Duration {
    left(deadline)
        .min(Duration::from_secs(1))
        .max(Duration::from_millis(50))
}

/// `wait_ready`: the pause between two attempts.
pub(crate) fn ready_pause(deadline: Option<Instant>) -> Duration {
    left(deadline).min(Duration::from_millis(100))
}

/// `wait_ready`: what one attempt's answer means: `Some(ready)` to stop
/// (`"501"` will not change), `None` to try again, or an error to give up.
pub(crate) fn ready_verdict(answer: Result<ServiceStatus, Error>) -> Result<Option<bool>, Error> {
    match answer {
        Ok(ServiceStatus::Ready) => Ok(Some(true)),
        Ok(ServiceStatus::NotImplemented) => Ok(Some(false)),
        Ok(_) | Err(Error::Timeout { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn left(deadline: Option<Instant>) -> Duration {
    deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()))
}

/// The request `synthesize` sends: `f32le` unless it asks a format.
pub(crate) fn float_request(request: &Request) -> Request {
    let mut request = request.clone();
    if request.format.is_none() {
        request.format = Some(SampleFormat::F32le);
    }
    request
}

/// What a reader has seen of its stream: the audio format, the `end`
/// statistics, when the first audio chunk arrived, and whether it is over.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    pub(crate) sent_at: Instant,
    pub(crate) first_audio_at: Option<Instant>,
    pub(crate) spec: Option<AudioSpec>,
    pub(crate) stats: Option<Stats>,
    pub(crate) done: bool,
}

impl Progress {
    /// A stream whose request was sent just now.
    pub(crate) fn new() -> Progress {
        Progress {
            sent_at: Instant::now(),
            first_audio_at: None,
            spec: None,
            stats: None,
            done: false,
        }
    }

    /// Record an event the reader takes, received by the client at `received_at`.
    pub(crate) fn observe(&mut self, event: &Event, received_at: Instant) {
        match event {
            Event::Start { .. } => self.spec = event.audio_spec(),
            Event::Audio { .. } if self.first_audio_at.is_none() => self.first_audio_at = Some(received_at),
            Event::End { stats } => {
                self.stats = Some(stats.clone());
                self.done = true;
            }
            _ => {}
        }
    }

    /// Time from sending the request to receiving the first audio chunk.
    pub(crate) fn ttfa(&self) -> Option<Duration> {
        self.first_audio_at.map(|t| t.duration_since(self.sent_at))
    }

    /// A whole utterance from its `f32` samples, in the format `start` announced.
    pub(crate) fn audio(&self, samples: Vec<f32>) -> Result<Audio, Error> {
        let spec = self
            .spec
            .ok_or_else(|| ProtocolError::new("stream ended without a start event"))?;
        Ok(Audio {
            samples,
            sample_rate: spec.sample_rate,
            channels: spec.channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(parts: &[&[u8]]) -> Frames {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn routes_streams_cancels_and_calls() {
        let ours = |rid: &[u8]| rid == b"r1";
        match classify(
            f(&[b"MDPC02", &[2], b"tts", b"r1", b"mark", br#"{"segment":0,"end":3}"#]),
            ours,
        ) {
            Some(Incoming::Stream {
                rid,
                is_final: false,
                event: Ok(WireEvent::Event(Event::Mark { segment: 0, end: 3 })),
            }) => assert_eq!(rid, b"r1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(f(&[b"MDPC02", &[3], b"tts.cancel", b"r1", b"cancelled"]), ours),
            Some(Incoming::Cancel(_, CancelOutcome::Cancelled))
        ));
        // A stream's id on a plain service is still a call's reply.
        assert!(matches!(
            classify(f(&[b"MDPC02", &[3], b"mmi.service", b"r1"]), ours),
            Some(Incoming::Call(_))
        ));
        assert!(matches!(
            classify(f(&[b"MDPC02", &[3], b"tts", b"other", b"end", b"{}"]), ours),
            Some(Incoming::Call(_))
        ));
        assert!(classify(f(&[b"garbage"]), ours).is_none());
        assert!(classify(f(&[b"MDPC02", &[3], b"tts.cancel", b"r1"]), ours).is_none());
    }

    #[test]
    fn calls_collect_until_the_final() {
        let reply = |is_final, body: &[&[u8]]| Reply {
            service: "echo".into(),
            is_final,
            body: f(body),
        };
        let mut c = CallReplies::default();
        assert!(c.push(reply(false, &[b"one"])).is_none());
        let all = c.push(reply(true, &[b"done"])).unwrap().unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[1].is_final);
        let mut c = CallReplies::default();
        assert!(matches!(
            c.push(reply(true, &[b"error", br#"{"code":"overloaded","message":"m"}"#])),
            Some(Err(Error::Tts { .. }))
        ));
    }

    #[test]
    fn float_request_keeps_an_explicit_format() {
        assert_eq!(float_request(&Request::new("x")).format, Some(SampleFormat::F32le));
        let s16 = Request::new("x").format(SampleFormat::S16le);
        assert_eq!(float_request(&s16).format, Some(SampleFormat::S16le));
    }
}
