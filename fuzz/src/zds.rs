//! One ZDS datagram, as the proxy reads it from the agent (`WorkloadRequest`) and the agent
//! reads it from the proxy (`ZdsHello`, `WorkloadResponse`).

use std::cell::RefCell;

use prost::Message;
use sluice_capture::PodUid;
use sluice_zds::messages::workload_request::Payload;
use sluice_zds::messages::{Version, WorkloadRequest, WorkloadResponse, ZdsHello};
use sluice_zds::{Channel, MAX_MESSAGE, Received};

thread_local! {
    /// A real `SOCK_SEQPACKET` pair, made once: each decoded message also crosses it.
    static PAIR: RefCell<Option<(Channel, Channel)>> = const { RefCell::new(None) };
}

pub fn check(data: &[u8]) {
    let received = Received {
        bytes: data.to_vec(),
        fds: Vec::new(),
    };
    if let Ok(request) = received.decode::<WorkloadRequest>() {
        round_trip(&request);
        let uid = match &request.payload {
            Some(Payload::Add(add)) => Some(&add.uid),
            Some(Payload::Del(del)) => Some(&del.uid),
            Some(Payload::Keep(keep)) => Some(&keep.uid),
            Some(Payload::SnapshotSent(_)) | None => None,
        };
        if let Some(uid) = uid {
            check_uid(uid);
        }
        across_the_socket(&request);
    }
    if let Ok(hello) = received.decode::<ZdsHello>() {
        round_trip(&hello);
        // Unknown versions are refused by number, never by a panic.
        let _ = Version::try_from(hello.version);
    }
    if let Ok(response) = received.decode::<WorkloadResponse>() {
        round_trip(&response);
        across_the_socket(&response);
    }
}

/// What a message encodes to decodes to the same message, and its announced length is right.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = message.encode_to_vec();
    assert_eq!(bytes.len(), message.encoded_len());
    let back = M::decode(bytes.as_slice()).expect("an encoded message decodes");
    assert_eq!(&back, message, "a message does not round-trip");
}

/// A uid the proxy accepts is usable as a path component and a map key, unchanged.
fn check_uid(uid: &str) {
    let Ok(parsed) = PodUid::parse(uid) else {
        return;
    };
    assert_eq!(parsed.as_str(), uid);
    assert!(!uid.is_empty() && uid.len() <= 63, "uid {uid:?} accepted");
    assert!(
        !uid.starts_with('.') && !uid.contains('/') && !uid.contains('\0'),
        "uid {uid:?} accepted: not a safe path component"
    );
}

/// Sent over a real socket pair, a message arrives whole and decodes to itself.
fn across_the_socket<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    if message.encoded_len() == 0 {
        // A zero-length datagram reads as the peer closing (as on any SOCK_SEQPACKET); no ZDS
        // message is ever empty (a request has a payload, a response an ack).
        return;
    }
    PAIR.with_borrow_mut(|pair| {
        let (a, b) = pair.get_or_insert_with(|| Channel::pair().expect("a socket pair"));
        match a.send(message, None) {
            Ok(()) => {}
            Err(sluice_zds::ZdsError::TooLarge(n)) => {
                assert!(n > MAX_MESSAGE);
                return;
            }
            Err(e) => panic!("send: {e}"),
        }
        let received = b.recv().expect("what was sent is received");
        assert!(received.fds.is_empty());
        assert_eq!(received.bytes, message.encode_to_vec());
        let back: M = received.decode().expect("what was sent decodes");
        assert_eq!(&back, message);
    });
}
