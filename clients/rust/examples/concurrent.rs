//! Several streams in flight on one client, read in reverse order, then a cancel.
//!
//! cargo run --offline --example concurrent -- tcp://127.0.0.1:5555

use std::time::Duration;

use tts_broker_client::{Client, Error, Event, Request};

fn main() -> Result<(), Error> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| tts_broker_client::DEFAULT_ENDPOINT.to_string());
    let client = Client::connect(&endpoint)?;
    if !client.wait_ready("tts", Duration::from_secs(30))? {
        eprintln!("no TTS worker is ready at {endpoint}");
        std::process::exit(1);
    }
    let texts = [
        "One little sentence.",
        "Two sentences here. And the second one.",
        "Three.",
    ];
    let mut streams = Vec::new();
    for text in texts {
        streams.push(client.speak(&Request::new(text))?);
    }
    // Read the last one first: replies for the others queue up meanwhile.
    for stream in streams.iter_mut().rev() {
        let pcm = stream.read_audio()?;
        let spec = stream.audio_spec().expect("a finished stream with audio has a spec");
        let stats = stream.stats().cloned().unwrap_or_default();
        println!(
            "{}: {} bytes at {} Hz {}, {} segment(s), ttfa {:.1} ms",
            String::from_utf8_lossy(stream.request_id()),
            pcm.len(),
            spec.sample_rate,
            spec.format,
            stats.segments.unwrap_or(0),
            stream.ttfa().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN),
        );
    }

    // Cancel a long one after its first chunk.
    let mut long = client.speak(&Request::new(
        "This one is cancelled after the first chunk of audio. ".repeat(5),
    ))?;
    let mut chunks = 0;
    loop {
        match long.next_event() {
            Ok(Some(Event::Audio { .. })) => {
                chunks += 1;
                if chunks == 1 {
                    long.cancel()?;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) if e.is_cancelled() => {
                println!("cancelled after {chunks} chunk(s): {e}");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
