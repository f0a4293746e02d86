//! The handle tasks share, and its builder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::tokio::sync::oneshot;
use serde_json::Value;

use super::io::Io;
use super::mailbox::{Command, Mailbox};
use super::stream::{Stream, StreamQueue};
use crate::audio::Audio;
use crate::client::DEFAULT_TIMEOUT;
use crate::conn::{self, deadline_after, expired, DEFAULT_HEARTBEAT};
use crate::curve::CurveKeys;
use crate::demux::{self, Progress};
use crate::error::Error;
use crate::protocol::{
    check_service_name, encode_request, encode_tts_request, CancelOutcome, Frames, Reply, ServiceStatus, MMI_SERVICE,
    STATUS_SERVICE, TTS_SERVICE,
};
use crate::request::Request;

/// Default bound on one stream's unread audio: 16 MiB, about six minutes of
/// 22 050 Hz 16-bit mono (three of `f32le`). Synthesis runs many times faster
/// than real time, so a reader that plays audio as it comes legitimately lets
/// a whole utterance queue up.
pub const DEFAULT_BUFFER_LIMIT: usize = 16 << 20;

static WAKE_SOCKETS: AtomicU64 = AtomicU64::new(0);

/// Options of an async [`Client`]: `Client::builder(endpoint).timeout(…).connect()`.
#[derive(Clone)]
pub struct Builder {
    endpoint: String,
    timeout: Duration,
    buffer_limit: usize,
    heartbeat: Duration,
    context: Option<zmq::Context>,
    curve: Option<CurveKeys>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("buffer_limit", &self.buffer_limit)
            .field("heartbeat", &self.heartbeat)
            .field("own_context", &self.context.is_none())
            .field("curve", &self.curve)
            .finish()
    }
}

impl Builder {
    /// Options for a client of the broker frontend at `endpoint` (e.g. `tcp://127.0.0.1:5555`).
    pub fn new(endpoint: &str) -> Builder {
        Builder {
            endpoint: endpoint.to_string(),
            timeout: DEFAULT_TIMEOUT,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            heartbeat: DEFAULT_HEARTBEAT,
            context: None,
            curve: None,
        }
    }

    /// How long a stream may receive nothing before it ends with
    /// [`Error::Timeout`] (and is cancelled at the broker); default
    /// [`DEFAULT_TIMEOUT`](crate::DEFAULT_TIMEOUT). It runs whether or not
    /// the stream is being read. Any `Duration` is accepted: one too long to
    /// represent means "forever".
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.timeout = timeout;
        self
    }

    /// The most audio, in bytes of PCM, that one stream may hold received
    /// and unread; default [`DEFAULT_BUFFER_LIMIT`] (16 MiB). A chunk that
    /// would pass it cancels the stream at the broker; its reader gets the
    /// events buffered so far, then [`Error::Overflow`]. One chunk is always
    /// accepted into an empty buffer, so a limit of 0 allows exactly one.
    pub fn buffer_limit(mut self, bytes: usize) -> Builder {
        self.buffer_limit = bytes;
        self
    }

    /// Interval of ZeroMQ heartbeats on the connection; default
    /// [`DEFAULT_HEARTBEAT`](crate::DEFAULT_HEARTBEAT) (1 s). A broker silent
    /// for three intervals (frozen, or unreachable without the connection
    /// closing) counts as a lost connection. `Duration::ZERO`: no heartbeats.
    pub fn heartbeat(mut self, interval: Duration) -> Builder {
        self.heartbeat = interval;
        self
    }

    /// Use this ZeroMQ context (needed to reach an `inproc://` endpoint of
    /// your own) instead of a new one.
    pub fn context(mut self, context: &zmq::Context) -> Builder {
        self.context = Some(context.clone());
        self
    }

    /// Talk CURVE to a broker with `[security] curve = true`, with these keys
    /// (see [`CurveKeys`](crate::CurveKeys)). A broker that does not know the
    /// client's key sends nothing: streams end with [`Error::Timeout`].
    pub fn curve(mut self, keys: CurveKeys) -> Builder {
        self.curve = Some(keys);
        self
    }

    /// Connect and start the client's I/O thread. ZeroMQ connects in the
    /// background: this succeeds even if the broker is not up yet (use
    /// [`Client::wait_ready`]). Needs no async runtime.
    pub fn connect(self) -> Result<Client, Error> {
        let ctx = self.context.unwrap_or_default();
        let conn = conn::open(&ctx, &self.endpoint, self.heartbeat, self.curve.as_ref())?;
        let addr = format!(
            "inproc://tts-broker-client-wake-{}-{}-{}",
            std::process::id(),
            conn.prefix,
            WAKE_SOCKETS.fetch_add(1, Ordering::Relaxed)
        );
        let wake_rx = ctx.socket(zmq::PULL)?;
        wake_rx.set_linger(0)?;
        wake_rx.bind(&addr)?;
        let wake_tx = ctx.socket(zmq::PUSH)?;
        wake_tx.set_linger(0)?;
        wake_tx.connect(&addr)?;
        let mailbox = Arc::new(Mailbox::new(wake_tx));
        let prefix = conn.prefix.clone();
        Io::spawn(ctx, conn, wake_rx, mailbox.clone(), self.endpoint.clone())?;
        Ok(Client {
            core: Arc::new(Core {
                mailbox,
                endpoint: self.endpoint,
                prefix,
                next_id: AtomicU64::new(0),
                timeout: self.timeout,
                buffer_limit: self.buffer_limit,
            }),
        })
    }
}

