//! A stream's events as a [`futures_core::Stream`], its bounded buffer, and its cancel handle.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::client::Core;
use super::mailbox::Command;
use crate::audio::Audio;
use crate::demux::Progress;
use crate::error::Error;
use crate::event::{AudioSpec, Event, Stats};
use crate::protocol::CancelOutcome;

type Item = (Result<Event, Error>, Instant);

struct QueueState {
    items: VecDeque<Item>,
    /// PCM bytes of the `Audio` events in `items`.
    audio_bytes: usize,
    /// The I/O thread will add nothing more.
    closed: bool,
    waker: Option<Waker>,
}

/// What the I/O thread has received for one stream and its reader has not
/// taken yet: bounded by `limit` bytes of audio.
pub(super) struct StreamQueue {
    state: Mutex<QueueState>,
    limit: usize,
}

fn audio_bytes(item: &Result<Event, Error>) -> usize {
    match item {
        Ok(Event::Audio { pcm, .. }) => pcm.len(),
        _ => 0,
    }
}

impl StreamQueue {
    pub(super) fn new(limit: usize) -> StreamQueue {
        StreamQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                audio_bytes: 0,
                closed: false,
                waker: None,
            }),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// I/O thread: add an item (`last`: nothing follows it) and wake the
    /// reader. Returns `false`, and ends the queue with [`Error::Overflow`]
    /// instead, when the audio not read yet would pass the limit (one chunk
    /// is always accepted into an empty buffer).
    pub(super) fn push(&self, item: Result<Event, Error>, received_at: Instant, last: bool) -> bool {
        let bytes = audio_bytes(&item);
        let mut state = self.lock();
        if state.closed {
            return true;
        }
        let fits = bytes == 0 || state.audio_bytes == 0 || state.audio_bytes.saturating_add(bytes) <= self.limit;
        if fits {
            state.audio_bytes += bytes;
            state.items.push_back((item, received_at));
            state.closed = last;
        } else {
            state
                .items
                .push_back((Err(Error::Overflow { limit: self.limit }), received_at));
            state.closed = true;
        }
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        fits
    }

    /// I/O thread: end the stream with `error` after what is already queued.
    pub(super) fn fail(&self, error: Error) {
        self.push(Err(error), Instant::now(), true);
    }

    /// True once the I/O thread will add nothing more.
    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn buffered_bytes(&self) -> usize {
        self.lock().audio_bytes
    }

    /// Reader: the next item, `None` at the end, or `Pending` (and a wake-up later).
    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let mut state = self.lock();
        if let Some(item) = state.items.pop_front() {
            state.audio_bytes -= audio_bytes(&item.0);
            return Poll::Ready(Some(item));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// One request's events, in order: a [`futures_core::Stream`] of
/// `Result<Event, Error>` (use `futures::StreamExt::next`, or
/// [`Stream::next_event`] without extra traits). A FINAL `error` ends it
/// with [`Error::Tts`]; after the `End` event or an error it yields `None`.
///
/// The stream is `'static`, `Send` and `Unpin`: move it into a task. It keeps
/// the client's I/O thread alive. Its events are buffered by that thread as
/// they arrive, whether or not you read them, up to the client's
/// [`buffer_limit`](super::Builder::buffer_limit) of unread audio; past that
/// the stream is cancelled and ends with [`Error::Overflow`] (after the
/// events buffered before). Nothing arriving for the client's timeout ends
/// it with [`Error::Timeout`]; a lost connection with [`Error::ConnectionLost`].
///
/// Dropping a stream that has not finished cancels it at the broker.
pub struct Stream {
    core: Arc<Core>,
    rid: Vec<u8>,
    queue: Arc<StreamQueue>,
    progress: Progress,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("request_id", &String::from_utf8_lossy(&self.rid))
            .field("done", &self.progress.done)
            .field("spec", &self.progress.spec)
            .field("buffered_bytes", &self.queue.buffered_bytes())
            .finish()
    }
}

impl Stream {
    pub(super) fn new(core: Arc<Core>, rid: Vec<u8>, queue: Arc<StreamQueue>, progress: Progress) -> Stream {
        Stream {
            core,
            rid,
            queue,
            progress,
        }
    }

    /// The request id the client chose (frame 3 of the request).
    pub fn request_id(&self) -> &[u8] {
        &self.rid
    }

