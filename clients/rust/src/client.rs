//! The blocking client: one DEALER socket, many streams in flight.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::audio::Audio;
use crate::error::{Error, ProtocolError};
use crate::event::{AudioSpec, Event, SampleFormat, Stats};
use crate::protocol::{
    check_service_name, decode_cancel_reply, decode_opaque_error, decode_reply, encode_cancel, encode_request,
    encode_tts_request, parse_event, split_event, CancelOutcome, Frames, Reply, ServiceStatus, StreamTracker,
    CANCEL_SERVICE, MMI_SERVICE, STATUS_SERVICE, TTS_SERVICE,
};
use crate::request::Request;

/// Default endpoint of the broker's frontend.
pub const DEFAULT_ENDPOINT: &str = "tcp://127.0.0.1:5555";
/// Default time a stream may go without any message before it fails with `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

static CLIENTS: AtomicU64 = AtomicU64::new(0);

/// One stream's queue of items not yet read, and its order checks.
struct Slot {
    tracker: StreamTracker,
    /// Items not read yet, with the time the client received each.
    queue: VecDeque<(Result<Event, Error>, Instant)>,
}

#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum SlotPoll {
    Item(Result<Event, Error>, Instant),
    Empty,
    Finished,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<Vec<u8>, Slot>,
    /// Plain calls (MMI, status, opaque services) waiting, per service.
    calls: HashMap<String, usize>,
    replies: VecDeque<Reply>,
    /// Cancels waiting for the broker's answer, per request id: how many wait, and answers not taken yet.
    cancels: HashMap<Vec<u8>, (usize, VecDeque<CancelOutcome>)>,
    next_id: u64,
}

/// A connection to the broker's frontend. Streams borrow the client; any
/// number may be in flight and read in any order: replies for other streams
/// are queued on those streams while you read one (a demultiplexer on one
/// DEALER socket).
///
/// The client is blocking and not `Sync`: use one per thread.
pub struct Client {
    // Field order is drop order: sockets close before the context terminates.
    sock: zmq::Socket,
    monitor: zmq::Socket,
    inner: RefCell<Inner>,
    endpoint: String,
    timeout: Cell<Duration>,
    prefix: String,
    _ctx: zmq::Context,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout.get())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn random_prefix() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(CLIENTS.load(Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:08x}", h.finish() as u32)
}

/// `now + d`, or `None` (wait forever) when that is beyond what `Instant` can hold.
fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

fn expired(deadline: Option<Instant>) -> bool {
    matches!(deadline, Some(d) if Instant::now() >= d)
}

