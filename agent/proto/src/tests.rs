use super::*;

fn hello() -> Message {
    Message::Hello {
        node: "agent-1".into(),
        incarnation: 7,
        broker: true,
    }
}

#[test]
fn many_frames_in_one_buffer_round_trip() {
    let mut buf = BytesMut::new();
    let msgs: Vec<Message> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                Message::Ping { seq: i }
            } else {
                hello()
            }
        })
        .collect();
    for m in &msgs {
        encode(m, &mut buf).unwrap();
    }
    let mut out = Vec::new();
    while let Some(m) = decode::<Message>(&mut buf).unwrap() {
        out.push(m);
    }
    assert_eq!(out, msgs);
    assert!(buf.is_empty());
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut whole = BytesMut::new();
    encode(&hello(), &mut whole).unwrap();
    let mut buf = BytesMut::new();
    for (i, b) in whole.iter().enumerate() {
        assert_eq!(
            decode::<Message>(&mut buf).unwrap(),
            None,
            "after {i} bytes"
        );
        buf.put_u8(*b);
    }
    assert_eq!(decode::<Message>(&mut buf).unwrap(), Some(hello()));
}

#[test]
fn unknown_version_is_refused_clearly() {
    let mut buf = BytesMut::new();
    encode(&Message::Ping { seq: 1 }, &mut buf).unwrap();
    buf[4] = 9;
    let err = decode::<Message>(&mut buf).unwrap_err();
    assert_eq!(
        err,
        FrameError::UnsupportedVersion {
            got: 9,
            supported: PROTOCOL_VERSION
        }
    );
    assert!(err.to_string().contains("version 9"));
}

#[test]
fn oversized_empty_and_garbage_frames_are_errors() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
    assert!(matches!(
        decode::<Message>(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    assert_eq!(decode::<Message>(&mut buf), Err(FrameError::Empty));
    let mut buf = BytesMut::from(&[0, 0, 0, 3, PROTOCOL_VERSION, 0xee, 0xee][..]);
    assert!(matches!(
        decode::<Message>(&mut buf),
        Err(FrameError::Malformed(_))
    ));
    // A valid message followed by stray bytes inside the same frame.
    let mut body = postcard::to_allocvec(&Message::Ping { seq: 5 }).unwrap();
    body.push(0);
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32 + 1);
    buf.put_u8(PROTOCOL_VERSION);
    buf.put_slice(&body);
    assert!(matches!(
        decode::<Message>(&mut buf),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..20_000 {
        let len = rng.usize(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if len >= 5 && rng.bool() {
            // Mostly-valid headers reach the body decoder.
            bytes[..4].copy_from_slice(&((len - 4) as u32).to_be_bytes());
            bytes[4] = PROTOCOL_VERSION;
        }
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode::<Message>(&mut buf) {}
    }
}

/// `GroupMessages` as agents before [`raft::Signal`] encoded it.
#[derive(serde::Serialize, serde::Deserialize)]
struct GroupMessagesWithOptionalHibernate {
    group: raft::GroupRef,
    messages: Vec<raft::RaftMessage>,
    hibernate: Option<raft::Hibernate>,
    recovering: bool,
    progress_reset: bool,
}

#[test]
fn the_sleep_signal_reads_and_writes_as_the_optional_hibernate_it_replaced() {
    let group = raft::GroupRef {
        namespace: "default".into(),
        topic: "orders".into(),
        partition: 3,
    };
    let hibernate = raft::Hibernate {
        term: 7,
        commit: 1234,
    };
    for (signal, old) in [
        (raft::Signal::Nothing, None),
        (raft::Signal::Hibernate(hibernate), Some(hibernate)),
    ] {
        let new = raft::GroupMessages {
            group: group.clone(),
            messages: Vec::new(),
            signal,
            recovering: true,
            progress_reset: false,
        };
        let old = GroupMessagesWithOptionalHibernate {
            group: group.clone(),
            messages: Vec::new(),
            hibernate: old,
            recovering: true,
            progress_reset: false,
        };
        let old_bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&new).unwrap(), old_bytes);
        let read: raft::GroupMessages = postcard::from_bytes(&old_bytes).unwrap();
        assert_eq!(read, new);
    }
    // `Wake` is new: an older agent refuses it rather than misreading it.
    let woken = raft::GroupMessages {
        group,
        messages: Vec::new(),
        signal: raft::Signal::Wake,
        recovering: false,
        progress_reset: false,
    };
    let bytes = postcard::to_allocvec(&woken).unwrap();
    assert!(postcard::from_bytes::<GroupMessagesWithOptionalHibernate>(&bytes).is_err());
}
