//! The async client (feature `tokio`) against the scripted fake broker:
//! many tasks on one handle, cancel from elsewhere, dropped streams, a reader
//! that stalls, the buffer limit, lost and silent connections, timeouts,
//! calls. No test asserts how long something took; a guard only turns a
//! hang into a failure.

#![cfg(feature = "tokio")]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tts_broker_client::tokio::{Builder, CancelHandle, Client, Stream};
use tts_broker_client::{zmq, Audio, CancelOutcome, Error, ErrorCode, Event, Request, SampleFormat, ServiceStatus};

use common::{pcm16, settle, FakeBroker, Proxy};

/// Options for a client of a new in-process fake broker.
fn builder(name: &str) -> (FakeBroker, Builder) {
    let (broker, endpoint) = FakeBroker::inproc(name);
    let builder = Client::builder(&endpoint).context(broker.context());
    (broker, builder)
}

fn connect(name: &str) -> (FakeBroker, Client) {
    let (broker, builder) = builder(name);
    (broker, builder.connect().unwrap())
}

/// Turn a hang into a failure (this asserts nothing about timing).
async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after 60 s"),
    }
}

/// Every event of a stream, and the error that ended it, if any.
async fn drain(stream: &mut Stream) -> (Vec<Event>, Option<Error>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::name).collect()
}

fn assert_send_sync<T: Send + Sync>() {}
fn assert_clone<T: Clone>() {}
fn assert_event_stream<T: futures::Stream<Item = Result<Event, Error>> + Send + Unpin + 'static>() {}
fn assert_send<T: Send>(_: &T) {}

#[test]
fn handles_are_send_sync_and_streams_static_send_unpin() {
    assert_send_sync::<Client>();
    assert_clone::<Client>();
    assert_send_sync::<CancelHandle>();
    assert_clone::<CancelHandle>();
    assert_send_sync::<Builder>();
    assert_event_stream::<Stream>();
    // The futures of the async methods can be spawned on a multi-threaded runtime.
    let (_broker, client) = connect("send-futures");
    let t = Duration::from_millis(1);
    assert_send(&client.synthesize("x", "en"));
    assert_send(&client.call("echo", &[b"x"], t));
    assert_send(&client.service_ready("tts", t));
    assert_send(&client.wait_ready("tts", t));
    assert_send(&client.status(t));
    assert_send(&client.cancel(b"r", t));
    let mut stream = client.speak(&Request::new("x")).unwrap();
    assert_send(&stream.next_event());
    assert_send(&stream.next_chunk_f32());
    assert_send(&stream.read_audio_f32());
    assert_send(&stream.cancel_handle().cancel_wait(t));
}

/// The text of request `k` of task `t`, and the PCM of its chunk `seq`:
/// every chunk says whose it is, so a misrouted one is caught.
fn text_of(t: usize, k: usize) -> String {
    format!("{t} {k}")
}

