//! The I/O thread: the only user of the DEALER socket. It waits in one
//! `zmq::poll` on the DEALER, the disconnect monitor and the mailbox's
//! wake-up socket, with the nearest deadline as timeout; routes every reply
//! as it arrives (so no reader can stall another); and enforces timeouts,
//! buffer limits and lost connections.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::tokio::sync::oneshot;

use super::mailbox::{Command, Mailbox};
use super::stream::StreamQueue;
use crate::conn::{self, deadline_after, Connection, Monitor};
use crate::demux::{self, CallReplies, Incoming};
use crate::error::{Error, ProtocolError};
use crate::protocol::{encode_cancel, CancelOutcome, Frames, Reply, StreamTracker, WireEvent, CANCEL_SERVICE};

/// Messages read from the DEALER before the thread looks at its mailbox again.
const READ_BATCH: usize = 256;
/// How long cancels still queued when the last handle goes may take to leave.
const SHUTDOWN_LINGER_MS: i32 = 500;

/// A stream in flight.
struct Slot {
    tracker: StreamTracker,
    queue: Arc<StreamQueue>,
    timeout: Duration,
    deadline: Option<Instant>,
}

/// Something waiting for an answer until a deadline.
struct Waiter<S, T> {
    state: S,
    timeout: Duration,
    deadline: Option<Instant>,
    reply: oneshot::Sender<T>,
}

impl<S, T> Waiter<S, T> {
    fn new(state: S, timeout: Duration, reply: oneshot::Sender<T>) -> Self {
        Waiter {
            state,
            timeout,
            deadline: deadline_after(timeout),
            reply,
        }
    }

    /// Its deadline passed, or nobody waits for the answer any more.
    fn is_over(&self, now: Instant) -> bool {
        matches!(self.deadline, Some(d) if now >= d) || self.reply.is_closed()
    }
}

type CallWaiter = Waiter<CallReplies, Result<Vec<Reply>, Error>>;
type CancelWaiter = Waiter<(), Result<CancelOutcome, Error>>;

pub(super) struct Io {
    // Field order is drop order: sockets close before the context terminates.
    sock: zmq::Socket,
    monitor: zmq::Socket,
    wake: zmq::Socket,
    mailbox: Arc<Mailbox>,
    endpoint: String,
    streams: HashMap<Vec<u8>, Slot>,
    /// Plain calls waiting, per service, first come first served.
    calls: HashMap<String, VecDeque<CallWaiter>>,
    /// `tts.cancel`s waiting for the broker's answer, per request id.
    cancels: HashMap<Vec<u8>, VecDeque<CancelWaiter>>,
    sleepers: Vec<(Option<Instant>, oneshot::Sender<()>)>,
    /// Messages ZeroMQ could not take yet (its queue to the broker was full), in order.
    outgoing: VecDeque<Frames>,
    shutdown: bool,
    /// Why the thread stops, for whatever still waits then.
    fatal: zmq::Error,
    _ctx: zmq::Context,
}

impl Io {
    /// Start the thread. It owns `conn` and `wake` from now on.
    pub(super) fn spawn(
        ctx: zmq::Context,
        conn: Connection,
        wake: zmq::Socket,
        mailbox: Arc<Mailbox>,
        endpoint: String,
    ) -> Result<(), Error> {
        let io = Io {
            sock: conn.sock,
            monitor: conn.monitor,
            wake,
            mailbox,
            endpoint,
            streams: HashMap::new(),
            calls: HashMap::new(),
            cancels: HashMap::new(),
            sleepers: Vec::new(),
            outgoing: VecDeque::new(),
            shutdown: false,
            fatal: zmq::Error::ETERM,
            _ctx: ctx,
        };
        std::thread::Builder::new()
            .name("tts-broker-client-io".into())
            .spawn(move || io.run())?;
        Ok(())
    }

    fn run(mut self) {
        match self.serve() {
            // Let cancels of streams dropped last leave before the socket closes.
            Ok(()) => {
                let _ = self.sock.set_linger(SHUTDOWN_LINGER_MS);
            }
            Err(e) => self.fatal = e,
        }
        // Dropping `self` fails whatever still waits (see `Drop`).
    }

    /// The loop; returns when the last handle is gone, or on a ZeroMQ failure.
    fn serve(&mut self) -> Result<(), zmq::Error> {
        loop {
            let deadline = self.next_deadline();
            let (readable, writable, monitor, woken) = {
                let out = if self.outgoing.is_empty() {
                    zmq::PollEvents::empty()
                } else {
                    zmq::POLLOUT
                };
                let mut items = [
                    self.sock.as_poll_item(zmq::POLLIN | out),
                    self.monitor.as_poll_item(zmq::POLLIN),
                    self.wake.as_poll_item(zmq::POLLIN),
                ];
                match zmq::poll(&mut items, conn::poll_timeout(deadline)) {
                    Ok(_) | Err(zmq::Error::EINTR) => {}
                    Err(e) => return Err(e),
                }
                (
                    items[0].is_readable(),
                    items[0].is_writable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                )
            };
            if woken {
                self.handle_commands()?;
            }
            // Replies that arrived before a disconnect still count: read them first.
            if readable {
                self.read_replies()?;
            }
            if monitor {
                self.read_monitor()?;
            }
            if writable {
                self.flush()?;
            }
            self.expire(Instant::now())?;
            if self.shutdown {
                self.flush()?;
                return Ok(());
            }
        }
    }

