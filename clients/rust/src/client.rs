//! The blocking client: one DEALER socket, many streams in flight.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::audio::Audio;
use crate::conn::{self, deadline_after, expired, Monitor, DEFAULT_HEARTBEAT};
use crate::curve::CurveKeys;
use crate::demux::{self, CallReplies, Incoming, Progress};
use crate::error::Error;
use crate::event::{AudioSpec, Event, Stats};
use crate::protocol::{
    check_service_name, encode_cancel, encode_request, encode_tts_request, CancelOutcome, Frames, Reply, ServiceStatus,
    StreamTracker, CANCEL_SERVICE, MMI_SERVICE, STATUS_SERVICE, TTS_SERVICE,
};
use crate::request::Request;

/// Default endpoint of the broker's frontend.
pub const DEFAULT_ENDPOINT: &str = "tcp://127.0.0.1:5555";
/// Default time a stream may go without any message before it fails with `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
/// The client is blocking and not `Sync`: use one per thread (or the async
/// client of the `tokio` feature, one handle shared by any number of tasks).
///
/// The socket sends ZeroMQ heartbeats every [`DEFAULT_HEARTBEAT`]: a broker
/// that stops answering them for three intervals (frozen, or gone without
/// closing the connection) counts as a lost connection, like one that
/// closed it ([`Error::ConnectionLost`]).
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
        Client::open(ctx, endpoint, None)
    }

    /// Connect to a broker with CURVE (`[security] curve = true`) with these keys.
    ///
    /// A broker that does not know the client's public key sends nothing at
    /// all: calls and streams end with [`Error::Timeout`]. A libzmq without
    /// CURVE is [`Error::Curve`].
    pub fn connect_secure(endpoint: &str, keys: &CurveKeys) -> Result<Client, Error> {
        Client::open(&zmq::Context::new(), endpoint, Some(keys))
    }

    /// [`Client::connect_secure`] on an existing ZeroMQ context.
    pub fn connect_secure_with_context(ctx: &zmq::Context, endpoint: &str, keys: &CurveKeys) -> Result<Client, Error> {
        Client::open(ctx, endpoint, Some(keys))
    }

    fn open(ctx: &zmq::Context, endpoint: &str, curve: Option<&CurveKeys>) -> Result<Client, Error> {
        let conn::Connection { sock, monitor, prefix } = conn::open(ctx, endpoint, DEFAULT_HEARTBEAT, curve)?;
        sock.set_sndtimeo(conn::send_timeout_ms(DEFAULT_TIMEOUT))?;
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
        self.sock.set_sndtimeo(conn::send_timeout_ms(timeout))?;
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
            progress: Progress::new(),
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
        let mut got = CallReplies::default();
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
                if let Some(done) = got.push(reply) {
                    return done;
                }
                deadline = deadline_after(timeout);
                continue;
            }
            if expired(deadline) {
                return Err(demux::no_answer(service, timeout));
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
            if let Some(ready) = demux::ready_verdict(self.service_ready(service, demux::ready_attempt(deadline)))? {
                return Ok(ready);
            }
            if expired(deadline) {
                return Ok(false);
            }
            std::thread::sleep(demux::ready_pause(deadline));
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
                return Err(demux::no_answer(CANCEL_SERVICE, timeout));
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
        self.speak_to(service, &demux::float_request(request))?.read_audio_f32()
    }

    /// The broker's `tts.status` JSON.
    pub fn status(&self, timeout: Duration) -> Result<Value, Error> {
        demux::status_json(&self.call_final(STATUS_SERVICE, &[b"{}"], timeout)?)
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
            let wait = conn::poll_timeout(deadline);
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
        match conn::read_monitor(&self.monitor)? {
            Monitor::Empty => Ok(false),
            Monitor::Disconnected => {
                self.connection_lost();
                Ok(true)
            }
            Monitor::Other => Ok(true),
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
        let mut cancel = None;
        {
            let mut inner = self.inner.borrow_mut();
            let incoming = demux::classify(frames, |rid| inner.streams.contains_key(rid));
            match incoming {
                // Kept only for a cancel that waits for it (Client::cancel).
                Some(Incoming::Cancel(rid, outcome)) => {
                    if let Some(entry) = inner.cancels.get_mut(&rid) {
                        entry.1.push_back(outcome);
                    }
                }
                Some(Incoming::Stream { rid, is_final, event }) => {
                    if let Some(slot) = inner.streams.get_mut(&rid) {
                        let (item, stop) = demux::track(&mut slot.tracker, is_final, event);
                        if let Some(item) = item {
                            slot.queue.push_back((item, Instant::now()));
                        }
                        // We ended it (sequence gap, malformed event): stop the broker too.
                        if stop {
                            cancel = Some(rid);
                        }
                    }
                }
                Some(Incoming::Call(reply)) if inner.calls.get(&reply.service).copied().unwrap_or(0) > 0 => {
                    inner.replies.push_back(reply);
                }
                // Not MDP/0.2, or a reply nobody waits for.
                Some(Incoming::Call(_)) | None => {}
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
    progress: Progress,
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("request_id", &String::from_utf8_lossy(&self.rid))
            .field("done", &self.progress.done)
            .field("spec", &self.progress.spec)
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
        if self.progress.done {
            return Ok(None);
        }
        let timeout = self.client.timeout();
        let deadline = deadline_after(timeout);
        loop {
            match self.client.poll_slot(&self.rid) {
                SlotPoll::Item(Ok(event), received_at) => {
                    self.progress.observe(&event, received_at);
                    if self.progress.done {
                        self.finish();
                    }
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
                self.progress.done = true;
                return Err(demux::stream_silent(&self.rid, timeout));
            }
            self.client.pump(deadline)?;
        }
    }

    fn finish(&mut self) {
        self.progress.done = true;
        self.client.forget(&self.rid);
    }

    /// Ask the broker to stop this stream. It then ends with an
    /// [`Error::Tts`] whose code is `cancelled` (check [`Error::is_cancelled`]),
    /// possibly after a few events already on their way.
    pub fn cancel(&self) -> Result<(), Error> {
        if self.progress.done {
            return Ok(());
        }
        self.client.send(encode_cancel(&self.rid), 0)
    }

    /// Cancel the stream and wait up to `timeout` for the broker's answer
    /// (see [`Client::cancel`]). The stream itself then ends with
    /// `cancelled` when the answer is [`CancelOutcome::Cancelled`]. A stream
    /// already finished here is [`CancelOutcome::Unknown`] without asking.
    pub fn cancel_wait(&self, timeout: Duration) -> Result<CancelOutcome, Error> {
        if self.progress.done {
            return Ok(CancelOutcome::Unknown);
        }
        self.client.cancel(&self.rid, timeout)
    }

    /// True once the stream has ended (end, error, timeout).
    pub fn is_done(&self) -> bool {
        self.progress.done
    }

    /// The audio format, once `start` has been read.
    pub fn audio_spec(&self) -> Option<AudioSpec> {
        self.progress.spec
    }

    /// The `end` statistics, once read.
    pub fn stats(&self) -> Option<&Stats> {
        self.progress.stats.as_ref()
    }

    /// Time from sending the request to receiving the first audio chunk, as
    /// seen by this client (the time the client took it off the socket, even
    /// while you were reading another stream), once that chunk has been read.
    pub fn ttfa(&self) -> Option<Duration> {
        self.progress.ttfa()
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
        self.progress.audio(samples)
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
        if !self.progress.done {
            self.client.abandon(&self.rid);
        }
    }
}
