//! Time-to-first-audio probe for benchmarks: connects once, then answers
//! one JSON line on standard output per JSON line on standard input.
//!
//! cargo run --offline --release --features tokio --example ttfa_probe -- tcp://127.0.0.1:5555 [SECRET_CERT BROKER_CERT]
//!
//! With the two certificate paths (the client's `NAME.key_secret` and the
//! broker's `broker.key`), it talks CURVE to a broker with `[security] curve = true`.
//!
//! Input, one object per line:
//! `{"text": "Hello there.", "concurrent": 3}` (`concurrent` default 1; also
//! optional `language`, `voice`, `engine`, `stream`, `format`, `sample_rate`,
//! `chunk_ms`, as in PROTOCOL.md). It speaks `concurrent` copies at once
//! through one client handle and prints
//!
//! `{"ttfa_ms": [..], "total_ms": [..], "chunks": [..], "ok": true}`
//!
//! with one entry per stream: milliseconds from just before `speak()` to the
//! task receiving the first `Audio` event, and to the `End`; `null` for a
//! stream that failed, and then `"ok": false` and `"errors": [..]`. A line
//! that is not valid gets `{"ok": false, "error": "..."}`. Exits at end of
//! input. Progress and problems go to standard error.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tts_broker_client::tokio::Client;
use tts_broker_client::{CurveKeys, Error, Event, Request, SampleFormat, StreamMode, DEFAULT_ENDPOINT};

struct Timing {
    ttfa_ms: Option<f64>,
    total_ms: f64,
    chunks: u64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

async fn one(client: Client, request: Request) -> Result<Timing, Error> {
    let t0 = Instant::now();
    let mut stream = client.speak(&request)?;
    let mut ttfa_ms = None;
    let mut chunks = 0;
    while let Some(event) = stream.next().await {
        if let Event::Audio { .. } = event? {
            chunks += 1;
            ttfa_ms.get_or_insert_with(|| ms(t0.elapsed()));
        }
    }
    Ok(Timing {
        ttfa_ms,
        total_ms: ms(t0.elapsed()),
        chunks,
    })
}

/// The request a line asks for, and how many copies.
fn parse(line: &str) -> Result<(Request, usize), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let text = v["text"].as_str().ok_or("\"text\" (a string) is required")?;
    let mut r = Request::new(text);
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let n = |k: &str| v.get(k).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    if let Some(x) = s("language") {
        r = r.language(x);
    }
    if let Some(x) = s("voice") {
        r = r.voice(x);
    }
    if let Some(x) = s("engine") {
        r = r.engine(x);
    }
    if let Some(x) = s("stream") {
        r = r.stream(StreamMode::parse(x).ok_or("\"stream\" must be frames or sentence")?);
    }
    if let Some(x) = s("format") {
        r = r.format(SampleFormat::parse(x).ok_or("\"format\" must be s16le or f32le")?);
    }
    if let Some(x) = n("sample_rate") {
        r = r.sample_rate(x);
    }
    if let Some(x) = n("chunk_ms") {
        r = r.chunk_ms(x);
    }
    let concurrent = match v.get("concurrent") {
        None => 1,
        Some(c) => c
            .as_u64()
            .filter(|c| (1..=1000).contains(c))
            .ok_or("\"concurrent\" must be an integer from 1 to 1000")? as usize,
    };
    Ok((r, concurrent))
}

async fn probe(client: &Client, request: Request, concurrent: usize) -> Value {
    let tasks: Vec<_> = (0..concurrent)
        .map(|_| tokio::spawn(one(client.clone(), request.clone())))
        .collect();
    let (mut ttfa, mut total, mut chunks, mut errors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        match task.await.expect("a probe task panicked") {
            Ok(t) => {
                ttfa.push(json!(t.ttfa_ms));
                total.push(json!(t.total_ms));
                chunks.push(json!(t.chunks));
                if t.ttfa_ms.is_none() {
                    errors.push("no audio".to_string());
                }
            }
            Err(e) => {
                ttfa.push(Value::Null);
                total.push(Value::Null);
                chunks.push(Value::Null);
                errors.push(e.to_string());
            }
        }
    }
    let mut out = json!({"ttfa_ms": ttfa, "total_ms": total, "chunks": chunks, "ok": errors.is_empty()});
    if !errors.is_empty() {
        out["errors"] = json!(errors);
    }
    out
}

fn main() -> Result<(), Error> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().build()?;
    let mut builder = Client::builder(&endpoint).timeout(Duration::from_secs(60));
    if let (Some(own), Some(broker)) = (std::env::args().nth(2), std::env::args().nth(3)) {
        builder = builder.curve(CurveKeys::from_files(own, broker)?);
    }
    let client = builder.connect()?;
    if !runtime.block_on(client.wait_ready("tts", Duration::from_secs(60)))? {
        eprintln!("ttfa_probe: no TTS worker ready at {endpoint} yet; going on");
    }
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let out = match parse(&line) {
            Ok((request, concurrent)) => runtime.block_on(probe(&client, request, concurrent)),
            Err(e) => json!({"ok": false, "error": e}),
        };
        let mut w = stdout.lock();
        writeln!(w, "{out}")?;
        w.flush()?;
    }
    Ok(())
}
