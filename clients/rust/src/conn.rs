//! What both clients do with their ZeroMQ sockets: open the DEALER (with
//! heartbeats and a disconnect monitor), read the monitor, and compute
//! deadlines that never overflow.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::curve::CurveKeys;
use crate::error::Error;

/// How often a client sends a ZeroMQ heartbeat (ZMTP PING) when the
/// connection is otherwise silent.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// How many heartbeat intervals without any traffic from the broker end the
/// connection (ZMQ_HEARTBEAT_TIMEOUT, and the TTL the broker is told).
const HEARTBEAT_LIVENESS: u32 = 3;

static CLIENTS: AtomicU64 = AtomicU64::new(0);

/// A DEALER connected to the broker and the PAIR that receives its disconnect notices.
pub(crate) struct Connection {
    pub(crate) sock: zmq::Socket,
    pub(crate) monitor: zmq::Socket,
    /// Request ids start with it: `<8 hex digits>-<counter>`.
    pub(crate) prefix: String,
}

fn random_prefix(n: u64) -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(n);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:08x}", h.finish() as u32)
}

/// Milliseconds for a ZeroMQ `int` option, saturated.
fn option_ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Open a DEALER to `endpoint`. `heartbeat`: the ZMTP heartbeat interval
/// (`Duration::ZERO`: none); the connection is dropped (and the monitor
/// says so) when the broker is silent for three intervals, so a broker that
/// froze or vanished without closing TCP is noticed as a lost connection.
/// `curve`: the keys for a broker with CURVE (`None`: plain ZeroMQ).
pub(crate) fn open(
    ctx: &zmq::Context,
    endpoint: &str,
    heartbeat: Duration,
    curve: Option<&CurveKeys>,
) -> Result<Connection, Error> {
    let n = CLIENTS.fetch_add(1, Ordering::Relaxed);
    let prefix = random_prefix(n);
    let sock = ctx.socket(zmq::DEALER)?;
    sock.set_linger(0)?;
    if let Some(keys) = curve {
        keys.apply(&sock)?;
    }
    if !heartbeat.is_zero() {
        // ZeroMQ takes milliseconds; its TTL is kept in tenths of a second, at most 6553.5 s.
        let ivl = heartbeat.max(Duration::from_millis(1));
        let timeout = ivl.saturating_mul(HEARTBEAT_LIVENESS);
        sock.set_heartbeat_ivl(option_ms(ivl))?;
        sock.set_heartbeat_timeout(option_ms(timeout))?;
        sock.set_heartbeat_ttl(option_ms(timeout.max(Duration::from_millis(100))).min(6_553_500))?;
    }
    // A dropped connection means the broker died or restarted: it has
    // forgotten our streams, so they fail now instead of at the timeout.
    let monitor_addr = format!("inproc://tts-broker-client-monitor-{}-{prefix}-{n}", std::process::id());
    sock.monitor(&monitor_addr, zmq::SocketEvent::DISCONNECTED as i32)?;
    let monitor = ctx.socket(zmq::PAIR)?;
    monitor.set_linger(0)?;
    monitor.connect(&monitor_addr)?;
    sock.connect(endpoint)?;
    Ok(Connection { sock, monitor, prefix })
}

/// What reading the monitor socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Monitor {
    /// Nothing was queued.
    Empty,
    /// The connection to the broker dropped.
    Disconnected,
    /// Some other notice (or an interrupted read): read again.
    Other,
}

/// Read one queued monitor notice, without waiting.
pub(crate) fn read_monitor(monitor: &zmq::Socket) -> Result<Monitor, Error> {
    match monitor.recv_multipart(zmq::DONTWAIT) {
        Ok(frames) => {
            let event = frames
                .first()
                .and_then(|f| f.get(0..2))
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .unwrap_or(0);
            if event & zmq::SocketEvent::DISCONNECTED.to_raw() != 0 {
                Ok(Monitor::Disconnected)
            } else {
                Ok(Monitor::Other)
            }
        }
        Err(zmq::Error::EAGAIN) => Ok(Monitor::Empty),
        Err(zmq::Error::EINTR) => Ok(Monitor::Other),
        Err(e) => Err(e.into()),
    }
}

/// `now + d`, or `None` (wait forever) when that is beyond what `Instant` can hold.
pub(crate) fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// True once `deadline` (`None`: never) has passed.
pub(crate) fn expired(deadline: Option<Instant>) -> bool {
    matches!(deadline, Some(d) if Instant::now() >= d)
}

/// A `zmq::poll` timeout until `deadline` (`None`: -1, forever).
pub(crate) fn poll_timeout(deadline: Option<Instant>) -> i64 {
    deadline.map_or(-1, |d| {
        let left = d.saturating_duration_since(Instant::now());
        // Round up so that a poll never wakes just before its deadline and spins.
        let ms = left.as_micros().saturating_add(999) / 1000;
        i64::try_from(ms).unwrap_or(i64::MAX)
    })
}

/// A send timeout for ZeroMQ (`SNDTIMEO`), saturated.
pub(crate) fn send_timeout_ms(d: Duration) -> i32 {
    option_ms(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeouts_never_overflow() {
        assert_eq!(poll_timeout(None), -1);
        assert_eq!(poll_timeout(deadline_after(Duration::MAX)), -1);
        assert_eq!(poll_timeout(Some(Instant::now())), 0);
        let ms = poll_timeout(deadline_after(Duration::from_millis(1500)));
        assert!((1400..=1500).contains(&ms), "{ms}");
        assert_eq!(send_timeout_ms(Duration::MAX), i32::MAX);
    }

    #[test]
    fn heartbeat_options_reach_the_socket() {
        let ctx = zmq::Context::new();
        let c = open(&ctx, "inproc://conn-heartbeat", Duration::from_millis(250), None).unwrap();
        assert_eq!(c.sock.get_heartbeat_ivl().unwrap(), 250);
        assert_eq!(c.sock.get_heartbeat_timeout().unwrap(), 750);
        assert_eq!(c.sock.get_heartbeat_ttl().unwrap(), 700, "kept in tenths of a second");
        let c = open(&ctx, "inproc://conn-heartbeat", Duration::MAX, None).unwrap();
        assert_eq!(c.sock.get_heartbeat_ivl().unwrap(), i32::MAX);
        assert_eq!(c.sock.get_heartbeat_ttl().unwrap(), 6_553_500);
        let c = open(&ctx, "inproc://conn-heartbeat", Duration::ZERO, None).unwrap();
        assert_eq!(c.sock.get_heartbeat_ivl().unwrap(), 0);
        assert_ne!(c.prefix, open(&ctx, "inproc://x", Duration::ZERO, None).unwrap().prefix);
    }
}
