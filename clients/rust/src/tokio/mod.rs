//! The async client (cargo feature `tokio`): one [`Client`] handle shared
//! by any number of tasks, each stream a [`futures_core::Stream`] of events.
//!
//! ```no_run
//! use futures::StreamExt;
//! use tts_broker_client::tokio::Client;
//! use tts_broker_client::{Event, Request};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), tts_broker_client::Error> {
//!     let client = Client::connect("tcp://127.0.0.1:5555")?;
//!     client.wait_ready("tts", std::time::Duration::from_secs(10)).await?;
//!     let mut tasks = Vec::new();
//!     for text in ["Hello there.", "General Kenobi."] {
//!         let client = client.clone(); // a cheap handle: same socket, same I/O thread
//!         tasks.push(tokio::spawn(async move {
//!             let mut stream = client.speak(&Request::new(text).language("en"))?;
//!             while let Some(event) = stream.next().await {
//!                 if let Event::Audio { pcm, .. } = event? { /* play pcm */ let _ = pcm; }
//!             }
//!             Ok::<_, tts_broker_client::Error>(stream.ttfa())
//!         }));
//!     }
//!     for task in tasks {
//!         println!("time to first audio: {:?}", task.await.expect("task panicked")?);
//!     }
//!     // Whole utterances, as `f32`:
//!     let audio = client.synthesize("Olá, tudo bem?", "pt-BR").await?;
//!     println!("{} samples at {} Hz", audio.samples.len(), audio.sample_rate);
//!     Ok(())
//! }
//! ```
//!
//! # How it works
//!
//! ZeroMQ sockets are not thread-safe, so one background thread (the *I/O
//! thread*) owns the client's `DEALER` socket; [`Client`] is a handle to it
//! (`Clone + Send + Sync`). Handles post commands (send this request, cancel
//! that stream…) to a queue and wake the thread through an inproc socket it
//! polls together with the `DEALER` and a disconnect monitor: no busy
//! polling, no sleep between a request and its first audio. The thread takes
//! every reply off the socket as it arrives and routes it to its stream by
//! request id, or to the call or cancel waiting for it; it checks each
//! stream's order (one `start`, audio numbered without gaps) as the blocking
//! client does. It stops when the last [`Client`], [`Stream`] and
//! [`CancelHandle`] are dropped.
//!
//! Because the I/O happens on that thread, the client needs no particular
//! runtime: it works under tokio (any flavour), `futures::executor`, or any
//! other executor. Every timeout (streams, calls, cancels, the pause of
//! [`Client::wait_ready`]) is kept by the I/O thread, not by a runtime timer.
//! [`Client::speak`] is not even `async`: it queues the request and returns
//! the stream at once.
//!
//! # Back-pressure
//!
//! A task that stops reading its stream must neither stall the others nor
//! make the client's memory grow without bound. So each stream has its own
//! buffer, filled by the I/O thread whatever the reader does, and bounded in
//! bytes of unread audio ([`Builder::buffer_limit`], default
//! [`DEFAULT_BUFFER_LIMIT`], 16 MiB: minutes of audio; synthesis runs many
//! times faster than real time, so a real-time player legitimately lets a
//! whole utterance queue up). When an audio chunk would pass that bound, the
//! I/O thread cancels the stream at the broker and drops whatever else comes
//! for it; the reader gets every event buffered before, then
//! [`Error::Overflow`](crate::Error::Overflow). Other streams are not
//! affected: the client's memory is at most about the limit times the
//! streams in flight (the broker allows 64 per client by default).
//!
//! # Timeouts and the connection
//!
//! * A stream that receives nothing for the client's timeout
//!   ([`Builder::timeout`], default 30 s) ends with
//!   [`Error::Timeout`](crate::Error::Timeout) and is cancelled at the broker,
//!   whether or not it is being read.
//! * The connection sends ZeroMQ heartbeats ([`Builder::heartbeat`], default
//!   1 s). When the connection drops (the broker died, restarted, or missed
//!   three heartbeats), every stream in flight ends at once with
//!   [`Error::ConnectionLost`](crate::Error::ConnectionLost); ZeroMQ
//!   reconnects by itself, and a stream started once the broker is back
//!   works: no user code is needed.
//! * Dropping an unfinished [`Stream`] cancels it at the broker; a
//!   [`CancelHandle`] cancels it from anywhere.
//! * Any `Duration` is a valid timeout (`Duration::MAX` waits forever).

mod client;
mod io;
mod mailbox;
mod stream;

pub use client::{Builder, Client, DEFAULT_BUFFER_LIMIT};
pub use stream::{CancelHandle, NextEvent, Stream};