/// What every handle, stream and cancel handle of one client shares. When
/// the last of them goes, the I/O thread is told to stop.
pub(super) struct Core {
    mailbox: Arc<Mailbox>,
    endpoint: String,
    prefix: String,
    next_id: AtomicU64,
    timeout: Duration,
    buffer_limit: usize,
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.mailbox.post(Command::Shutdown);
    }
}

impl Core {
    /// Queue a command that needs no answer (the thread may have stopped: then nothing is left to do).
    pub(super) fn post(&self, command: Command) {
        let _ = self.mailbox.post(command);
    }

    /// The error for an answer that will never come: the I/O thread stopped.
    fn stopped(&self) -> Error {
        Error::Zmq(self.mailbox.closed().unwrap_or(zmq::Error::ETERM))
    }

    /// Post the command `make` builds around a reply channel, and wait for the answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.mailbox.post(make(tx))?;
        rx.await.map_err(|_| self.stopped())
    }

    pub(super) fn cancel(&self, rid: &[u8], queue: &StreamQueue) {
        if !queue.is_closed() {
            self.post(Command::Cancel(rid.to_vec()));
        }
    }

    pub(super) async fn cancel_wait(
        &self,
        rid: &[u8],
        queue: &StreamQueue,
        timeout: Duration,
    ) -> Result<CancelOutcome, Error> {
        if queue.is_closed() {
            return Ok(CancelOutcome::Unknown);
        }
        self.cancel_id(rid, timeout).await
    }

    async fn cancel_id(&self, rid: &[u8], timeout: Duration) -> Result<CancelOutcome, Error> {
        let rid = rid.to_vec();
        self.ask(|reply| Command::CancelWait { rid, timeout, reply }).await?
    }
}

/// An async connection to the broker's frontend: a cheap handle
/// (`Clone + Send + Sync`) that any number of tasks share. See the
/// [module documentation](super) for how it works.
#[derive(Clone)]
pub struct Client {
    core: Arc<Core>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.core.endpoint)
            .field("timeout", &self.core.timeout)
            .field("buffer_limit", &self.core.buffer_limit)
            .finish()
    }
}

impl Client {
    /// Connect to the broker's frontend with the default options (see [`Builder`]).
    pub fn connect(endpoint: &str) -> Result<Client, Error> {
        Builder::new(endpoint).connect()
    }

    /// Options for a client of `endpoint`.
    pub fn builder(endpoint: &str) -> Builder {
        Builder::new(endpoint)
    }

    /// The endpoint this client connected to.
    pub fn endpoint(&self) -> &str {
        &self.core.endpoint
    }

    /// How long a stream may receive nothing before it fails with [`Error::Timeout`].
    pub fn timeout(&self) -> Duration {
        self.core.timeout
    }

    /// The bound on each stream's unread audio, in bytes (see [`Builder::buffer_limit`]).
    pub fn buffer_limit(&self) -> usize {
        self.core.buffer_limit
    }

    /// Send a request to the `tts` service and return its stream at once
    /// (the request is on its way; nothing to await).
    pub fn speak(&self, request: &Request) -> Result<Stream, Error> {
        self.speak_to(TTS_SERVICE, request)
    }

    /// Send a request to a given TTS service (`tts`, `piper.<voice>`, `xtts`).
    pub fn speak_to(&self, service: &str, request: &Request) -> Result<Stream, Error> {
        check_service_name(service.as_bytes()).map_err(|e| Error::InvalidRequest(e.message().to_string()))?;
        let id = self.core.next_id.fetch_add(1, Ordering::Relaxed);
        let rid = format!("{}-{id}", self.core.prefix).into_bytes();
        let queue = Arc::new(StreamQueue::new(self.core.buffer_limit));
        let progress = Progress::new(); // the clock of `ttfa` starts before the request leaves
        self.core.mailbox.post(Command::Speak {
            rid: rid.clone(),
            frames: encode_tts_request(service, &rid, &request.to_json()),
            queue: queue.clone(),
            timeout: self.core.timeout,
        })?;
        Ok(Stream::new(self.core.clone(), rid, queue, progress))
    }

