//! `tts-say`: speak text through the broker into a WAV file, printing the
//! time to first audio.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tts_broker_client::wav::WavWriter;
use tts_broker_client::{Client, CurveKeys, Error, Event, Request, SampleFormat, DEFAULT_ENDPOINT};

const USAGE: &str = "\
usage: tts-say [OPTIONS] TEXT...      (TEXT '-' reads standard input)

Speak TEXT through a tts-broker and write a WAV file; prints the time to first audio.

options:
  -o, --output PATH        WAV file to write (default out.wav)
      --endpoint URL       broker frontend (default tcp://127.0.0.1:5555)
      --service NAME       tts (default), piper.<voice> or xtts
      --language TAG       en, en-US, pt-BR… (broker default en)
      --voice NAME         Piper voice or XTTS speaker
      --engine NAME        piper or xtts
      --format FMT         s16le (16-bit PCM WAV, default) or f32le (float WAV)
      --sample-rate HZ     8000-48000 (default: the engine's rate)
      --chunk-ms MS        audio per chunk, 10-1000 (default: as the engine makes it)
      --speed X            speaking-rate multiplier
      --priority N         -10-10: who goes first when not every stream can be served (default 0)
      --timeout-ms MS      fail if nothing arrives for this long (default 30000)
      --wait-ready-ms MS   first wait up to MS for the service to be ready (mmi.service)
      --curve-key PATH     this client's secret certificate (NAME.key_secret), for a broker with CURVE
      --broker-key PATH    the broker's public certificate (broker.key); with --curve-key
  -h, --help               show this help";

#[derive(Debug)]
struct Options {
    output: PathBuf,
    endpoint: String,
    service: String,
    request: Request,
    timeout: Duration,
    wait_ready: Option<Duration>,
    curve: Option<(PathBuf, PathBuf)>,
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: not a valid number: {value:?}"))
}

fn parse_args(args: Vec<String>) -> Result<Option<Options>, String> {
    let mut output = PathBuf::from("out.wav");
    let mut endpoint = DEFAULT_ENDPOINT.to_string();
    let mut service = "tts".to_string();
    let mut request = Request::new("");
    let mut timeout = Duration::from_secs(30);
    let mut wait_ready = None;
    let mut curve_key: Option<PathBuf> = None;
    let mut broker_key: Option<PathBuf> = None;
    let mut words: Vec<String> = Vec::new();
    let mut it = args.into_iter();
    let mut only_words = false;
    while let Some(arg) = it.next() {
        if only_words || arg == "-" || !arg.starts_with('-') {
            words.push(arg);
            continue;
        }
        if arg == "--" {
            only_words = true;
            continue;
        }
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-o" | "--output" => output = PathBuf::from(value()?),
            "--endpoint" => endpoint = value()?,
            "--service" => service = value()?,
            "--language" => request = request.language(value()?),
            "--voice" => request = request.voice(value()?),
            "--engine" => request = request.engine(value()?),
            "--format" => request = request.format(value()?.parse::<SampleFormat>()?),
            "--sample-rate" => request = request.sample_rate(parse_number(&flag, &value()?)?),
            "--chunk-ms" => request = request.chunk_ms(parse_number(&flag, &value()?)?),
            "--speed" => request = request.speed(parse_number(&flag, &value()?)?),
            "--priority" => request = request.priority(parse_number(&flag, &value()?)?),
            "--timeout-ms" => timeout = Duration::from_millis(parse_number(&flag, &value()?)?),
            "--wait-ready-ms" => wait_ready = Some(Duration::from_millis(parse_number(&flag, &value()?)?)),
            "--curve-key" => curve_key = Some(PathBuf::from(value()?)),
            "--broker-key" => broker_key = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let text = if words == ["-"] {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("reading standard input: {e}"))?;
        s
    } else {
        words.join(" ")
    };
    if text.trim().is_empty() {
        return Err("no text to speak".into());
    }
    request.text = text;
    let curve = match (curve_key, broker_key) {
        (Some(c), Some(b)) => Some((c, b)),
        (None, None) => None,
        _ => return Err("--curve-key and --broker-key go together".into()),
    };
    Ok(Some(Options {
        output,
        endpoint,
        service,
        request,
        timeout,
        wait_ready,
        curve,
    }))
}

fn partial_path(output: &std::path::Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    output.with_file_name(name)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(opts: &Options) -> Result<(), Error> {
    let client = match &opts.curve {
        Some((own, broker)) => Client::connect_secure(&opts.endpoint, &CurveKeys::from_files(own, broker)?)?,
        None => Client::connect(&opts.endpoint)?,
    }
    .with_timeout(opts.timeout)?;
    if let Some(wait) = opts.wait_ready {
        if !client.wait_ready(&opts.service, wait)? {
            return Err(Error::Timeout {
                waited: wait,
                what: format!(
                    "saying service {} is ready (mmi.service) at {}",
                    opts.service, opts.endpoint
                ),
            });
        }
    }
    let mut stream = client.speak_to(&opts.service, &opts.request)?;
    // Write next to the output and rename at the end: no truncated WAV is left behind.
    let partial = &partial_path(&opts.output);
    let mut wav: Option<WavWriter<BufWriter<File>>> = None;
    let mut engine = String::new();
    let mut voice = String::new();
    while let Some(event) = stream.next_event()? {
        match event {
            Event::Start {
                engine: e, voice: v, ..
            } => {
                if let Some(spec) = stream.audio_spec() {
                    wav = Some(WavWriter::new(BufWriter::new(File::create(partial)?), spec)?);
                }
                engine = e;
                voice = v;
            }
            Event::Audio { pcm, .. } => {
                if let Some(w) = wav.as_mut() {
                    w.write_pcm(&pcm)?;
                }
            }
            Event::Failover {
                engine: e,
                voice: v,
                reason,
                resume_at,
                ..
            } => {
                eprintln!("failover to {e} {v} at character {resume_at}: {reason}");
            }
            _ => {}
        }
    }
    let spec = match (wav, stream.audio_spec()) {
        (Some(w), Some(spec)) => {
            w.finish()?;
            std::fs::rename(partial, &opts.output)?;
            spec
        }
        _ => return Err(tts_broker_client::ProtocolError::new("stream ended without audio").into()),
    };
    let broker_ttfa = stream.stats().and_then(|s| s.ttfa_ms);
    match (stream.ttfa(), broker_ttfa) {
        (Some(t), Some(b)) => println!("time to first audio: {:.1} ms (broker: {:.1} ms)", ms(t), b),
        (Some(t), None) => println!("time to first audio: {:.1} ms", ms(t)),
        _ => println!("time to first audio: none (no audio)"),
    }
    let seconds = stream.stats().and_then(|s| s.audio_s).unwrap_or(0.0);
    println!(
        "wrote {}: {:.2} s, {} Hz, {}, {} channel(s), {} {}",
        opts.output.display(),
        seconds,
        spec.sample_rate,
        spec.format,
        spec.channels,
        engine,
        voice
    );
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1).collect()) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("tts-say: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::fs::remove_file(partial_path(&opts.output));
            eprintln!("tts-say: {e}");
            ExitCode::FAILURE
        }
    }
}