    /// A handle that cancels this stream from anywhere (another task, a
    /// UI callback); it may outlive the stream.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            core: self.core.clone(),
            rid: self.rid.clone(),
            queue: self.queue.clone(),
        }
    }

    /// Ask the broker to stop this stream, without waiting (see [`CancelHandle::cancel`]).
    pub fn cancel(&self) {
        if !self.progress.done {
            self.core.cancel(&self.rid, &self.queue);
        }
    }

    /// Cancel the stream and wait up to `timeout` for the broker's answer
    /// (see [`CancelHandle::cancel_wait`]). A stream already finished here
    /// is [`CancelOutcome::Unknown`] without asking.
    pub async fn cancel_wait(&self, timeout: Duration) -> Result<CancelOutcome, Error> {
        if self.progress.done {
            return Ok(CancelOutcome::Unknown);
        }
        self.core.cancel_wait(&self.rid, &self.queue, timeout).await
    }

    /// The next event; `Ok(None)` once the stream has ended.
    pub fn next_event(&mut self) -> NextEvent<'_> {
        NextEvent { stream: self }
    }

    /// The next audio chunk as `f32` samples (whichever wire format), for
    /// real-time playback; other events are skipped (but recorded: see
    /// [`Stream::audio_spec`], [`Stream::stats`]). `Ok(None)` at the end.
    pub async fn next_chunk_f32(&mut self) -> Result<Option<Vec<f32>>, Error> {
        while let Some(event) = self.next_event().await? {
            if let Some(samples) = event.samples_f32() {
                return Ok(Some(samples));
            }
        }
        Ok(None)
    }

    /// Read the rest of the stream and return its PCM (format: [`Stream::audio_spec`]).
    pub async fn read_audio(&mut self) -> Result<Vec<u8>, Error> {
        let mut pcm = Vec::new();
        while let Some(event) = self.next_event().await? {
            if let Event::Audio { pcm: chunk, .. } = event {
                pcm.extend_from_slice(&chunk);
            }
        }
        Ok(pcm)
    }

    /// Read the rest of the stream as one [`Audio`] of `f32` samples.
    pub async fn read_audio_f32(&mut self) -> Result<Audio, Error> {
        let mut samples = Vec::new();
        while let Some(event) = self.next_event().await? {
            event.extend_f32(&mut samples);
        }
        self.progress.audio(samples)
    }

    /// True once the stream has ended (end, error, timeout) for its reader.
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

    /// Time from sending the request to the client receiving the first
    /// audio chunk (when its I/O thread took it off the socket, however late
    /// you read it), once that chunk has been read.
    pub fn ttfa(&self) -> Option<Duration> {
        self.progress.ttfa()
    }

    /// Bytes of audio received and not read yet (bounded by the client's
    /// [`buffer_limit`](super::Builder::buffer_limit)).
    pub fn buffered_bytes(&self) -> usize {
        self.queue.buffered_bytes()
    }
}

impl futures_core::Stream for Stream {
    type Item = Result<Event, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.progress.done {
            return Poll::Ready(None);
        }
        match this.queue.poll_pop(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some((Ok(event), received_at))) => {
                this.progress.observe(&event, received_at);
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some((Err(e), _))) => {
                this.progress.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.progress.done = true;
                Poll::Ready(None)
            }
        }
    }
}

impl futures_core::FusedStream for Stream {
    fn is_terminated(&self) -> bool {
        self.progress.done
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.progress.done && !self.queue.is_closed() {
            self.core.post(Command::Abandon(std::mem::take(&mut self.rid)));
        }
    }
}

/// The future of [`Stream::next_event`].
#[derive(Debug)]
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct NextEvent<'a> {
    stream: &'a mut Stream,
}

impl Future for NextEvent<'_> {
    type Output = Result<Option<Event>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let stream = &mut *self.get_mut().stream;
        match futures_core::Stream::poll_next(Pin::new(stream), cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(item) => Poll::Ready(item.transpose()),
        }
    }
}