fn payload(text: &str, seq: u32) -> Vec<u8> {
    let mut ids = text.split(' ').map(|n| n.parse::<i16>().unwrap());
    pcm16(&[ids.next().unwrap(), ids.next().unwrap(), seq as i16])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_tasks_two_streams_each_on_one_handle() {
    const TASKS: usize = 16;
    const CHUNKS: u32 = 25;
    let (broker, client) = connect("many-tasks");
    let script = broker.serve(|b| {
        let mut streams = Vec::new();
        for _ in 0..TASKS * 2 {
            let (id, rid, json) = b.recv_tts();
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            streams.push((id, rid, v["text"].as_str().unwrap().to_string()));
        }
        // Interleave every stream's replies, in a different order each round.
        for (id, rid, _) in &streams {
            b.start(id, rid);
        }
        for seq in 0..CHUNKS {
            let order: Vec<usize> = if seq % 2 == 0 {
                (0..streams.len()).collect()
            } else {
                (0..streams.len()).rev().collect()
            };
            for i in order {
                let (id, rid, text) = &streams[i];
                b.audio(id, rid, seq, &payload(text, seq));
            }
        }
        for (id, rid, _) in streams.iter().rev() {
            b.end(id, rid);
        }
    });
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut streams: Vec<Stream> = (0..2)
                .map(|k| client.speak(&Request::new(text_of(t, k))).unwrap())
                .collect();
            // Half the tasks read their second stream first: the first one buffers meanwhile.
            if t % 2 == 1 {
                streams.reverse();
            }
            let mut seen = Vec::new();
            for stream in &mut streams {
                let (events, error) = drain(stream).await;
                assert!(error.is_none(), "task {t}: {error:?}");
                assert_eq!(events.len(), CHUNKS as usize + 2, "task {t}: {:?}", names(&events));
                assert!(matches!(events[0], Event::Start { .. }));
                assert!(matches!(events.last(), Some(Event::End { .. })));
                let pcm: Vec<&Vec<u8>> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Audio { pcm, .. } => Some(pcm),
                        _ => None,
                    })
                    .collect();
                let k = pcm[0][2] as usize;
                for (seq, chunk) in pcm.iter().enumerate() {
                    assert_eq!(
                        **chunk,
                        payload(&text_of(t, k), seq as u32),
                        "task {t} stream {k} chunk {seq}"
                    );
                }
                assert!(stream.ttfa().is_some() && stream.stats().is_some());
                seen.push(k);
            }
            seen.sort_unstable();
            assert_eq!(seen, [0, 1], "task {t}");
        }));
    }
    for task in tasks {
        guard("tasks", task).await.unwrap();
    }
    script.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_another_task() {
    let (broker, client) = connect("cancel-handle");
    let mut stream = client.speak(&Request::new("long")).unwrap();
    let handle = stream.cancel_handle();
    assert_eq!(handle.request_id(), stream.request_id());
    let (id, rid, _) = broker.recv_tts();
    broker.start(&id, &rid);
    broker.audio(&id, &rid, 0, &[0, 0]);
    let reader = tokio::spawn(async move {
        let out = drain(&mut stream).await;
        (stream, out)
    });
    let canceller = tokio::spawn(async move { handle.cancel_wait(Duration::from_secs(30)).await });
    let script = broker.serve(move |b| {
        b.expect_cancel(&rid);
        b.reply(&id, true, "tts.cancel", &[&rid, b"cancelled"]);
        b.cancelled(&id, &rid);
    });
    assert_eq!(
        guard("cancel_wait", canceller).await.unwrap().unwrap(),
        CancelOutcome::Cancelled
    );
    let (stream, (events, error)) = guard("reader", reader).await.unwrap();
    assert_eq!(names(&events), ["start", "audio"]);
    let error = error.expect("the stream ends with an error");
    assert!(error.is_cancelled(), "{error}");
    assert!(stream.is_done());
    // The stream is over: its handle asks nothing more.
    let broker = script.join().unwrap();
    let handle = stream.cancel_handle();
    assert!(handle.is_finished());
    assert_eq!(
        handle.cancel_wait(Duration::from_secs(5)).await.unwrap(),
        CancelOutcome::Unknown
    );
    handle.cancel();
    assert!(
        broker.recv_within(200).is_none(),
        "nothing is sent for a finished stream"
    );
}

#[tokio::test]
async fn fire_and_forget_cancel_from_a_clone_of_the_handle() {
    let (broker, client) = connect("cancel-clone");
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let handle = stream.cancel_handle().clone();
    let (id, rid, _) = broker.recv_tts();
    std::thread::spawn(move || handle.cancel()).join().unwrap();
    broker.expect_cancel(&rid);
    broker.cancelled(&id, &rid);
    let (events, error) = guard("stream", drain(&mut stream)).await;
    assert!(events.is_empty());
    assert!(error.unwrap().is_cancelled());
}

