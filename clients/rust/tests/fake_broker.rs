//! The client against a scripted in-process broker (a ROUTER socket): no
//! real broker needed. Covers the demultiplexer, cancel, timeouts, MMI and a
//! dropped connection.

use std::time::{Duration, Instant};

use tts_broker_client::{
    zmq, Audio, CancelOutcome, Client, Error, ErrorCode, Event, Request, SampleFormat, ServiceStatus, StreamMode,
};

mod common;

use common::{FakeBroker, Proxy, START};

/// A blocking client of a new in-process fake broker.
fn connect(name: &str) -> (FakeBroker, Client) {
    let (broker, endpoint) = FakeBroker::inproc(name);
    let client = Client::connect_with_context(broker.context(), &endpoint).unwrap();
    (broker, client)
}

#[test]
fn two_streams_demultiplexed_in_any_order() {
    let (broker, client) = connect("demux");
    let mut a = client.speak(&Request::new("first").language("en")).unwrap();
    let mut b = client
        .speak(&Request::new("second").format(SampleFormat::S16le))
        .unwrap();
    assert_ne!(a.request_id(), b.request_id());
    let (id, service, body) = broker.recv_request();
    assert_eq!(service, "tts");
    assert_eq!(body.len(), 2);
    assert_eq!(body[0], a.request_id());
    assert_eq!(body[1], br#"{"language":"en","text":"first"}"#.to_vec());
    let (_, _, body_b) = broker.recv_request();
    assert_eq!(body_b[0], b.request_id());
    let (ra, rb) = (a.request_id().to_vec(), b.request_id().to_vec());

    // Interleave the two streams, with noise the client must skip.
    broker.start(&id, &ra);
    broker.start(&id, &rb);
    broker.audio(&id, &ra, 0, &[1, 0]);
    broker.raw(&id, &[b"garbage"]);
    broker.reply(&id, false, "tts", &[b"unknown-rid", b"audio", &[0, 0, 0, 0], &[0, 0]]);
    broker.reply(&id, false, "tts", &[&rb, b"progress", b"{}"]);
    broker.audio(&id, &rb, 0, &[2, 0]);
    broker.reply(&id, false, "tts", &[&ra, b"mark", br#"{"segment":0,"end":5}"#]);
    broker.audio(&id, &rb, 1, &[3, 0, 4, 0]);
    broker.end(&id, &rb);
    broker.audio(&id, &ra, 1, &[5, 0]);
    broker.end(&id, &ra);

    // Read b completely first: a's events wait in its queue.
    let names: Vec<&str> = b.by_ref().map(|e| e.unwrap().name()).collect();
    assert_eq!(names, ["start", "audio", "audio", "end"]);
    assert!(b.is_done());
    assert_eq!(b.stats().and_then(|s| s.ttfa_ms), Some(5.5));
    assert!(b.ttfa().is_some());
    assert_eq!(client.in_flight(), 1);

    let mut events = Vec::new();
    for event in &mut a {
        events.push(event.unwrap());
    }
    assert!(matches!(
        &events[0],
        Event::Start {
            sample_rate: 22050,
            format: SampleFormat::S16le,
            ..
        }
    ));
    assert_eq!(
        events[1],
        Event::Audio {
            seq: 0,
            pcm: vec![1, 0],
            format: SampleFormat::S16le
        }
    );
    assert_eq!(events[2], Event::Mark { segment: 0, end: 5 });
    assert_eq!(
        events[3],
        Event::Audio {
            seq: 1,
            pcm: vec![5, 0],
            format: SampleFormat::S16le
        }
    );
    assert!(matches!(&events[4], Event::End { stats } if stats.samples == Some(2) && stats.engines == ["piper"]));
    assert_eq!(events.len(), 5);
    assert!(a.next().is_none());
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn read_audio_collects_pcm() {
    let (broker, client) = connect("read-audio");
    let mut s = client.speak_to("piper.v", &Request::new("x")).unwrap();
    let (id, service, body) = broker.recv_request();
    assert_eq!(service, "piper.v");
    broker.reply(&id, false, "piper.v", &[&body[0], b"start", START]);
    broker.reply(&id, false, "piper.v", &[&body[0], b"audio", &[0, 0, 0, 0], &[1, 2]]);
    broker.reply(&id, false, "piper.v", &[&body[0], b"audio", &[0, 0, 0, 1], &[3, 4]]);
    broker.reply(&id, true, "piper.v", &[&body[0], b"end", b"{}"]);
    assert_eq!(s.read_audio().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(s.audio_spec().map(|a| a.sample_rate), Some(22050));
}

#[test]
fn error_final_is_a_typed_error() {
    let (broker, client) = connect("error-final");
    let mut s = client.speak(&Request::new(" ")).unwrap();
    let (id, _, body) = broker.recv_request();
    broker.reply(
        &id,
        true,
        "tts",
        &[
            &body[0],
            b"error",
            br#"{"code":"bad_request","message":"text: text is empty"}"#,
        ],
    );
    match s.next() {
        Some(Err(Error::Tts {
            code: ErrorCode::BadRequest,
            message,
        })) => assert_eq!(message, "text: text is empty"),
        other => panic!("{other:?}"),
    }
    assert!(s.next().is_none());
    assert!(s.is_done());
}

#[test]
fn sequence_gap_fails_the_stream_and_cancels_it() {
    let (broker, client) = connect("gap");
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    let rid = body[0].clone();
    broker.start(&id, &rid);
    broker.audio(&id, &rid, 0, &[0, 0]);
    broker.audio(&id, &rid, 2, &[0, 0]);
    broker.audio(&id, &rid, 3, &[0, 0]);
    assert!(matches!(s.next(), Some(Ok(Event::Start { .. }))));
    assert!(matches!(s.next(), Some(Ok(Event::Audio { seq: 0, .. }))));
    match s.next() {
        Some(Err(e @ Error::SequenceGap { expected: 1, got: 2 })) => assert_eq!(e.code(), ErrorCode::Internal),
        other => panic!("{other:?}"),
    }
    assert!(s.next().is_none());
    broker.expect_cancel(&rid);
}

#[test]
fn malformed_event_for_a_stream_is_a_protocol_error() {
    let (broker, client) = connect("malformed");
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    let rid = body[0].clone();
    broker.reply(&id, false, "tts", &[&rid, b"start", b"{not json"]);
    assert!(matches!(s.next(), Some(Err(Error::Protocol(_)))));
    assert!(s.next().is_none());
    broker.expect_cancel(&rid);
}

#[test]
fn cancel_ends_with_cancelled() {
    let (broker, client) = connect("cancel");
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    let rid = body[0].clone();
    broker.start(&id, &rid);
    assert!(matches!(s.next(), Some(Ok(Event::Start { .. }))));
    s.cancel().unwrap();
    broker.expect_cancel(&rid);
    broker.reply(&id, true, "tts.cancel", &[&rid, b"cancelled"]);
    broker.reply(
        &id,
        true,
        "tts",
        &[
            &rid,
            b"error",
            br#"{"code":"cancelled","message":"cancelled by the client"}"#,
        ],
    );
    match s.next() {
        Some(Err(e)) => assert!(e.is_cancelled(), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn dropping_an_unfinished_stream_cancels_it() {
    let (broker, client) = connect("drop");
    let s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    drop(s);
    broker.expect_cancel(&body[0]);
    assert_eq!(client.in_flight(), 0);
    // Late replies for it are ignored.
    broker.end(&id, &body[0]);
    assert!(matches!(
        client.service_ready("tts", Duration::from_millis(50)),
        Err(Error::Timeout { .. })
    ));
}

#[test]
fn silence_is_a_timeout_and_cancels() {
    let (broker, client) = connect("timeout");
    let client = client.with_timeout(Duration::from_millis(200)).unwrap();
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (_, _, body) = broker.recv_request();
    let t0 = Instant::now();
    match s.next() {
        Some(Err(e @ Error::Timeout { .. })) => assert_eq!(e.code(), ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(s.next().is_none());
    broker.expect_cancel(&body[0]);
}

#[test]
fn mmi_readiness_and_status() {
    let (broker, client) = connect("mmi");
    // No answer: a timeout.
    assert!(matches!(
        client.service_ready("tts", Duration::from_millis(50)),
        Err(Error::Timeout { .. })
    ));
    let (_, service, body) = broker.recv_request();
    assert_eq!((service.as_str(), body), ("mmi.service", vec![b"tts".to_vec()]));

    // Answer "404" then "200": wait_ready polls until ready.
    let handle = broker.serve(move |broker| {
        for answer in [&b"404"[..], &b"200"[..]] {
            let (id, service, body) = broker.recv_request();
            assert_eq!(service, "mmi.service");
            assert_eq!(body, vec![b"tts".to_vec()]);
            broker.reply(&id, true, "mmi.service", &[answer]);
        }
        let (id, service, _) = broker.recv_request();
        assert_eq!(service, "tts.status");
        broker.reply(&id, true, "tts.status", &[br#"{"inflight":0}"#]);
    });
    assert!(client.wait_ready("tts", Duration::from_secs(5)).unwrap());
    assert_eq!(client.status(Duration::from_secs(5)).unwrap()["inflight"], 0);
    handle.join().unwrap();
}

#[test]
fn invalid_service_names_are_refused_locally() {
    let (_broker, client) = connect("names");
    assert!(matches!(
        client.speak_to("has space", &Request::new("x")),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        client.speak_to("", &Request::new("x")),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        client.call("mmi.service", &[], Duration::from_millis(10)),
        Err(Error::InvalidRequest(_))
    ));
}

#[test]
fn lost_connection_fails_streams_in_flight() {
    let (broker, endpoint) = FakeBroker::tcp();
    let client = Client::connect(&endpoint).unwrap();
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    broker.start(&id, &body[0]);
    assert!(matches!(s.next(), Some(Ok(Event::Start { .. }))));
    drop(broker); // the broker goes away
    let t0 = Instant::now();
    match s.next() {
        Some(Err(e @ Error::ConnectionLost { .. })) => assert_eq!(e.code(), ErrorCode::Unavailable),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(s.next().is_none());
}

/// A broker that stops answering without closing the connection (frozen,
/// or a dead network path): the client's ZeroMQ heartbeats notice, and the
/// stream ends with `ConnectionLost`, not with its own (two-minute) timeout.
#[test]
fn a_silent_broker_is_noticed_by_the_heartbeats() {
    let (broker, upstream) = FakeBroker::tcp();
    let proxy = Proxy::start(&upstream);
    let client = Client::connect(&proxy.endpoint)
        .unwrap()
        .with_timeout(Duration::from_secs(120))
        .unwrap();
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, rid, _) = broker.recv_tts();
    broker.start(&id, &rid);
    assert!(matches!(s.next(), Some(Ok(Event::Start { .. }))));
    proxy.freeze();
    match s.next() {
        Some(Err(Error::ConnectionLost { .. })) => {}
        other => panic!("{other:?}"),
    }
}

/// The broker restarts while the client is idle (nothing in flight). The
/// disconnect notice this leaves queued is stale: the next stream goes to the
/// new broker and succeeds instead of failing with `ConnectionLost`.
#[test]
fn stream_after_an_idle_broker_restart_succeeds() {
    let ctx = zmq::Context::new();
    let (broker, endpoint) = FakeBroker::bind(&ctx, "tcp://127.0.0.1:*");
    let client = Client::connect_with_context(&ctx, &endpoint).unwrap();
    let mut s = client.speak(&Request::new("before")).unwrap();
    let (id, _, body) = broker.recv_request();
    broker.start(&id, &body[0]);
    broker.end(&id, &body[0]);
    assert_eq!(s.by_ref().filter(|e| e.is_ok()).count(), 2);
    drop(s);
    drop(broker); // the broker goes away while the client is idle…
    std::thread::sleep(Duration::from_millis(300));
    let (broker, _) = FakeBroker::bind(&ctx, &endpoint); // …and comes back on the same port
    std::thread::sleep(Duration::from_millis(300));
    // The new broker answers late, so the client waits on its socket (and its monitor) first.
    let answer = broker.serve(move |broker| {
        let (id, _, body) = broker.recv_request();
        assert_eq!(body[1], br#"{"text":"after"}"#.to_vec());
        std::thread::sleep(Duration::from_millis(200));
        broker.start(&id, &body[0]);
        broker.end(&id, &body[0]);
    });
    let mut s = client.speak(&Request::new("after")).unwrap();
    let names: Vec<&str> = s.by_ref().map(|e| e.unwrap().name()).collect();
    assert_eq!(names, ["start", "end"]);
    answer.join().unwrap();
}

#[test]
fn call_returns_every_reply_with_its_flag() {
    let (broker, client) = connect("call-all");
    let handle = broker.serve(move |broker| {
        let (id, service, body) = broker.recv_request();
        assert_eq!((service.as_str(), body), ("echo", vec![b"hi".to_vec()]));
        broker.reply(&id, false, "echo", &[b"one"]);
        broker.reply(&id, false, "echo", &[b"two", b"2"]);
        broker.reply(&id, true, "echo", &[b"done"]);
        // The broker ends the next one itself: its FINAL "error" is decoded.
        let (id, _, _) = broker.recv_request();
        broker.reply(&id, false, "echo", &[b"partial"]);
        broker.reply(
            &id,
            true,
            "echo",
            &[
                b"error",
                br#"{"code":"internal","message":"worker died after a PARTIAL"}"#,
            ],
        );
    });
    let replies = client.call("echo", &[b"hi"], Duration::from_secs(5)).unwrap();
    let flags: Vec<(bool, Vec<Vec<u8>>)> = replies.into_iter().map(|r| (r.is_final, r.body)).collect();
    assert_eq!(
        flags,
        vec![
            (false, vec![b"one".to_vec()]),
            (false, vec![b"two".to_vec(), b"2".to_vec()]),
            (true, vec![b"done".to_vec()]),
        ]
    );
    match client.call("echo", &[b"again"], Duration::from_secs(5)) {
        Err(Error::Tts {
            code: ErrorCode::Internal,
            message,
        }) => assert_eq!(message, "worker died after a PARTIAL"),
        other => panic!("{other:?}"),
    }
    handle.join().unwrap();
}

#[test]
fn service_ready_tells_404_from_501() {
    let (broker, client) = connect("mmi-501");
    let handle = broker.serve(move |broker| {
        for answer in [&b"200"[..], &b"404"[..], &b"501"[..], &b"501"[..]] {
            let (id, _, _) = broker.recv_request();
            broker.reply(&id, true, "mmi.service", &[answer]);
        }
    });
    let t = Duration::from_secs(5);
    assert_eq!(client.service_ready("tts", t).unwrap(), ServiceStatus::Ready);
    assert_eq!(client.service_ready("piper.x", t).unwrap(), ServiceStatus::NotReady);
    assert_eq!(
        client.service_ready("mmi.nope", t).unwrap(),
        ServiceStatus::NotImplemented
    );
    // Waiting for a service the broker does not implement ends at once.
    let t0 = Instant::now();
    assert!(!client.wait_ready("mmi.nope", Duration::from_secs(30)).unwrap());
    assert!(t0.elapsed() < Duration::from_secs(5));
    handle.join().unwrap();
}

#[test]
fn cancel_returns_the_brokers_answer() {
    let (broker, client) = connect("cancel-answer");
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    let rid = body[0].clone();
    let handle = broker.serve(move |broker| {
        broker.expect_cancel(&rid);
        // An answer for another id first: not ours.
        broker.reply(&id, true, "tts.cancel", &[b"other", b"unknown"]);
        broker.reply(&id, true, "tts.cancel", &[&rid, b"cancelled"]);
        broker.reply(
            &id,
            true,
            "tts",
            &[
                &rid,
                b"error",
                br#"{"code":"cancelled","message":"cancelled by the client"}"#,
            ],
        );
        broker.expect_cancel(b"gone");
        broker.reply(&id, true, "tts.cancel", &[b"gone", b"unknown"]);
    });
    assert_eq!(s.cancel_wait(Duration::from_secs(5)).unwrap(), CancelOutcome::Cancelled);
    match s.next() {
        Some(Err(e)) => assert!(e.is_cancelled(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.cancel_wait(Duration::from_secs(5)).unwrap(), CancelOutcome::Unknown);
    assert_eq!(
        client.cancel(b"gone", Duration::from_secs(5)).unwrap(),
        CancelOutcome::Unknown
    );
    handle.join().unwrap();
}

#[test]
fn duration_max_timeouts_do_not_panic() {
    let (broker, client) = connect("duration-max");
    let client = client.with_timeout(Duration::MAX).unwrap();
    assert_eq!(client.timeout(), Duration::MAX);
    let mut s = client.speak(&Request::new("x")).unwrap();
    let (id, _, body) = broker.recv_request();
    broker.start(&id, &body[0]);
    broker.end(&id, &body[0]);
    assert_eq!(s.by_ref().count(), 2);
    let handle = broker.serve(move |broker| {
        let (id, _, _) = broker.recv_request();
        broker.reply(&id, true, "mmi.service", &[b"200"]);
        let (id, _, _) = broker.recv_request();
        broker.reply(&id, true, "mmi.service", &[b"200"]);
    });
    assert!(client.service_ready("tts", Duration::MAX).unwrap().is_ready());
    assert!(client.wait_ready("tts", Duration::MAX).unwrap());
    handle.join().unwrap();
}

#[test]
fn synthesize_returns_f32_audio_whatever_the_format() {
    let (broker, client) = connect("synthesize");
    let handle = broker.serve(move |broker| {
        // synthesize(): asks f32le, gets floats.
        let (id, service, body) = broker.recv_request();
        assert_eq!(service, "tts");
        assert_eq!(
            body[1],
            r#"{"format":"f32le","language":"pt-BR","text":"Olá."}"#.as_bytes().to_vec()
        );
        let start = br#"{"sample_rate":24000,"channels":1,"format":"f32le","engine":"xtts","voice":"v"}"#;
        broker.reply(&id, false, "tts", &[&body[0], b"start", start]);
        let pcm: Vec<u8> = [0.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        broker.audio(&id, &body[0], 0, &pcm);
        broker.audio(&id, &body[0], 1, &1.0f32.to_le_bytes());
        broker.end(&id, &body[0]);
        // A request that asks s16le: converted.
        let (id, _, body) = broker.recv_request();
        assert_eq!(
            body[1],
            br#"{"format":"s16le","stream":"frames","text":"Hi."}"#.to_vec()
        );
        broker.start(&id, &body[0]);
        broker.audio(&id, &body[0], 0, &[0x00, 0x40, 0x00, 0xc0]);
        broker.end(&id, &body[0]);
        // Streaming f32 chunks.
        let (id, _, body) = broker.recv_request();
        broker.start(&id, &body[0]);
        broker.audio(&id, &body[0], 0, &[0x00, 0x40]);
        broker.reply(&id, false, "tts", &[&body[0], b"mark", br#"{"segment":0,"end":3}"#]);
        broker.audio(&id, &body[0], 1, &[0x00, 0xc0]);
        broker.end(&id, &body[0]);
    });
    let audio = client.synthesize("Olá.", "pt-BR").unwrap();
    assert_eq!(
        audio,
        Audio {
            samples: vec![0.5, -0.25, 1.0],
            sample_rate: 24000,
            channels: 1
        }
    );
    let audio = client
        .synthesize_request(
            &Request::new("Hi.")
                .format(SampleFormat::S16le)
                .stream(StreamMode::Frames),
        )
        .unwrap();
    assert_eq!(audio.samples, vec![0.5, -0.5]);
    assert_eq!((audio.sample_rate, audio.channels), (22050, 1));
    let mut s = client.speak(&Request::new("Chunks.")).unwrap();
    assert_eq!(s.next_chunk_f32().unwrap(), Some(vec![0.5]));
    assert_eq!(s.next_chunk_f32().unwrap(), Some(vec![-0.5]));
    assert_eq!(s.next_chunk_f32().unwrap(), None);
    assert!(s.stats().is_some());
    handle.join().unwrap();
}
