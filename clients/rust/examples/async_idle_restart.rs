//! The async client speaks, stays idle while the broker restarts, then
//! speaks again on the same handle: no reconnect code.
//!
//! cargo run --offline --features tokio --example async_idle_restart -- tcp://127.0.0.1:5555
//!
//! Prints `before: N bytes`, then waits for a line on standard input (restart
//! the broker meanwhile), then prints `after: N bytes, engines [...]`.

use std::io::{BufRead, Write};
use std::time::Duration;

use tts_broker_client::tokio::Client;
use tts_broker_client::{Error, Request, DEFAULT_ENDPOINT};

async fn speak(client: &Client, text: &str) -> Result<(usize, Vec<String>), Error> {
    let mut stream = client.speak(&Request::new(text).language("en"))?;
    let pcm = stream.read_audio().await?;
    let engines = stream.stats().map(|s| s.engines.clone()).unwrap_or_default();
    Ok((pcm.len(), engines))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let client = Client::builder(&endpoint).timeout(Duration::from_secs(60)).connect()?;
    if !client.wait_ready("tts", Duration::from_secs(60)).await? {
        eprintln!("no TTS worker is ready at {endpoint}");
        std::process::exit(1);
    }
    let (bytes, _) = speak(&client, "Before the restart.").await?;
    println!("before: {bytes} bytes");
    std::io::stdout().flush()?;
    // Idle: no stream in flight until the next line arrives.
    tokio::task::spawn_blocking(|| std::io::stdin().lock().read_line(&mut String::new()))
        .await
        .expect("stdin reader panicked")?;
    let (bytes, engines) = speak(&client, "After the restart.").await?;
    println!("after: {bytes} bytes, engines {engines:?}");
    Ok(())
}