/// Cancels one stream from anywhere: `Clone + Send + Sync`, and it may
/// outlive the stream (cancelling a finished stream does nothing). Get one
/// from [`Stream::cancel_handle`].
#[derive(Clone)]
pub struct CancelHandle {
    core: Arc<Core>,
    rid: Vec<u8>,
    queue: Arc<StreamQueue>,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("request_id", &String::from_utf8_lossy(&self.rid))
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl CancelHandle {
    /// The request id of the stream.
    pub fn request_id(&self) -> &[u8] {
        &self.rid
    }

    /// Ask the broker to stop the stream, without waiting. The stream then
    /// ends with an [`Error::Tts`] whose code is `cancelled` (check
    /// [`Error::is_cancelled`]), possibly after a few events already on
    /// their way. Nothing is sent if the stream has already finished.
    pub fn cancel(&self) {
        self.core.cancel(&self.rid, &self.queue);
    }

    /// Cancel the stream and wait up to `timeout` for the broker's answer:
    /// [`CancelOutcome::Cancelled`] (the stream will end with `cancelled`) or
    /// [`CancelOutcome::Unknown`] (it was not in flight). A stream the client
    /// has already seen finish is `Unknown` without asking. Fails with
    /// [`Error::Timeout`] when the broker does not answer in time.
    pub async fn cancel_wait(&self, timeout: Duration) -> Result<CancelOutcome, Error> {
        self.core.cancel_wait(&self.rid, &self.queue, timeout).await
    }

    /// True once the client has received the stream's last event (or ended
    /// it): nothing more will come from the broker for it.
    pub fn is_finished(&self) -> bool {
        self.queue.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SampleFormat;

    fn chunk(seq: u32, bytes: usize) -> Result<Event, Error> {
        Ok(Event::Audio {
            seq,
            pcm: vec![0; bytes],
            format: SampleFormat::S16le,
        })
    }

    fn pop(q: &StreamQueue) -> Poll<Option<Item>> {
        let waker = futures::task::noop_waker();
        q.poll_pop(&mut Context::from_waker(&waker))
    }

    #[test]
    fn the_buffer_counts_unread_audio_and_overflows_past_the_limit() {
        let q = StreamQueue::new(100);
        let now = Instant::now();
        assert!(pop(&q).is_pending());
        assert!(q.push(Ok(Event::Mark { segment: 0, end: 1 }), now, false));
        assert!(q.push(chunk(0, 60), now, false));
        assert!(q.push(chunk(1, 40), now, false));
        assert_eq!(q.buffered_bytes(), 100);
        assert!(matches!(pop(&q), Poll::Ready(Some((Ok(Event::Mark { .. }), _)))));
        assert!(matches!(
            pop(&q),
            Poll::Ready(Some((Ok(Event::Audio { seq: 0, .. }), _)))
        ));
        assert_eq!(q.buffered_bytes(), 40);
        assert!(q.push(chunk(2, 60), now, false), "exactly at the limit");
        assert!(!q.push(chunk(3, 1), now, false), "one byte past it");
        assert!(q.is_closed());
        assert!(q.push(chunk(4, 1), now, false), "ignored once closed");
        assert!(matches!(
            pop(&q),
            Poll::Ready(Some((Ok(Event::Audio { seq: 1, .. }), _)))
        ));
        assert!(matches!(
            pop(&q),
            Poll::Ready(Some((Ok(Event::Audio { seq: 2, .. }), _)))
        ));
        assert!(matches!(
            pop(&q),
            Poll::Ready(Some((Err(Error::Overflow { limit: 100 }), _)))
        ));
        assert!(matches!(pop(&q), Poll::Ready(None)));
        assert_eq!(q.buffered_bytes(), 0);
    }

    #[test]
    fn one_chunk_always_fits_an_empty_buffer() {
        let q = StreamQueue::new(0);
        let now = Instant::now();
        assert!(q.push(chunk(0, 500), now, false));
        assert!(matches!(pop(&q), Poll::Ready(Some(_))));
        assert!(q.push(chunk(1, 500), now, false));
        assert!(!q.push(chunk(2, 1), now, false));
    }

    #[test]
    fn the_last_item_closes_the_queue_and_wakes_the_reader() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl futures::task::ArcWake for Count {
            fn wake_by_ref(arc_self: &Arc<Self>) {
                arc_self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures::task::waker(count.clone());
        let q = StreamQueue::new(10);
        assert!(q.poll_pop(&mut Context::from_waker(&waker)).is_pending());
        q.fail(Error::ConnectionLost { endpoint: "e".into() });
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(q.is_closed());
        assert!(matches!(
            pop(&q),
            Poll::Ready(Some((Err(Error::ConnectionLost { .. }), _)))
        ));
        assert!(matches!(pop(&q), Poll::Ready(None)));
    }
}
