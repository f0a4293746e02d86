//! Several tokio tasks share one async client handle and speak at once.
//!
//! cargo run --offline --features tokio --example async_table -- tcp://127.0.0.1:5555 [--tasks N] [--text TEXT]
//!
//! Each task (default 8) speaks its own line (or `--text`); task 0 is the narrator, at
//! priority 1 (fed first when not every stream can be). As events arrive:
//!
//! `start rid=<id> task=<k> engine=piper voice=<v> pid=<worker pid>`
//! `failover rid=<id> task=<k> engine=piper reason=<why> pid=<new worker pid> resume_at=<char>`
//!
//! and one line per stream when it ends:
//!
//! `stream rid=<id> task=<k> first_audio_ms=31.2 chunks=57 samples=50160 rate=22050 gapless=yes failovers=0 outcome=end`
//!
//! `outcome` is `end` or the error's code; `gapless` says whether the audio
//! sequence numbers went 0, 1, 2… without a hole. Exit status 1 if any
//! stream did not end with `end`.

use std::time::Duration;

use futures::StreamExt;
use tts_broker_client::tokio::Client;
use tts_broker_client::{Error, Event, Request, DEFAULT_ENDPOINT};

/// What one stream did.
struct Summary {
    rid: String,
    first_audio_ms: Option<f64>,
    chunks: u64,
    samples: u64,
    rate: u32,
    gapless: bool,
    failovers: u64,
    outcome: String,
}

async fn speak(client: Client, task: usize, text: String) -> Summary {
    let mut s = Summary {
        rid: String::new(),
        first_audio_ms: None,
        chunks: 0,
        samples: 0,
        rate: 0,
        gapless: true,
        failovers: 0,
        outcome: String::new(),
    };
    let request = Request::new(text).language("en");
    let request = if task == 0 { request.priority(1) } else { request };
    let mut stream = match client.speak(&request) {
        Ok(stream) => stream,
        Err(e) => {
            s.outcome = e.code().to_string();
            return s;
        }
    };
    s.rid = String::from_utf8_lossy(stream.request_id()).into_owned();
    let mut result: Result<(), Error> = Ok(());
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Start {
                sample_rate,
                engine,
                voice,
                worker,
                ..
            }) => {
                s.rate = sample_rate;
                println!(
                    "start rid={} task={task} engine={engine} voice={voice} pid={}",
                    s.rid,
                    worker.pid.unwrap_or(0)
                );
            }
            Ok(Event::Audio { seq, pcm, format }) => {
                s.gapless &= u64::from(seq) == s.chunks;
                s.chunks += 1;
                s.samples += (pcm.len() / format.sample_width()) as u64;
                if s.first_audio_ms.is_none() {
                    s.first_audio_ms = stream.ttfa().map(|d| d.as_secs_f64() * 1000.0);
                }
            }
            Ok(Event::Failover {
                engine,
                reason,
                worker,
                resume_at,
                ..
            }) => {
                s.failovers += 1;
                println!(
                    "failover rid={} task={task} engine={engine} reason={:?} pid={} resume_at={resume_at}",
                    s.rid,
                    reason,
                    worker.pid.unwrap_or(0)
                );
            }
            Ok(_) => {}
            Err(e) => result = Err(e),
        }
    }
    s.outcome = match result {
        Ok(()) if stream.stats().is_some() => "end".to_string(),
        Ok(()) => "incomplete".to_string(),
        Err(e) => {
            eprintln!("task {task}: {e}");
            e.code().to_string()
        }
    };
    s
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut endpoint = DEFAULT_ENDPOINT.to_string();
    let mut tasks = 8;
    let mut text = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tasks" => tasks = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--text" => text = args.next(),
            _ => endpoint = arg,
        }
    }
    if tasks == 0 {
        eprintln!("usage: async_table [ENDPOINT] [--tasks N>0] [--text TEXT]");
        std::process::exit(2);
    }
    let client = Client::builder(&endpoint).timeout(Duration::from_secs(60)).connect()?;
    if !client.wait_ready("tts", Duration::from_secs(60)).await? {
        eprintln!("no TTS worker is ready at {endpoint}");
        std::process::exit(1);
    }
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let line = text
                .clone()
                .unwrap_or_else(|| format!("Task {task} reporting. The caravan crossed the river at dawn."));
            tokio::spawn(speak(client.clone(), task, line))
        })
        .collect();
    let mut failed = false;
    for (task, handle) in handles.into_iter().enumerate() {
        let s = handle.await.expect("a task panicked");
        failed |= s.outcome != "end";
        println!(
            "stream rid={} task={task} first_audio_ms={} chunks={} samples={} rate={} gapless={} failovers={} outcome={}",
            s.rid,
            s.first_audio_ms.map_or_else(|| "none".to_string(), |ms| format!("{ms:.1}")),
            s.chunks,
            s.samples,
            s.rate,
            if s.gapless { "yes" } else { "no" },
            s.failovers,
            s.outcome,
        );
    }
    std::process::exit(i32::from(failed));
}