    fn handle_commands(&mut self) -> Result<(), zmq::Error> {
        // Read the wake-ups before taking the queue: one posted after this is not lost.
        loop {
            match self.wake.recv_bytes(zmq::DONTWAIT) {
                Ok(_) => {}
                Err(zmq::Error::EAGAIN) => break,
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        for command in self.mailbox.take() {
            self.handle(command)?;
        }
        Ok(())
    }

    fn handle(&mut self, command: Command) -> Result<(), zmq::Error> {
        match command {
            Command::Speak {
                rid,
                frames,
                queue,
                timeout,
            } => {
                // A disconnect notice already queued concerns the streams in
                // flight now, never this one: handle it first.
                self.read_monitor()?;
                self.streams.insert(
                    rid,
                    Slot {
                        tracker: StreamTracker::new(),
                        queue,
                        timeout,
                        deadline: deadline_after(timeout),
                    },
                );
                self.send(frames)?;
            }
            Command::Abandon(rid) => {
                if self.streams.remove(&rid).is_some() {
                    self.send(encode_cancel(&rid))?;
                }
            }
            Command::Cancel(rid) => {
                if self.streams.contains_key(&rid) {
                    self.send(encode_cancel(&rid))?;
                }
            }
            Command::CancelWait { rid, timeout, reply } => {
                self.read_monitor()?;
                let frames = encode_cancel(&rid);
                self.cancels
                    .entry(rid)
                    .or_default()
                    .push_back(Waiter::new((), timeout, reply));
                self.send(frames)?;
            }
            Command::Call {
                service,
                frames,
                timeout,
                reply,
            } => {
                self.read_monitor()?;
                self.calls
                    .entry(service)
                    .or_default()
                    .push_back(Waiter::new(CallReplies::default(), timeout, reply));
                self.send(frames)?;
            }
            Command::Sleep { until, reply } => self.sleepers.push((until, reply)),
            Command::Shutdown => self.shutdown = true,
        }
        Ok(())
    }

    /// Send now, or queue behind messages ZeroMQ could not take yet (never blocks).
    fn send(&mut self, frames: Frames) -> Result<(), zmq::Error> {
        self.outgoing.push_back(frames);
        self.flush()
    }

    fn flush(&mut self) -> Result<(), zmq::Error> {
        while let Some(frames) = self.outgoing.pop_front() {
            match self.sock.send_multipart(&frames, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => {
                    self.outgoing.push_front(frames);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_replies(&mut self) -> Result<(), zmq::Error> {
        for _ in 0..READ_BATCH {
            match self.sock.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => self.dispatch(frames)?,
                Err(zmq::Error::EAGAIN) => break,
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_monitor(&mut self) -> Result<(), zmq::Error> {
        loop {
            match conn::read_monitor(&self.monitor) {
                Ok(Monitor::Empty) => return Ok(()),
                Ok(Monitor::Disconnected) => self.connection_lost(),
                Ok(Monitor::Other) => {}
                Err(Error::Zmq(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    }

    /// The broker has forgotten every stream in flight: end them now.
    fn connection_lost(&mut self) {
        for (_, slot) in self.streams.drain() {
            slot.queue.fail(Error::ConnectionLost {
                endpoint: self.endpoint.clone(),
            });
        }
    }

    /// Route one message: to its stream, to a waiting call or cancel, or nowhere.
    fn dispatch(&mut self, frames: Frames) -> Result<(), zmq::Error> {
        let streams = &self.streams;
        match demux::classify(frames, |rid| streams.contains_key(rid)) {
            None => {}
            Some(Incoming::Stream { rid, is_final, event }) => self.stream_event(rid, is_final, event)?,
            Some(Incoming::Cancel(rid, outcome)) => {
                if let Some(waiters) = self.cancels.get_mut(&rid) {
                    if let Some(waiter) = waiters.pop_front() {
                        let _ = waiter.reply.send(Ok(outcome));
                    }
                    if waiters.is_empty() {
                        self.cancels.remove(&rid);
                    }
                }
            }
            Some(Incoming::Call(reply)) => {
                let service = reply.service.clone();
                if let Some(waiters) = self.calls.get_mut(&service) {
                    waiters.retain(|w| !w.reply.is_closed());
                    if let Some(waiter) = waiters.front_mut() {
                        waiter.deadline = deadline_after(waiter.timeout);
                        if let Some(result) = waiter.state.push(reply) {
                            if let Some(waiter) = waiters.pop_front() {
                                let _ = waiter.reply.send(result);
                            }
                        }
                    }
                    if waiters.is_empty() {
                        self.calls.remove(&service);
                    }
                }
            }
        }
        Ok(())
    }

    fn stream_event(
        &mut self,
        rid: Vec<u8>,
        is_final: bool,
        event: Result<WireEvent, ProtocolError>,
    ) -> Result<(), zmq::Error> {
        let slot = match self.streams.get_mut(&rid) {
            Some(slot) => slot,
            None => return Ok(()),
        };
        slot.deadline = deadline_after(slot.timeout);
        let (item, mut cancel) = demux::track(&mut slot.tracker, is_final, event);
        if let Some(item) = item {
            let last = slot.tracker.is_finished();
            if !slot.queue.push(item, Instant::now(), last) {
                // The reader fell behind (on an audio chunk, never the FINAL):
                // stop the broker, drop what follows.
                slot.tracker.finish();
                cancel = true;
            }
        }
        if slot.tracker.is_finished() {
            self.streams.remove(&rid);
        }
        if cancel {
            self.send(encode_cancel(&rid))?;
        }
        Ok(())
    }

    /// The nearest deadline of anything waiting (`None`: nothing ever expires).
    fn next_deadline(&self) -> Option<Instant> {
        let streams = self.streams.values().map(|s| s.deadline);
        let calls = self.calls.values().flatten().map(|w| w.deadline);
        let cancels = self.cancels.values().flatten().map(|w| w.deadline);
        let sleepers = self.sleepers.iter().map(|s| s.0);
        streams.chain(calls).chain(cancels).chain(sleepers).flatten().min()
    }

    fn expire(&mut self, now: Instant) -> Result<(), zmq::Error> {
        let silent: Vec<Vec<u8>> = self
            .streams
            .iter()
            .filter(|(_, slot)| matches!(slot.deadline, Some(d) if now >= d))
            .map(|(rid, _)| rid.clone())
            .collect();
        for rid in silent {
            if let Some(slot) = self.streams.remove(&rid) {
                slot.queue.fail(demux::stream_silent(&rid, slot.timeout));
                self.send(encode_cancel(&rid))?;
            }
        }
        for (service, waiters) in self.calls.iter_mut() {
            expire_waiters(waiters, now, service);
        }
        self.calls.retain(|_, waiters| !waiters.is_empty());
        for waiters in self.cancels.values_mut() {
            expire_waiters(waiters, now, CANCEL_SERVICE);
        }
        self.cancels.retain(|_, waiters| !waiters.is_empty());
        wake_sleepers(&mut self.sleepers, now);
        Ok(())
    }

    /// Stop for good after a ZeroMQ failure: everything waiting gets the error.
    fn fail_everything(&mut self, e: zmq::Error) {
        for command in self.mailbox.close(e) {
            match command {
                Command::Speak { queue, .. } => queue.fail(Error::Zmq(e)),
                Command::CancelWait { reply, .. } => {
                    let _ = reply.send(Err(Error::Zmq(e)));
                }
                Command::Call { reply, .. } => {
                    let _ = reply.send(Err(Error::Zmq(e)));
                }
                _ => {}
            }
        }
        for (_, slot) in self.streams.drain() {
            slot.queue.fail(Error::Zmq(e));
        }
        for (_, waiters) in self.calls.drain() {
            for w in waiters {
                let _ = w.reply.send(Err(Error::Zmq(e)));
            }
        }
        for (_, waiters) in self.cancels.drain() {
            for w in waiters {
                let _ = w.reply.send(Err(Error::Zmq(e)));
            }
        }
    }
}

impl Drop for Io {
    /// However the thread ends (even by a panic), nothing may wait forever:
    /// refuse new commands; streams still registered end with an error.
    fn drop(&mut self) {
        self.fail_everything(self.fatal);
    }
}

fn expire_waiters<S, T>(waiters: &mut VecDeque<Waiter<S, Result<T, Error>>>, now: Instant, service: &str) {
    let mut kept = VecDeque::with_capacity(waiters.len());
    for w in waiters.drain(..) {
        if !w.is_over(now) {
            kept.push_back(w);
        } else if !w.reply.is_closed() {
            let _ = w.reply.send(Err(demux::no_answer(service, w.timeout)));
        }
    }
    *waiters = kept;
}

/// Answer the sleepers whose time has come (and forget those nobody awaits).
fn wake_sleepers(sleepers: &mut Vec<(Option<Instant>, oneshot::Sender<()>)>, now: Instant) {
    let mut kept = Vec::with_capacity(sleepers.len());
    for (until, reply) in sleepers.drain(..) {
        if reply.is_closed() {
            continue;
        }
        if matches!(until, Some(t) if now >= t) {
            let _ = reply.send(());
        } else {
            kept.push((until, reply));
        }
    }
    *sleepers = kept;
}
