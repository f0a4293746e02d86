//! The voice pipeline's `TtsEngine` served by the broker instead of an
//! in-process Piper or XTTS model: the pipeline's `PiperAudio` and
//! `TtsEngine` are copied in unchanged, with its language routing, and
//! implemented over the async client, whole utterances (the blocking trait)
//! and streamed `f32` chunks.
//!
//! cargo run --offline --features tokio --example tts_engine -- tcp://127.0.0.1:5555 [--rate HZ] [--wav-dir DIR]
//!
//! Speaks an English line and a German one (routed to English, as the
//! pipeline does), each whole and streamed, at a fixed output rate (default
//! 22050 Hz, whichever engine speaks: XTTS is 24 kHz natively). Prints one
//! line per utterance:
//!
//! `whole lang=en routed=en chunks=1 samples=51200 rate=22050 channels=1 seconds=2.322 rms=0.0914`
//!
//! and with `--wav-dir` writes each as a 32-bit float WAV.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tts_broker_client::tokio::Client;
use tts_broker_client::wav::WavWriter;
use tts_broker_client::{AudioSpec, Error, Request, SampleFormat, DEFAULT_ENDPOINT};

// ---- From the pipeline, unchanged (its `Result` is `Result<T, TtsError>`). ----

#[derive(Debug, Clone, PartialEq)]
pub struct PiperAudio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    pub channels: u16,
}

pub trait TtsEngine {
    fn synthesize(&self, text: &str, language: &str) -> Result<PiperAudio>;
}

/// Here the broker client's error (the pipeline's `TtsError` would wrap it).
pub type Result<T> = std::result::Result<T, Error>;

// ---- The broker as a TtsEngine. ----

/// The pipeline's routing: pt / pt-BR → Portuguese, en / en-US / en-GB →
/// English, anything else → English. The broker routes on this tag.
pub fn route(language: &str) -> &'static str {
    match language {
        "pt" | "pt-BR" => "pt",
        "en" | "en-US" | "en-GB" => "en",
        _ => "en",
    }
}

/// A `TtsEngine` backed by the broker. Cheap to clone, `Send + Sync`: share
/// it between the pipeline's tasks.
#[derive(Debug, Clone)]
pub struct BrokerTts {
    client: Client,
    sample_rate: u32,
}

impl BrokerTts {
    /// Connect to the broker; every utterance comes at `sample_rate` Hz.
    pub fn connect(endpoint: &str, sample_rate: u32) -> Result<BrokerTts> {
        Ok(BrokerTts {
            client: Client::connect(endpoint)?,
            sample_rate,
        })
    }

    fn request(&self, text: &str, language: &str) -> Request {
        Request::new(text)
            .language(route(language))
            .sample_rate(self.sample_rate)
            .format(SampleFormat::F32le)
    }

    /// The whole utterance, for async callers.
    pub async fn synthesize_async(&self, text: &str, language: &str) -> Result<PiperAudio> {
        let audio = self.client.synthesize_request(&self.request(text, language)).await?;
        Ok(PiperAudio {
            samples: audio.samples,
            sample_rate: audio.sample_rate,
            channels: audio.channels,
        })
    }

    /// The utterance as it is synthesised: one `PiperAudio` per chunk (40 ms
    /// by default), for real-time playback. Dropping the stream cancels it.
    pub fn synthesize_stream(
        &self,
        text: &str,
        language: &str,
    ) -> Result<impl Stream<Item = Result<PiperAudio>> + Send + Unpin + 'static> {
        let stream = self.client.speak(&self.request(text, language))?;
        Ok(Box::pin(futures::stream::unfold(stream, |mut stream| async move {
            let item = match stream.next_chunk_f32().await {
                Ok(None) => return None,
                Ok(Some(samples)) => {
                    // Audio always comes after `start`, which set the spec.
                    let spec = stream.audio_spec()?;
                    Ok(PiperAudio {
                        samples,
                        sample_rate: spec.sample_rate,
                        channels: spec.channels,
                    })
                }
                Err(e) => Err(e),
            };
            Some((item, stream))
        })))
    }
}