    /// Speak `text` in `language` through the `tts` service and return the
    /// whole utterance as `f32` samples (asked as `f32le`, so nothing is
    /// quantised).
    pub async fn synthesize(&self, text: &str, language: &str) -> Result<Audio, Error> {
        self.synthesize_request(&Request::new(text).language(language)).await
    }

    /// Speak a request through the `tts` service and return the whole
    /// utterance as `f32` samples, whichever format it asks (when it sets
    /// none, `f32le` is asked).
    pub async fn synthesize_request(&self, request: &Request) -> Result<Audio, Error> {
        self.synthesize_to(TTS_SERVICE, request).await
    }

    /// [`Client::synthesize_request`] on a given TTS service (`tts`, `piper.<voice>`, `xtts`).
    pub async fn synthesize_to(&self, service: &str, request: &Request) -> Result<Audio, Error> {
        let mut stream = self.speak_to(service, &demux::float_request(request))?;
        stream.read_audio_f32().await
    }

    /// A plain request on a non-TTS service (MMI, `tts.status`, an opaque
    /// MDP/0.2 service): every reply, in order, PARTIALs first, the FINAL
    /// last. Fails with [`Error::Timeout`] when nothing arrives for
    /// `timeout` (reset by each PARTIAL), and with [`Error::Tts`] when the
    /// broker itself ended the request. Replies are matched to calls by
    /// service name, first come first served.
    pub async fn call(&self, service: &str, body: &[&[u8]], timeout: Duration) -> Result<Vec<Reply>, Error> {
        check_service_name(service.as_bytes()).map_err(|e| Error::InvalidRequest(e.message().to_string()))?;
        if body.is_empty() {
            return Err(Error::InvalidRequest("a request needs at least one body frame".into()));
        }
        let frames = encode_request(service, body);
        let service = service.to_string();
        self.core
            .ask(|reply| Command::Call {
                service,
                frames,
                timeout,
                reply,
            })
            .await?
    }

    /// [`Client::call`] returning only the FINAL's body.
    pub async fn call_final(&self, service: &str, body: &[&[u8]], timeout: Duration) -> Result<Frames, Error> {
        let mut replies = self.call(service, body, timeout).await?;
        Ok(replies.pop().map(|r| r.body).unwrap_or_default())
    }

    /// RFC 8 `mmi.service`: [`ServiceStatus::Ready`] (`"200"`) when a live
    /// worker can serve `service` now, [`ServiceStatus::NotReady`] (`"404"`),
    /// [`ServiceStatus::NotImplemented`] (`"501"`); [`Error::Timeout`] when the
    /// broker did not answer.
    pub async fn service_ready(&self, service: &str, timeout: Duration) -> Result<ServiceStatus, Error> {
        let body = self.call_final(MMI_SERVICE, &[service.as_bytes()], timeout).await?;
        Ok(ServiceStatus::from_body(&body))
    }

    /// Poll [`Client::service_ready`] until it is ready (`Ok(true)`) or
    /// `timeout` passes (`Ok(false)`). A `"501"` answer will not change:
    /// `Ok(false)` at once.
    pub async fn wait_ready(&self, service: &str, timeout: Duration) -> Result<bool, Error> {
        let deadline = deadline_after(timeout);
        loop {
            let answer = self.service_ready(service, demux::ready_attempt(deadline)).await;
            if let Some(ready) = demux::ready_verdict(answer)? {
                return Ok(ready);
            }
            if expired(deadline) {
                return Ok(false);
            }
            self.sleep(demux::ready_pause(deadline)).await?;
        }
    }

    /// Cancel the stream with this request id (one of this client's) and
    /// wait up to `timeout` for the broker's answer (see [`CancelHandle::cancel_wait`](super::CancelHandle::cancel_wait)).
    pub async fn cancel(&self, request_id: &[u8], timeout: Duration) -> Result<CancelOutcome, Error> {
        self.core.cancel_id(request_id, timeout).await
    }

    /// The broker's `tts.status` JSON.
    pub async fn status(&self, timeout: Duration) -> Result<Value, Error> {
        demux::status_json(&self.call_final(STATUS_SERVICE, &[b"{}"], timeout).await?)
    }

    /// Wait `d`, on the I/O thread's clock (no runtime timer needed).
    async fn sleep(&self, d: Duration) -> Result<(), Error> {
        let until: Option<Instant> = deadline_after(d);
        self.core.ask(|reply| Command::Sleep { until, reply }).await
    }
}