#[test]
fn dropping_an_unfinished_stream_cancels_it_even_after_the_last_handle() {
    let (broker, client) = connect("drop");
    let stream = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    drop(stream);
    broker.expect_cancel(&rid);
    // Late replies for it are ignored; a finished stream sends nothing when dropped.
    broker.end(&id, &rid);
    let stream = client.speak(&Request::new("y")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    broker.start(&id, &rid);
    broker.end(&id, &rid);
    let mut stream = futures::executor::block_on(async move {
        let mut stream = stream;
        assert_eq!(names(&drain(&mut stream).await.0), ["start", "end"]);
        stream
    });
    assert!(futures::executor::block_on(stream.next()).is_none());
    drop(stream);
    assert!(broker.recv_within(200).is_none(), "no cancel for a finished stream");
    // The client goes first, then its last stream: the cancel still leaves.
    let stream = client.speak(&Request::new("z")).unwrap();
    let (_, rid, _) = broker.recv_tts();
    drop(client);
    drop(stream);
    broker.expect_cancel(&rid);
}

/// One task never reads its stream; the others must finish all the same,
/// while the I/O thread buffers the stalled one's audio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_the_others() {
    const STALLED_CHUNKS: u32 = 600;
    let (broker, client) = connect("stall");
    let mut stalled = client.speak(&Request::new("stalled")).unwrap();
    let mut others: Vec<Stream> = ["a", "b"]
        .iter()
        .map(|t| client.speak(&Request::new(*t)).unwrap())
        .collect();
    let script = broker.serve(|b| {
        let mut by_text = HashMap::new();
        for _ in 0..3 {
            let (id, rid, json) = b.recv_tts();
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            by_text.insert(v["text"].as_str().unwrap().to_string(), (id, rid));
        }
        // All of the stalled stream first: far more messages than any fixed-size channel would hold.
        let (id, rid) = &by_text["stalled"];
        b.start(id, rid);
        for seq in 0..STALLED_CHUNKS {
            b.audio(id, rid, seq, &[seq as u8; 1000]);
        }
        b.end(id, rid);
        for text in ["a", "b"] {
            let (id, rid) = &by_text[text];
            b.start(id, rid);
            for seq in 0..10 {
                b.audio(id, rid, seq, &[1, 2]);
            }
            b.end(id, rid);
        }
    });
    let readers: Vec<_> = others
        .drain(..)
        .map(|mut s| tokio::spawn(async move { drain(&mut s).await }))
        .collect();
    for reader in readers {
        let (events, error) = guard("the other streams", reader).await.unwrap();
        assert!(error.is_none(), "{error:?}");
        assert_eq!(events.len(), 12, "{:?}", names(&events));
    }
    // Everything sent before the others' replies has been received and kept.
    assert_eq!(stalled.buffered_bytes(), STALLED_CHUNKS as usize * 1000);
    let (events, error) = guard("the stalled stream", drain(&mut stalled)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(events.len(), STALLED_CHUNKS as usize + 2);
    for (seq, event) in events[1..events.len() - 1].iter().enumerate() {
        assert!(matches!(event, Event::Audio { seq: s, pcm, .. } if *s == seq as u32 && pcm[0] == seq as u8));
    }
    assert_eq!(stalled.buffered_bytes(), 0);
    script.join().unwrap();
}

#[tokio::test]
async fn a_reader_past_the_buffer_limit_overflows_and_the_stream_is_cancelled() {
    let (broker, builder) = builder("overflow");
    let client = builder.buffer_limit(4096).connect().unwrap();
    assert_eq!(client.buffer_limit(), 4096);
    let mut slow = client.speak(&Request::new("slow")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    broker.start(&id, &rid);
    for seq in 0..10 {
        broker.audio(&id, &rid, seq, &[7; 1000]);
    }
    // The fifth chunk would make 5000 bytes unread: the client cancels the stream…
    broker.expect_cancel(&rid);
    broker.cancelled(&id, &rid);
    // …and its reader gets what was buffered, then the overflow.
    let (events, error) = guard("slow", drain(&mut slow)).await;
    assert_eq!(names(&events), ["start", "audio", "audio", "audio", "audio"]);
    match error {
        Some(e @ Error::Overflow { limit: 4096 }) => assert_eq!(e.code(), ErrorCode::Overloaded),
        other => panic!("{other:?}"),
    }
    assert!(slow.next().await.is_none());
    // The client goes on: a stream read as it arrives never overflows.
    let mut fast = client.speak(&Request::new("fast")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    let script = broker.serve(move |b| {
        b.start(&id, &rid);
        for seq in 0..20 {
            b.audio(&id, &rid, seq, &[1; 3000]);
            // Wait until the reader took it (it asks for the status each time).
            let (cid, service, _) = b.recv_request();
            assert_eq!(service, "tts.status");
            b.reply(&cid, true, "tts.status", &[b"{}"]);
        }
        b.end(&id, &rid);
    });
    let mut chunks = 0;
    while let Some(event) = guard("fast", fast.next()).await {
        if let Event::Audio { .. } = event.unwrap() {
            chunks += 1;
            client.status(Duration::from_secs(30)).await.unwrap();
        }
    }
    assert_eq!(chunks, 20);
    script.join().unwrap();
}

#[tokio::test]
async fn a_lost_connection_ends_streams_in_flight_and_the_next_one_works() {
    let (broker, endpoint) = FakeBroker::tcp();
    let client = Client::builder(&endpoint)
        .timeout(Duration::from_secs(120))
        .connect()
        .unwrap();
    let mut started = client.speak(&Request::new("x")).unwrap();
    let mut waiting = client.speak(&Request::new("y")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    let _ = broker.recv_tts();
    broker.start(&id, &rid);
    assert!(matches!(
        guard("start", started.next()).await,
        Some(Ok(Event::Start { .. }))
    ));
    drop(broker); // the broker goes away
    for stream in [&mut started, &mut waiting] {
        match guard("lost", stream.next()).await {
            Some(Err(e @ Error::ConnectionLost { .. })) => assert_eq!(e.code(), ErrorCode::Unavailable),
            other => panic!("{other:?}"),
        }
        assert!(stream.next().await.is_none());
    }
    // The broker comes back on the same port: ZeroMQ reconnects, no user code.
    settle();
    let (broker, _) = FakeBroker::bind(&zmq::Context::new(), &endpoint);
    settle();
    let script = broker.serve(|b| {
        let (id, rid, json) = b.recv_tts();
        assert_eq!(json, br#"{"text":"after"}"#.to_vec());
        b.start(&id, &rid);
        b.end(&id, &rid);
    });
    let mut after = client.speak(&Request::new("after")).unwrap();
    let (events, error) = guard("after", drain(&mut after)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(names(&events), ["start", "end"]);
    script.join().unwrap();
}

/// A broker that stops answering without closing the connection: the
/// ZeroMQ heartbeats notice, and the stream ends with `ConnectionLost`, not
/// with its own (two-minute) timeout.
#[tokio::test]
async fn a_silent_broker_is_noticed_by_the_heartbeats() {
    let (broker, upstream) = FakeBroker::tcp();
    let proxy = Proxy::start(&upstream);
    let client = Client::builder(&proxy.endpoint)
        .heartbeat(Duration::from_millis(100))
        .timeout(Duration::from_secs(120))
        .connect()
        .unwrap();
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    broker.start(&id, &rid);
    assert!(matches!(
        guard("start", stream.next()).await,
        Some(Ok(Event::Start { .. }))
    ));
    proxy.freeze();
    match guard("heartbeat", stream.next()).await {
        Some(Err(Error::ConnectionLost { .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn silence_times_out_whether_or_not_the_stream_is_read() {
    let (broker, builder) = builder("timeout");
    let client = builder.timeout(Duration::from_millis(200)).connect().unwrap();
    assert_eq!(client.timeout(), Duration::from_millis(200));
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let (_, rid, _) = broker.recv_tts();
    // Not polled yet: the I/O thread ends it and cancels it at the broker.
    broker.expect_cancel(&rid);
    match stream.next().await {
        Some(Err(e @ Error::Timeout { .. })) => assert_eq!(e.code(), ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn sequence_gaps_and_noise() {
    let (broker, client) = connect("gap");
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    broker.raw(&id, &[b"garbage"]);
    broker.reply(&id, false, "tts", &[b"unknown-rid", b"audio", &[0, 0, 0, 0], &[0, 0]]);
    broker.start(&id, &rid);
    broker.reply(&id, false, "tts", &[&rid, b"progress", b"{}"]);
    broker.audio(&id, &rid, 0, &[0, 0]);
    broker.audio(&id, &rid, 2, &[0, 0]);
    broker.expect_cancel(&rid);
    let (events, error) = guard("gap", drain(&mut stream)).await;
    assert_eq!(names(&events), ["start", "audio"]);
    assert!(matches!(error, Some(Error::SequenceGap { expected: 1, got: 2 })));
}

#[tokio::test]
async fn calls_readiness_status_and_cancel_answers() {
    let (broker, client) = connect("calls");
    let t = Duration::from_secs(30);
    // No answer: a timeout.
    assert!(matches!(
        client.service_ready("tts", Duration::from_millis(50)).await,
        Err(Error::Timeout { .. })
    ));
    let (_, service, body) = broker.recv_request();
    assert_eq!((service.as_str(), body), ("mmi.service", vec![b"tts".to_vec()]));
    let script = broker.serve(|b| {
        for answer in [&b"404"[..], &b"200"[..], &b"501"[..]] {
            let (id, service, _) = b.recv_request();
            assert_eq!(service, "mmi.service");
            b.reply(&id, true, "mmi.service", &[answer]);
        }
        let (id, service, _) = b.recv_request();
        assert_eq!(service, "tts.status");
        b.reply(&id, true, "tts.status", &[br#"{"inflight":0}"#]);
        let (id, service, body) = b.recv_request();
        assert_eq!((service.as_str(), body), ("echo", vec![b"hi".to_vec()]));
        b.reply(&id, false, "echo", &[b"one"]);
        b.reply(&id, true, "echo", &[b"done"]);
        let (id, _, _) = b.recv_request();
        b.reply(
            &id,
            true,
            "echo",
            &[b"error", br#"{"code":"overloaded","message":"queue full"}"#],
        );
        b.expect_cancel(b"gone");
        b.reply(&id, true, "tts.cancel", &[b"other", b"unknown"]);
        b.reply(&id, true, "tts.cancel", &[b"gone", b"unknown"]);
    });
    assert!(client.wait_ready("tts", t).await.unwrap());
    assert_eq!(
        client.service_ready("mmi.nope", t).await.unwrap(),
        ServiceStatus::NotImplemented
    );
    assert_eq!(client.status(t).await.unwrap()["inflight"], 0);
    let replies = client.call("echo", &[b"hi"], t).await.unwrap();
    let flags: Vec<(bool, Vec<Vec<u8>>)> = replies.into_iter().map(|r| (r.is_final, r.body)).collect();
    assert_eq!(flags, [(false, vec![b"one".to_vec()]), (true, vec![b"done".to_vec()])]);
    match client.call("echo", &[b"again"], t).await {
        Err(Error::Tts {
            code: ErrorCode::Overloaded,
            message,
        }) => assert_eq!(message, "queue full"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.cancel(b"gone", t).await.unwrap(), CancelOutcome::Unknown);
    assert!(matches!(
        client.call("has space", &[b"x"], t).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        client.call("echo", &[], t).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        client.speak_to("", &Request::new("x")),
        Err(Error::InvalidRequest(_))
    ));
    script.join().unwrap();
}

#[tokio::test]
async fn duration_max_waits_forever_without_panicking() {
    let (broker, builder) = builder("duration-max");
    let client = builder
        .timeout(Duration::MAX)
        .heartbeat(Duration::MAX)
        .connect()
        .unwrap();
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    let script = broker.serve(move |b| {
        b.start(&id, &rid);
        b.end(&id, &rid);
        for _ in 0..2 {
            let (id, _, _) = b.recv_request();
            b.reply(&id, true, "mmi.service", &[b"200"]);
        }
    });
    assert_eq!(names(&drain(&mut stream).await.0), ["start", "end"]);
    assert!(client.service_ready("tts", Duration::MAX).await.unwrap().is_ready());
    assert!(client.wait_ready("tts", Duration::MAX).await.unwrap());
    script.join().unwrap();
}

#[tokio::test]
async fn synthesize_and_f32_chunks() {
    let (broker, client) = connect("synthesize");
    let script = broker.serve(|b| {
        let (id, rid, json) = b.recv_tts();
        assert_eq!(
            json,
            r#"{"format":"f32le","language":"pt-BR","text":"Olá."}"#.as_bytes().to_vec()
        );
        let start = br#"{"sample_rate":24000,"channels":1,"format":"f32le","engine":"xtts","voice":"v"}"#;
        b.reply(&id, false, "tts", &[&rid, b"start", start]);
        let pcm: Vec<u8> = [0.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        b.audio(&id, &rid, 0, &pcm);
        b.end(&id, &rid);
        let (id, rid, json) = b.recv_tts();
        assert_eq!(json, br#"{"format":"s16le","sample_rate":22050,"text":"Hi."}"#.to_vec());
        b.start(&id, &rid);
        b.audio(&id, &rid, 0, &[0x00, 0x40]);
        b.reply(&id, false, "tts", &[&rid, b"mark", br#"{"segment":0,"end":3}"#]);
        b.audio(&id, &rid, 1, &[0x00, 0xc0]);
        b.end(&id, &rid);
    });
    let audio = client.synthesize("Olá.", "pt-BR").await.unwrap();
    assert_eq!(
        audio,
        Audio {
            samples: vec![0.5, -0.25],
            sample_rate: 24000,
            channels: 1
        }
    );
    let request = Request::new("Hi.").format(SampleFormat::S16le).sample_rate(22050);
    let mut stream = client.speak(&request).unwrap();
    assert_eq!(stream.next_chunk_f32().await.unwrap(), Some(vec![0.5]));
    assert_eq!(stream.audio_spec().map(|s| s.sample_rate), Some(22050));
    assert_eq!(stream.next_chunk_f32().await.unwrap(), Some(vec![-0.5]));
    assert_eq!(stream.next_chunk_f32().await.unwrap(), None);
    assert!(stream.stats().is_some() && stream.is_done());
    script.join().unwrap();
}

/// The I/O thread lives while a handle or a stream does, and closes the
/// connection when the last one goes.
#[tokio::test]
async fn the_io_thread_stops_with_the_last_handle_and_stream() {
    let (broker, endpoint) = FakeBroker::tcp();
    let disconnects = broker.watch_disconnects();
    let client = Client::connect(&endpoint).unwrap();
    let other = client.clone();
    let mut stream = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    drop(client);
    drop(other);
    // The stream alone keeps the thread (and the connection) alive.
    assert!(disconnects.poll(zmq::POLLIN, 300).unwrap() == 0, "closed too early");
    broker.start(&id, &rid);
    broker.end(&id, &rid);
    assert_eq!(names(&guard("stream", drain(&mut stream)).await.0), ["start", "end"]);
    drop(stream);
    assert!(
        disconnects.poll(zmq::POLLIN, 10_000).unwrap() > 0,
        "the I/O thread kept the connection"
    );
}
