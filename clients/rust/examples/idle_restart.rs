//! Speak, stay idle while the broker restarts, then speak again on the same client.
//!
//! cargo run --offline --example idle_restart -- tcp://127.0.0.1:5555
//!
//! Prints `before: N bytes`, then waits for a line on standard input (restart
//! the broker meanwhile), then prints `after: N bytes, engines [...]`. A stale
//! disconnect notice must not fail the second stream.

use std::io::{BufRead, Write};
use std::time::Duration;

use tts_broker_client::{Client, Error, Request};

fn speak(client: &Client, text: &str) -> Result<(usize, Vec<String>), Error> {
    let mut stream = client.speak(&Request::new(text).language("en"))?;
    let pcm = stream.read_audio()?;
    let engines = stream.stats().map(|s| s.engines.clone()).unwrap_or_default();
    Ok((pcm.len(), engines))
}

fn main() -> Result<(), Error> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| tts_broker_client::DEFAULT_ENDPOINT.to_string());
    let client = Client::connect(&endpoint)?.with_timeout(Duration::from_secs(60))?;
    if !client.wait_ready("tts", Duration::from_secs(60))? {
        eprintln!("no TTS worker is ready at {endpoint}");
        std::process::exit(1);
    }
    let (bytes, _) = speak(&client, "Before the restart.")?;
    println!("before: {bytes} bytes");
    std::io::stdout().flush()?;
    // Idle: nothing reads the socket until the next line arrives.
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let (bytes, engines) = speak(&client, "After the restart.")?;
    println!("after: {bytes} bytes, engines {engines:?}");
    Ok(())
}
