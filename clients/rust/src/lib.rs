#![warn(missing_docs)]
//! Rust client for the tts-broker text-to-speech broker.
//!
//! The broker speaks ZeroMQ [MDP/0.2 (RFC 18)](https://rfc.zeromq.org/spec/18/)
//! with a TTS event layer; `PROTOCOL.md` at the root of the repository is the
//! wire contract this crate implements:
//!
//! * one `DEALER` socket per [`Client`], many streams in flight on it, each
//!   with its own request id; replies for other streams are queued while you
//!   read one;
//! * typed [`Event`]s (`Start`, `Audio`, `Mark`, `Failover`, `End`); unknown
//!   events are skipped; audio sequence numbers are checked (a gap is an
//!   [`Error::SequenceGap`]); a FINAL `error` becomes [`Error::Tts`] with its
//!   [`ErrorCode`];
//! * cancel ([`Stream::cancel`], or drop the stream; [`Client::cancel`]
//!   returns the broker's answer), a per-stream timeout, and the
//!   `mmi.service` readiness check ([`Client::wait_ready`], [`ServiceStatus`]);
//! * audio as `f32` whatever the wire format ([`Event::samples_f32`],
//!   [`Stream::next_chunk_f32`]) and whole utterances ([`Client::synthesize`]
//!   returning an [`Audio`]);
//! * plain calls to other services returning every reply
//!   ([`Client::call`]);
//! * ZeroMQ heartbeats on the connection ([`DEFAULT_HEARTBEAT`]): a broker
//!   that vanished without closing the connection is noticed too;
//! * CurveZMQ for a broker with `[security] curve = true` ([`CurveKeys`],
//!   [`Client::connect_secure`], `tokio::Builder::curve`): keys as z85 text or
//!   read from the certificate files `tts-broker keys` writes;
//! * with the cargo feature `tokio`, an async client (`tts_broker_client::tokio`):
//!   one `Clone + Send + Sync` handle shared by any number of tasks, each
//!   stream a `futures::Stream` with a bounded buffer (see that module).
//!
//! ```no_run
//! use tts_broker_client::{Client, Event, Request};
//!
//! fn main() -> Result<(), tts_broker_client::Error> {
//!     let client = Client::connect("tcp://127.0.0.1:5555")?;
//!     client.wait_ready("tts", std::time::Duration::from_secs(10))?;
//!     for event in client.speak(&Request::new("Hello there.").language("en"))? {
//!         match event? {
//!             Event::Start { sample_rate, format, .. } => println!("{sample_rate} Hz {format}"),
//!             Event::Audio { pcm, .. } => { /* play or store pcm */ let _ = pcm; }
//!             Event::End { stats } => println!("{:?} s of audio", stats.audio_s),
//!             _ => {}
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! The pure framing layer ([`protocol`]) and the WAV writer ([`wav`]) need no
//! socket and can be reused on their own.

mod audio;
mod client;
mod conn;
mod curve;
mod demux;
mod error;
mod event;
pub mod protocol;
mod request;
mod timing;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod wav;

pub use audio::{extend_f32, pcm_to_f32, Audio};
pub use client::{Client, Stream, DEFAULT_ENDPOINT, DEFAULT_TIMEOUT};
pub use conn::DEFAULT_HEARTBEAT;
pub use curve::{curve_available, CurveKeys};
pub use error::{Error, ErrorCode, ProtocolError};
pub use event::{AudioSpec, Event, SampleFormat, Stats, WorkerInfo};
pub use protocol::{CancelOutcome, Reply, ServiceStatus};
pub use request::{Request, StreamMode};
pub use timing::{PhonemeSpan, Timing, TimingKind, TimingTrack, VisemeSpan, WordSpan};

/// The `zmq` crate this client is built on, for [`Client::connect_with_context`].
pub use zmq;
