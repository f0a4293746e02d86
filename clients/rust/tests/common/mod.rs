//! A scripted in-process broker (a ROUTER socket) for the client tests, and
//! a TCP proxy that can silently stop forwarding (a frozen broker).

// Each test crate uses part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tts_broker_client::zmq;

pub type Frames = Vec<Vec<u8>>;

pub const START: &[u8] =
    br#"{"sample_rate":22050,"channels":1,"format":"s16le","engine":"piper","voice":"v","worker":{"id":"w1","pid":1}}"#;

pub const CANCELLED: &[u8] = br#"{"code":"cancelled","message":"cancelled by the client"}"#;

/// The broker side of the tests: a ROUTER that receives what the client
/// sends and replies whatever the test scripts.
pub struct FakeBroker {
    router: zmq::Socket,
    ctx: zmq::Context,
}

impl FakeBroker {
    /// A ROUTER bound to `endpoint`; returns it and the endpoint clients should connect to.
    pub fn bind(ctx: &zmq::Context, endpoint: &str) -> (FakeBroker, String) {
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind(endpoint).unwrap();
        let bound = router.get_last_endpoint().unwrap().unwrap();
        (
            FakeBroker {
                router,
                ctx: ctx.clone(),
            },
            bound,
        )
    }

    /// An `inproc://` broker in a new context (clients must use that context).
    pub fn inproc(name: &str) -> (FakeBroker, String) {
        FakeBroker::bind(&zmq::Context::new(), &format!("inproc://{name}"))
    }

    /// A TCP broker on a free loopback port.
    pub fn tcp() -> (FakeBroker, String) {
        FakeBroker::bind(&zmq::Context::new(), "tcp://127.0.0.1:*")
    }

    /// The context clients of an `inproc://` broker must share.
    pub fn context(&self) -> &zmq::Context {
        &self.ctx
    }

    /// Run a script on another thread (the client blocks or awaits meanwhile); join to get the broker back.
    pub fn serve(self, script: impl FnOnce(&FakeBroker) + Send + 'static) -> JoinHandle<FakeBroker> {
        std::thread::spawn(move || {
            script(&self);
            self
        })
    }

    /// Next client command: (identity, frames without the identity).
    pub fn recv(&self) -> (Vec<u8>, Frames) {
        self.recv_within(5000).expect("the client sent nothing")
    }

    /// Next client command within `ms` milliseconds, if any.
    pub fn recv_within(&self, ms: i64) -> Option<(Vec<u8>, Frames)> {
        if self.router.poll(zmq::POLLIN, ms).unwrap() == 0 {
            return None;
        }
        let mut frames = self.router.recv_multipart(0).unwrap();
        let rest = frames.split_off(1);
        Some((frames.remove(0), rest))
    }

    /// The next command, which must be a REQUEST: (identity, service, body).
    pub fn recv_request(&self) -> (Vec<u8>, String, Frames) {
        let (id, frames) = self.recv();
        assert_eq!(&frames[0], b"MDPC02");
        assert_eq!(&frames[1], &[0x01]);
        (id, String::from_utf8(frames[2].clone()).unwrap(), frames[3..].to_vec())
    }

    /// The next command must be a TTS request: (identity, request id, JSON).
    pub fn recv_tts(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (id, service, body) = self.recv_request();
        assert_eq!(service, "tts");
        assert_eq!(body.len(), 2, "{body:?}");
        (id, body[0].clone(), body[1].clone())
    }

    pub fn reply(&self, id: &[u8], is_final: bool, service: &str, body: &[&[u8]]) {
        let mut frames: Frames = vec![
            id.to_vec(),
            b"MDPC02".to_vec(),
            vec![if is_final { 3 } else { 2 }],
            service.as_bytes().to_vec(),
        ];
        frames.extend(body.iter().map(|b| b.to_vec()));
        self.router.send_multipart(frames, 0).unwrap();
    }

    pub fn raw(&self, id: &[u8], frames: &[&[u8]]) {
        let mut all: Frames = vec![id.to_vec()];
        all.extend(frames.iter().map(|b| b.to_vec()));
        self.router.send_multipart(all, 0).unwrap();
    }

    pub fn start(&self, id: &[u8], rid: &[u8]) {
        self.reply(id, false, "tts", &[rid, b"start", START]);
    }

    pub fn audio(&self, id: &[u8], rid: &[u8], seq: u32, pcm: &[u8]) {
        self.reply(id, false, "tts", &[rid, b"audio", &seq.to_be_bytes(), pcm]);
    }

    pub fn end(&self, id: &[u8], rid: &[u8]) {
        self.reply(
            id,
            true,
            "tts",
            &[rid, b"end", br#"{"samples":2,"ttfa_ms":5.5,"engines":["piper"]}"#],
        );
    }

    /// A stream's FINAL `error` `cancelled`.
    pub fn cancelled(&self, id: &[u8], rid: &[u8]) {
        self.reply(id, true, "tts", &[rid, b"error", CANCELLED]);
    }

    /// A PAIR socket that becomes readable when a client's connection to
    /// this broker closes (a ZeroMQ monitor of the ROUTER).
    pub fn watch_disconnects(&self) -> zmq::Socket {
        static MONITORS: AtomicUsize = AtomicUsize::new(0);
        let addr = format!(
            "inproc://fake-broker-monitor-{}",
            MONITORS.fetch_add(1, Ordering::SeqCst)
        );
        self.router
            .monitor(&addr, zmq::SocketEvent::DISCONNECTED as i32)
            .unwrap();
        let pair = self.ctx.socket(zmq::PAIR).unwrap();
        pair.connect(&addr).unwrap();
        pair
    }

    /// The next command must be a cancel of `rid`.
    pub fn expect_cancel(&self, rid: &[u8]) {
        let (_, service, body) = self.recv_request();
        assert_eq!(service, "tts.cancel");
        assert_eq!(body, vec![rid.to_vec()]);
    }
}

/// A TCP proxy between clients and a broker. [`Proxy::freeze`] makes it stop
/// forwarding in both directions without closing anything: to the client,
/// the broker is alive but silent (frozen, or behind a dead network path).
pub struct Proxy {
    pub endpoint: String,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    /// Forward connections to the TCP endpoint `upstream` (`tcp://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("tcp://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (client, flag) = match client {
                    Ok(c) => (c, flag.clone()),
                    Err(_) => return,
                };
                if flag.load(Ordering::SeqCst) {
                    // Frozen: accept and hold, never answer.
                    std::thread::spawn(move || hold(client));
                    continue;
                }
                let server = TcpStream::connect(&upstream).unwrap();
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), flag.clone());
                pipe(server, client, flag);
            }
        });
        Proxy { endpoint, frozen }
    }

    /// Stop forwarding: bytes are read and dropped, nothing is closed.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::SeqCst) {
                // Keep both ends open, forward nothing.
                std::mem::forget(to);
                return hold(from);
            }
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
}

fn hold(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
    }
}

/// Little-endian 16-bit PCM of these samples.
pub fn pcm16(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Some time for ZeroMQ to notice something (a connection, a disconnect) in the background.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}