impl TtsEngine for BrokerTts {
    fn synthesize(&self, text: &str, language: &str) -> Result<PiperAudio> {
        // The client does its I/O on its own thread and needs no runtime, so
        // blocking on it is fine from a plain thread. From async code, await
        // `synthesize_async` instead (or call this from `spawn_blocking`).
        futures::executor::block_on(self.synthesize_async(text, language))
    }
}

// ---- The demo. ----

const LINES: [(&str, &str); 2] = [
    (
        "en",
        "The dragon sleeps beneath the mountain. Gather your courage and follow me.",
    ),
    ("de", "Guten Abend, Reisende. Die Taverne ist noch offen."),
];

struct Options {
    endpoint: String,
    rate: u32,
    wav_dir: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        endpoint: DEFAULT_ENDPOINT.to_string(),
        rate: 22050,
        wav_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rate" => o.rate = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--wav-dir" => o.wav_dir = Some(args.next().unwrap_or_else(|| usage()).into()),
            _ if arg.starts_with('-') => usage(),
            _ => o.endpoint = arg,
        }
    }
    o
}

fn usage() -> ! {
    eprintln!("usage: tts_engine [ENDPOINT] [--rate HZ] [--wav-dir DIR]");
    std::process::exit(2)
}

fn report(how: &str, lang: &str, chunks: usize, audio: &PiperAudio, wav_dir: Option<&Path>) -> Result<()> {
    let rms = if audio.samples.is_empty() {
        0.0
    } else {
        (audio.samples.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / audio.samples.len() as f64).sqrt()
    };
    println!(
        "{how} lang={lang} routed={} chunks={chunks} samples={} rate={} channels={} seconds={:.3} rms={rms:.4}",
        route(lang),
        audio.samples.len(),
        audio.sample_rate,
        audio.channels,
        audio.samples.len() as f64 / f64::from(audio.sample_rate.max(1)) / f64::from(audio.channels.max(1)),
    );
    if let Some(dir) = wav_dir {
        let spec = AudioSpec {
            sample_rate: audio.sample_rate,
            channels: audio.channels,
            format: SampleFormat::F32le,
        };
        let file = std::fs::File::create(dir.join(format!("{how}-{lang}.wav")))?;
        let mut wav = WavWriter::new(std::io::BufWriter::new(file), spec)?;
        let pcm: Vec<u8> = audio.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        wav.write_pcm(&pcm)?;
        wav.finish()?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let o = options();
    let engine = BrokerTts::connect(&o.endpoint, o.rate)?;
    if !futures::executor::block_on(engine.client.wait_ready("tts", Duration::from_secs(60)))? {
        eprintln!("no TTS worker is ready at {}", o.endpoint);
        std::process::exit(1);
    }

    // As the pipeline calls it: the blocking trait, through a trait object.
    let dyn_engine: &dyn TtsEngine = &engine;
    for (lang, text) in LINES {
        let audio = dyn_engine.synthesize(text, lang)?;
        report("whole", lang, 1, &audio, o.wav_dir.as_deref())?;
    }

    // Streaming, in a tokio runtime: chunks as they are synthesised.
    let runtime = tokio::runtime::Builder::new_multi_thread().build()?;
    runtime.block_on(async {
        for (lang, text) in LINES {
            let mut chunks = engine.synthesize_stream(text, lang)?;
            let mut all = PiperAudio {
                samples: Vec::new(),
                sample_rate: 0,
                channels: 0,
            };
            let mut n = 0;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                // A real-time player would queue `chunk.samples` for playback here.
                n += 1;
                all.sample_rate = chunk.sample_rate;
                all.channels = chunk.channels;
                all.samples.extend_from_slice(&chunk.samples);
            }
            report("stream", lang, n, &all, o.wav_dir.as_deref())?;
        }
        Ok(())
    })
}
