//! How handles talk to the I/O thread: a queue of commands and an inproc
//! PUSH socket that wakes the thread's `zmq::poll` when the queue stops
//! being empty (no busy polling, no sleep).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::tokio::sync::oneshot;

use super::stream::StreamQueue;
use crate::error::Error;
use crate::protocol::{CancelOutcome, Frames, Reply};

/// What a handle asks the I/O thread to do.
pub(super) enum Command {
    /// Register a stream, then send its request.
    Speak {
        rid: Vec<u8>,
        frames: Frames,
        queue: Arc<StreamQueue>,
        timeout: Duration,
    },
    /// The stream's reader is gone: forget it, and cancel it at the broker if it still runs.
    Abandon(Vec<u8>),
    /// Cancel a stream at the broker if it still runs (fire and forget).
    Cancel(Vec<u8>),
    /// Send a `tts.cancel` and wait for the broker's answer.
    CancelWait {
        rid: Vec<u8>,
        timeout: Duration,
        reply: oneshot::Sender<Result<CancelOutcome, Error>>,
    },
    /// A plain request; every reply until the FINAL.
    Call {
        service: String,
        frames: Frames,
        timeout: Duration,
        reply: oneshot::Sender<Result<Vec<Reply>, Error>>,
    },
    /// Answer at `until` (`None`: never): a timer that needs no async runtime.
    Sleep {
        until: Option<Instant>,
        reply: oneshot::Sender<()>,
    },
    /// The last handle is gone.
    Shutdown,
}

struct State {
    commands: VecDeque<Command>,
    wake: zmq::Socket,
    /// Set when the I/O thread has stopped: nothing posted would be read.
    closed: Option<zmq::Error>,
}

/// The queue both sides share.
pub(super) struct Mailbox {
    state: Mutex<State>,
}

impl Mailbox {
    /// A mailbox whose wake-ups go through `wake` (a PUSH connected to the thread's PULL).
    pub(super) fn new(wake: zmq::Socket) -> Mailbox {
        Mailbox {
            state: Mutex::new(State {
                commands: VecDeque::new(),
                wake,
                closed: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the queue is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue a command for the I/O thread and wake it if the queue was empty
    /// (otherwise a wake-up is already on its way). Fails once the thread has stopped.
    pub(super) fn post(&self, command: Command) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(e) = state.closed {
            return Err(Error::Zmq(e));
        }
        let was_empty = state.commands.is_empty();
        state.commands.push_back(command);
        if was_empty {
            // Never blocks. EAGAIN would mean the thread has a thousand
            // wake-ups unread: it is awake anyway.
            let _ = state.wake.send(&b""[..], zmq::DONTWAIT);
        }
        Ok(())
    }

    /// Everything queued so far (the I/O thread calls this after reading its wake-ups).
    pub(super) fn take(&self) -> VecDeque<Command> {
        std::mem::take(&mut self.lock().commands)
    }

    /// Refuse further commands (the thread is stopping because of `error`)
    /// and return those not handled yet.
    pub(super) fn close(&self, error: zmq::Error) -> VecDeque<Command> {
        let mut state = self.lock();
        state.closed.get_or_insert(error);
        std::mem::take(&mut state.commands)
    }

    /// Why the thread stopped, once it has.
    pub(super) fn closed(&self) -> Option<zmq::Error> {
        self.lock().closed
    }
}
