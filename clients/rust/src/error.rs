//! The crate's error type.

use std::fmt;
use std::time::Duration;

/// An error code of the TTS protocol (PROTOCOL.md, "Error codes").
///
/// Codes this version does not know are kept verbatim in [`ErrorCode::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Invalid JSON, blank text, unknown key, bad format / rate / language, unknown voice…
    BadRequest,
    /// Text longer than the broker's `max_text_chars`.
    TooLarge,
    /// No live worker could serve the request, or the connection to the broker dropped.
    Unavailable,
    /// The request waited too long (at the broker, or for a reply at the client).
    Timeout,
    /// The client cancelled the stream.
    Cancelled,
    /// Too many requests in flight for this client, or the broker's queue is full.
    Overloaded,
    /// The engine failed and nobody could take over (or the client saw a broken stream).
    Internal,
    /// A code this client does not know.
    Other(String),
}

impl ErrorCode {
    /// Parse a wire code; never fails (unknown codes become [`ErrorCode::Other`]).
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "bad_request" => ErrorCode::BadRequest,
            "too_large" => ErrorCode::TooLarge,
            "unavailable" => ErrorCode::Unavailable,
            "timeout" => ErrorCode::Timeout,
            "cancelled" => ErrorCode::Cancelled,
            "overloaded" => ErrorCode::Overloaded,
            "internal" => ErrorCode::Internal,
            other => ErrorCode::Other(other.to_string()),
        }
    }

    /// The code as it travels on the wire (`"bad_request"`, …).
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
            ErrorCode::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message from the broker that does not follow PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    message: String,
}

impl ProtocolError {
    /// A protocol error with this description.
    pub fn new(message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            message: message.into(),
        }
    }

    /// The description.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// Everything that can go wrong talking to the broker.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The stream ended with a FINAL `error` event from the broker.
    Tts {
        /// The error code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Nothing arrived for a stream (or a call) within the client's timeout.
    Timeout {
        /// How long the client waited.
        waited: Duration,
        /// What it waited for (`"for stream …"`, `"from tts.status"`).
        what: String,
    },
    /// The connection to the broker dropped while the stream was in flight;
    /// the broker has forgotten it (it may have restarted). Retry if you like.
    ConnectionLost {
        /// The broker endpoint the client is connected to.
        endpoint: String,
    },
    /// An `audio` chunk arrived out of order: the stream is broken (and was cancelled).
    SequenceGap {
        /// The sequence number the client expected.
        expected: u32,
        /// The one that arrived.
        got: u32,
    },
    /// A malformed reply for this stream (the stream was cancelled).
    Protocol(ProtocolError),
    /// The reader of an async stream fell behind: the audio it had not read
    /// yet would have passed the client's per-stream buffer limit, so the
    /// client cancelled the stream at the broker and dropped the rest. The
    /// events received before are still read first. Read faster (or raise the
    /// limit: `tokio::Builder::buffer_limit`).
    Overflow {
        /// The limit, in bytes of buffered audio.
        limit: usize,
    },
    /// The client refused to send something (for example an invalid service name).
    InvalidRequest(String),
    /// ZeroMQ failed (socket creation, connect, send, poll…).
    Zmq(zmq::Error),
    /// I/O, for instance writing a WAV file.
    Io(std::io::Error),
    /// CURVE keys that cannot be used (a malformed key or certificate file),
    /// or a libzmq built without CURVE.
    Curve(String),
}

impl Error {
    /// The protocol error code that best describes this error.
    ///
    /// A broker `error` keeps its own code; a client-side timeout is `timeout`,
    /// a lost connection `unavailable`, a broken stream `internal`, a reader
    /// that fell behind ([`Error::Overflow`]) `overloaded`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Tts { code, .. } => code.clone(),
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::ConnectionLost { .. } | Error::Zmq(_) => ErrorCode::Unavailable,
            Error::SequenceGap { .. } | Error::Protocol(_) | Error::Io(_) => ErrorCode::Internal,
            Error::InvalidRequest(_) | Error::Curve(_) => ErrorCode::BadRequest,
            Error::Overflow { .. } => ErrorCode::Overloaded,
        }
    }

    /// True when the stream ended because it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            Error::Tts {
                code: ErrorCode::Cancelled,
                ..
            }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Tts { code, message } => write!(f, "{code}: {message}"),
            Error::Timeout { waited, what } => {
                write!(f, "timeout: no reply {what} within {} ms", waited.as_millis())
            }
            Error::ConnectionLost { endpoint } => {
                write!(f, "unavailable: lost the connection to the broker at {endpoint}")
            }
            Error::SequenceGap { expected, got } => {
                write!(f, "internal: audio sequence gap: expected {expected}, got {got}")
            }
            Error::Protocol(e) => e.fmt(f),
            Error::Overflow { limit } => write!(
                f,
                "overloaded: the stream's reader fell behind: more than {limit} bytes of audio unread; cancelled"
            ),
            Error::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            Error::Zmq(e) => write!(f, "zeromq: {e}"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Curve(m) => write!(f, "curve: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Protocol(e) => Some(e),
            Error::Zmq(e) => Some(e),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<zmq::Error> for Error {
    fn from(e: zmq::Error) -> Error {
        Error::Zmq(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Error {
        Error::Protocol(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for s in [
            "bad_request",
            "too_large",
            "unavailable",
            "timeout",
            "cancelled",
            "overloaded",
            "internal",
            "new_code",
        ] {
            assert_eq!(ErrorCode::parse(s).as_str(), s);
        }
        assert_eq!(ErrorCode::parse("new_code"), ErrorCode::Other("new_code".into()));
    }

    #[test]
    fn display_and_code() {
        let e = Error::Tts {
            code: ErrorCode::BadRequest,
            message: "text is empty".into(),
        };
        assert_eq!(e.to_string(), "bad_request: text is empty");
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let gap = Error::SequenceGap { expected: 3, got: 5 };
        assert_eq!(gap.code(), ErrorCode::Internal);
        assert!(gap.to_string().contains("expected 3, got 5"));
        let t = Error::Timeout {
            waited: Duration::from_millis(1500),
            what: "for stream r1".into(),
        };
        assert_eq!(t.to_string(), "timeout: no reply for stream r1 within 1500 ms");
        assert!(Error::Tts {
            code: ErrorCode::Cancelled,
            message: String::new()
        }
        .is_cancelled());
        let o = Error::Overflow { limit: 4096 };
        assert_eq!(o.code(), ErrorCode::Overloaded);
        assert!(o.to_string().contains("4096 bytes"), "{o}");
        let p: Error = ProtocolError::new("bad").into();
        assert!(std::error::Error::source(&p).is_some());
    }
}