fn millis(d: Duration) -> i64 {
    // Round up so that a poll never wakes just before its deadline and spins.
    let ms = d.as_micros().saturating_add(999) / 1000;
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl Client {
    /// Connect to the broker's frontend (e.g. `tcp://127.0.0.1:5555`) with a new ZeroMQ context.
    ///
    /// ZeroMQ connects in the background: this succeeds even if the broker is
    /// not up yet. Use [`Client::wait_ready`] to wait for it.
    pub fn connect(endpoint: &str) -> Result<Client, Error> {
        Client::connect_with_context(&zmq::Context::new(), endpoint)
    }

    /// Connect using an existing ZeroMQ context (shared with your own sockets).
    pub fn connect_with_context(ctx: &zmq::Context, endpoint: &str) -> Result<Client, Error> {
        let n = CLIENTS.fetch_add(1, Ordering::Relaxed);
        let prefix = random_prefix();
        let sock = ctx.socket(zmq::DEALER)?;
        sock.set_linger(0)?;
        sock.set_sndtimeo(i32::try_from(DEFAULT_TIMEOUT.as_millis()).unwrap_or(i32::MAX))?;
        // A dropped connection means the broker died or restarted: it has
        // forgotten our streams, so they fail now instead of at the timeout.
        let monitor_addr = format!("inproc://tts-broker-client-monitor-{}-{prefix}-{n}", std::process::id());
        sock.monitor(&monitor_addr, zmq::SocketEvent::DISCONNECTED as i32)?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&monitor_addr)?;
        sock.connect(endpoint)?;
        Ok(Client {
            sock,
            monitor,
            inner: RefCell::new(Inner::default()),
            endpoint: endpoint.to_string(),
            timeout: Cell::new(DEFAULT_TIMEOUT),
            prefix,
            _ctx: ctx.clone(),
        })
    }

    /// The endpoint this client connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How long a stream may go without a message before it fails with
    /// [`Error::Timeout`] (and is cancelled at the broker).
    pub fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    /// Builder form of [`Client::set_timeout`].
    pub fn with_timeout(self, timeout: Duration) -> Result<Client, Error> {
        self.set_timeout(timeout)?;
        Ok(self)
    }

    /// Change the timeout; it also bounds how long a send may block. Any
    /// `Duration` is accepted: one too long to represent means "forever".
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), Error> {
        self.sock
            .set_sndtimeo(i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX))?;
        self.timeout.set(timeout);
        Ok(())
    }

    /// Streams sent and not yet finished or dropped.
    pub fn in_flight(&self) -> usize {
        self.inner.borrow().streams.len()
    }

    /// Send a request to the `tts` service and return its stream.
    pub fn speak(&self, request: &Request) -> Result<Stream<'_>, Error> {
        self.speak_to(TTS_SERVICE, request)
    }

    /// Send a request to a given TTS service (`tts`, `piper.<voice>`, `xtts`).
    pub fn speak_to(&self, service: &str, request: &Request) -> Result<Stream<'_>, Error> {
        check_service_name(service.as_bytes()).map_err(|e| Error::InvalidRequest(e.message().to_string()))?;
        self.drain_monitor()?;
        let rid = {
            let mut inner = self.inner.borrow_mut();
            let id = inner.next_id;
            inner.next_id += 1;
            format!("{}-{id}", self.prefix).into_bytes()
        };
        self.send(encode_tts_request(service, &rid, &request.to_json()), 0)?;
        self.inner.borrow_mut().streams.insert(
            rid.clone(),
            Slot {
                tracker: StreamTracker::new(),
                queue: VecDeque::new(),
            },
        );
        Ok(Stream {
            client: self,
            rid,
            done: false,
            sent_at: Instant::now(),
            first_audio_at: None,
            spec: None,
            stats: None,
        })
    }

    /// A plain request on a non-TTS service (MMI, `tts.status`, an opaque
    /// MDP/0.2 service): returns every reply, in order, each with its flag
    /// ([`Reply::is_final`]): the PARTIALs, then the FINAL, last. Fails with
    /// [`Error::Timeout`] when nothing arrives for `timeout` (reset by each
    /// PARTIAL), and with [`Error::Tts`] when the broker itself ended the
    /// request (its FINAL `"error"`, `{"code", "message"}`: `timeout`,
    /// `overloaded`, `internal`). Replies are matched to calls by service
    /// name, first come first served.
    pub fn call(&self, service: &str, body: &[&[u8]], timeout: Duration) -> Result<Vec<Reply>, Error> {
        check_service_name(service.as_bytes()).map_err(|e| Error::InvalidRequest(e.message().to_string()))?;
        if body.is_empty() {
            return Err(Error::InvalidRequest("a request needs at least one body frame".into()));
        }
        *self.inner.borrow_mut().calls.entry(service.to_string()).or_insert(0) += 1;
        let result = self.call_inner(service, body, timeout);
        let mut inner = self.inner.borrow_mut();
        if let Some(n) = inner.calls.get_mut(service) {
            *n -= 1;
            if *n == 0 {
                inner.calls.remove(service);
                inner.replies.retain(|r| r.service != service);
            }
        }
        result
    }

    /// [`Client::call`] returning only the FINAL's body.
    pub fn call_final(&self, service: &str, body: &[&[u8]], timeout: Duration) -> Result<Frames, Error> {
        let mut replies = self.call(service, body, timeout)?;
        Ok(replies.pop().map(|r| r.body).unwrap_or_default())
    }

    fn call_inner(&self, service: &str, body: &[&[u8]], timeout: Duration) -> Result<Vec<Reply>, Error> {
        self.drain_monitor()?;
        self.send(encode_request(service, body), 0)?;
        let mut got = Vec::new();
        let mut deadline = deadline_after(timeout);
        loop {
            let next = {
                let mut inner = self.inner.borrow_mut();
                match inner.replies.iter().position(|r| r.service == service) {
                    Some(pos) => inner.replies.remove(pos),
                    None => None,
                }
            };
            if let Some(reply) = next {
                if !reply.is_final {
                    got.push(reply);
                    deadline = deadline_after(timeout);
                    continue;
                }
                if let Some((code, message)) = decode_opaque_error(&reply.body) {
                    return Err(Error::Tts { code, message });
                }
                got.push(reply);
                return Ok(got);
            }
            if expired(deadline) {
                return Err(Error::Timeout {
                    waited: timeout,
                    what: format!("from {service}"),
                });
            }
            self.pump(deadline)?;
        }
    }

    /// RFC 8 `mmi.service`: [`ServiceStatus::Ready`] (`"200"`) when a live
    /// worker can serve `service` now, [`ServiceStatus::NotReady`] (`"404"`)
    /// when none does (yet), [`ServiceStatus::NotImplemented`] (`"501"`) for
    /// an `mmi.*` service the broker does not have; [`Error::Timeout`] when
    /// the broker did not answer.
    pub fn service_ready(&self, service: &str, timeout: Duration) -> Result<ServiceStatus, Error> {
        let body = self.call_final(MMI_SERVICE, &[service.as_bytes()], timeout)?;
        Ok(ServiceStatus::from_body(&body))
    }

    /// Poll [`Client::service_ready`] until it is ready (`Ok(true)`) or
    /// `timeout` passes (`Ok(false)`). A `"501"` answer will not change:
    /// `Ok(false)` at once.
    pub fn wait_ready(&self, service: &str, timeout: Duration) -> Result<bool, Error> {
        let deadline = deadline_after(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            let attempt = left.min(Duration::from_secs(1)).max(Duration::from_millis(50));
            match self.service_ready(service, attempt) {
                Ok(ServiceStatus::Ready) => return Ok(true),
                Ok(ServiceStatus::NotImplemented) => return Ok(false),
                Ok(_) | Err(Error::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            if expired(deadline) {
                return Ok(false);
            }
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            std::thread::sleep(Duration::from_millis(100).min(left));
        }
    }

    /// Cancel the stream with this request id (one of this client's) and
    /// wait up to `timeout` for the broker's answer: [`CancelOutcome::Cancelled`]
    /// (the stream will end with `cancelled`) or [`CancelOutcome::Unknown`]
    /// (it was not in flight). Events of other streams are queued meanwhile.
    pub fn cancel(&self, request_id: &[u8], timeout: Duration) -> Result<CancelOutcome, Error> {
        self.inner
            .borrow_mut()
            .cancels
            .entry(request_id.to_vec())
            .or_insert_with(|| (0, VecDeque::new()))
            .0 += 1;
        let result = self.cancel_inner(request_id, timeout);
        let mut inner = self.inner.borrow_mut();
        if let Some(entry) = inner.cancels.get_mut(request_id) {
            entry.0 -= 1;
            if entry.0 == 0 {
                inner.cancels.remove(request_id);
            }
        }
        result
    }

    fn cancel_inner(&self, request_id: &[u8], timeout: Duration) -> Result<CancelOutcome, Error> {
        self.drain_monitor()?;
        self.send(encode_cancel(request_id), 0)?;
        let deadline = deadline_after(timeout);
        loop {
            let outcome = self
                .inner
                .borrow_mut()
                .cancels
                .get_mut(request_id)
                .and_then(|entry| entry.1.pop_front());
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            if expired(deadline) {
                return Err(Error::Timeout {
                    waited: timeout,
                    what: format!("from {CANCEL_SERVICE}"),
                });
            }
            self.pump(deadline)?;
        }
    }

    /// Speak `text` in `language` through the `tts` service and return the
    /// whole utterance as `f32` samples (asked as `f32le`, so nothing is
    /// quantised). See [`Client::synthesize_request`] for the other options.
    pub fn synthesize(&self, text: &str, language: &str) -> Result<Audio, Error> {
        self.synthesize_request(&Request::new(text).language(language))
    }

    /// Speak a request through the `tts` service and return the whole
    /// utterance as `f32` samples, whichever format it asks (when it sets
    /// none, `f32le` is asked).
    pub fn synthesize_request(&self, request: &Request) -> Result<Audio, Error> {
        self.synthesize_to(TTS_SERVICE, request)
    }

    /// [`Client::synthesize_request`] on a given TTS service (`tts`, `piper.<voice>`, `xtts`).
    pub fn synthesize_to(&self, service: &str, request: &Request) -> Result<Audio, Error> {
        let mut request = request.clone();
        if request.format.is_none() {
            request.format = Some(SampleFormat::F32le);
        }
        self.speak_to(service, &request)?.read_audio_f32()
    }

    /// The broker's `tts.status` JSON.
    pub fn status(&self, timeout: Duration) -> Result<Value, Error> {
        let body = self.call_final(STATUS_SERVICE, &[b"{}"], timeout)?;
        let first = body
            .first()
            .ok_or_else(|| ProtocolError::new("empty tts.status reply"))?;
        serde_json::from_slice(first)
            .map_err(|e| ProtocolError::new(format!("tts.status reply is not JSON: {e}")).into())
    }

    fn send(&self, frames: Frames, flags: i32) -> Result<(), Error> {
        match self.sock.send_multipart(frames, flags) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => Err(Error::Timeout {
                waited: self.timeout.get(),
                what: "sending to the broker".into(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until `deadline` (`None`: forever) for one message (or a disconnect) and dispatch it.
    fn pump(&self, deadline: Option<Instant>) -> Result<(), Error> {
        loop {
            let wait = deadline.map_or(-1, |d| millis(d.saturating_duration_since(Instant::now())));
            let (sock_ready, monitor_ready) = {
                let mut items = [
                    self.sock.as_poll_item(zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                ];
                match zmq::poll(&mut items, wait) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            // Read queued replies before noticing a disconnect, so replies
            // that arrived before it still count.
            if sock_ready {
                match self.sock.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => self.dispatch(frames),
                    Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(());
            }
            if monitor_ready {
                self.read_monitor()?;
                return Ok(());
            }
            if expired(deadline) {
                return Ok(());
            }
        }
    }

    /// Handle one queued monitor event, if any; `Ok(false)` when none was queued.
    fn read_monitor(&self) -> Result<bool, Error> {
        match self.monitor.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => {
                let event = frames
                    .first()
                    .and_then(|f| f.get(0..2))
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .unwrap_or(0);
                if event & zmq::SocketEvent::DISCONNECTED.to_raw() != 0 {
                    self.connection_lost();
                }
                Ok(true)
            }
            Err(zmq::Error::EAGAIN) => Ok(false),
            Err(zmq::Error::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Handle every disconnect notice already queued, without waiting. A
    /// notice queued while nobody read the socket (the broker restarted while
    /// the client was idle) concerns the streams in flight now, never one sent
    /// after it: call this before sending a new request.
    fn drain_monitor(&self) -> Result<(), Error> {
        while self.read_monitor()? {}
        Ok(())
    }

    fn connection_lost(&self) {
        let mut inner = self.inner.borrow_mut();
        for slot in inner.streams.values_mut() {
            if !slot.tracker.is_finished() {
                slot.tracker.finish();
                slot.queue.push_back((
                    Err(Error::ConnectionLost {
                        endpoint: self.endpoint.clone(),
                    }),
                    Instant::now(),
                ));
            }
        }
    }

    /// Route one message: to its stream's queue, to a waiting call, or nowhere.
    fn dispatch(&self, frames: Frames) {
        // A message that is not MDP/0.2 names no stream we could blame: drop it.
        let reply = match decode_reply(frames) {
            Ok(reply) => reply,
            Err(_) => return,
        };
        if reply.service == CANCEL_SERVICE {
            // Kept only for a cancel that waits for it (Client::cancel).
            if let Ok((rid, outcome)) = decode_cancel_reply(&reply.body) {
                if let Some(entry) = self.inner.borrow_mut().cancels.get_mut(&rid) {
                    entry.1.push_back(outcome);
                }
            }
            return;
        }
        let mut cancel = None;
        {
            let mut inner = self.inner.borrow_mut();
            let plain = reply.service.starts_with("mmi.") || reply.service == STATUS_SERVICE;
            let rid = reply
                .body
                .first()
                .filter(|rid| !plain && inner.streams.contains_key(*rid))
                .cloned();
            if let Some(rid) = rid {
                if let Some(slot) = inner.streams.get_mut(&rid) {
                    let is_final = reply.is_final;
                    let parsed = split_event(reply.body).and_then(|ev| parse_event(&ev.name, ev.args));
                    if let Some(item) = slot.tracker.accept(is_final, parsed) {
                        slot.queue.push_back((item, Instant::now()));
                    }
                    if slot.tracker.is_finished() && !is_final {
                        // We ended it (sequence gap, malformed event): stop the broker too.
                        cancel = Some(rid);
                    }
                }
            } else if inner.calls.get(&reply.service).copied().unwrap_or(0) > 0 {
                inner.replies.push_back(reply);
            }
        }
        if let Some(rid) = cancel {
            let _ = self.send(encode_cancel(&rid), zmq::DONTWAIT);
        }
    }

    fn poll_slot(&self, rid: &[u8]) -> SlotPoll {
        let mut inner = self.inner.borrow_mut();
        match inner.streams.get_mut(rid) {
            None => SlotPoll::Finished,
            Some(slot) => match slot.queue.pop_front() {
                Some((item, at)) => SlotPoll::Item(item, at),
                None if slot.tracker.is_finished() => SlotPoll::Finished,
                None => SlotPoll::Empty,
            },
        }
    }

    fn forget(&self, rid: &[u8]) {
        self.inner.borrow_mut().streams.remove(rid);
    }

    /// Forget a stream nobody will read; cancel it at the broker if it is still running.
    fn abandon(&self, rid: &[u8]) {
        let running = match self.inner.borrow_mut().streams.remove(rid) {
            Some(slot) => !slot.tracker.is_finished(),
            None => false,
        };
        if running {
            let _ = self.send(encode_cancel(rid), zmq::DONTWAIT);
        }
    }
}

/// One request's events, in order. Iterate it (`for event in stream`) or call
/// [`Stream::next_event`]. A FINAL `error` ends it with [`Error::Tts`]; after
/// the `End` event or an error the iterator returns `None`.
///
/// Dropping a stream that has not finished cancels it at the broker.
pub struct Stream<'a> {
    client: &'a Client,
    rid: Vec<u8>,
    done: bool,
    sent_at: Instant,
    first_audio_at: Option<Instant>,
    spec: Option<AudioSpec>,
    stats: Option<Stats>,
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("request_id", &String::from_utf8_lossy(&self.rid))
            .field("done", &self.done)
            .field("spec", &self.spec)
            .finish()
    }
}

impl<'a> Stream<'a> {
    /// The request id this client chose (frame 3 of the request).
    pub fn request_id(&self) -> &[u8] {
        &self.rid
    }

    /// The next event; `Ok(None)` once the stream has ended.
    ///
    /// Fails with [`Error::Timeout`] (and cancels the stream) when nothing
    /// arrives for it within the client's timeout.
    pub fn next_event(&mut self) -> Result<Option<Event>, Error> {
        if self.done {
            return Ok(None);
        }
        let timeout = self.client.timeout();
        let deadline = deadline_after(timeout);
        loop {
            match self.client.poll_slot(&self.rid) {
                SlotPoll::Item(Ok(event), received_at) => {
                    self.observe(&event, received_at);
                    return Ok(Some(event));
                }
                SlotPoll::Item(Err(e), _) => {
                    self.finish();
                    return Err(e);
                }
                SlotPoll::Finished => {
                    self.finish();
                    return Ok(None);
                }
                SlotPoll::Empty => {}
            }
            if expired(deadline) {
                self.client.abandon(&self.rid);
                self.done = true;
                return Err(Error::Timeout {
                    waited: timeout,
                    what: format!("for stream {}", String::from_utf8_lossy(&self.rid)),
                });
            }
            self.client.pump(deadline)?;
        }
    }

    fn observe(&mut self, event: &Event, received_at: Instant) {
        match event {
            Event::Start { .. } => self.spec = event.audio_spec(),
            Event::Audio { .. } if self.first_audio_at.is_none() => self.first_audio_at = Some(received_at),
            Event::End { stats } => {
                self.stats = Some(stats.clone());
                self.finish();
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.client.forget(&self.rid);
    }

    /// Ask the broker to stop this stream. It then ends with an
    /// [`Error::Tts`] whose code is `cancelled` (check [`Error::is_cancelled`]),
    /// possibly after a few events already on their way.
    pub fn cancel(&self) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        self.client.send(encode_cancel(&self.rid), 0)
    }

    /// Cancel the stream and wait up to `timeout` for the broker's answer
    /// (see [`Client::cancel`]). The stream itself then ends with
    /// `cancelled` when the answer is [`CancelOutcome::Cancelled`]. A stream
    /// already finished here is [`CancelOutcome::Unknown`] without asking.
    pub fn cancel_wait(&self, timeout: Duration) -> Result<CancelOutcome, Error> {
        if self.done {
            return Ok(CancelOutcome::Unknown);
        }
        self.client.cancel(&self.rid, timeout)
    }

    /// True once the stream has ended (end, error, timeout).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The audio format, once `start` has been read.
    pub fn audio_spec(&self) -> Option<AudioSpec> {
        self.spec
    }

    /// The `end` statistics, once read.
    pub fn stats(&self) -> Option<&Stats> {
        self.stats.as_ref()
    }

    /// Time from sending the request to receiving the first audio chunk, as
    /// seen by this client (the time the client took it off the socket, even
    /// while you were reading another stream), once that chunk has been read.
    pub fn ttfa(&self) -> Option<Duration> {
        self.first_audio_at.map(|t| t.duration_since(self.sent_at))
    }

    /// Read the rest of the stream and return its PCM (format: [`Stream::audio_spec`]).
    pub fn read_audio(&mut self) -> Result<Vec<u8>, Error> {
        let mut pcm = Vec::new();
        while let Some(event) = self.next_event()? {
            if let Event::Audio { pcm: chunk, .. } = event {
                pcm.extend_from_slice(&chunk);
            }
        }
        Ok(pcm)
    }

    /// The next audio chunk as `f32` samples (whichever wire format), for
    /// real-time playback; other events are skipped (but recorded: see
    /// [`Stream::audio_spec`], [`Stream::stats`]). `Ok(None)` at the end.
    pub fn next_chunk_f32(&mut self) -> Result<Option<Vec<f32>>, Error> {
        while let Some(event) = self.next_event()? {
            if let Some(samples) = event.samples_f32() {
                return Ok(Some(samples));
            }
        }
        Ok(None)
    }

    /// Read the rest of the stream as one [`Audio`] of `f32` samples.
    pub fn read_audio_f32(&mut self) -> Result<Audio, Error> {
        let mut samples = Vec::new();
        while let Some(event) = self.next_event()? {
            event.extend_f32(&mut samples);
        }
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

impl Iterator for Stream<'_> {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Result<Event, Error>> {
        self.next_event().transpose()
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.abandon(&self.rid);
        }
    }
}
