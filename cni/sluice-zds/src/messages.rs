//! ZDS messages, written out with prost's derive (no protoc at build time). Field numbers are
//! the wire contract; they match Istio's `zds.proto` and must never change.

/// Sent once by the proxy after connecting.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// A pod to serve; its netns fd rides along by SCM_RIGHTS.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// A pod the proxy already serves that stays (sent in a snapshot instead of `add`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// A pod to stop serving. (Field 2, not 1, as in Istio's proto.)
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The end of a snapshot: the proxy drops every pod the snapshot did not name.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// `error` empty: the request was carried out.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

impl WorkloadResponse {
    /// The one answer to every request: `Ok` → empty error.
    pub fn ack(result: Result<(), String>) -> Self {
        Self {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: result.err().unwrap_or_default(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::workload_request::Payload;
    use super::*;

    fn request(payload: Payload) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    #[test]
    fn encodings_match_istio_byte_for_byte() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
        assert_eq!(
            request(Payload::SnapshotSent(SnapshotSent {})),
            [0x1a, 0x00]
        );
        assert_eq!(WorkloadResponse::ack(Ok(())).encode_to_vec(), [0x0a, 0x00]);
        assert_eq!(
            WorkloadResponse::ack(Err("no".into())).encode_to_vec(),
            [0x0a, 0x04, 0x0a, 0x02, b'n', b'o']
        );
        // del is field 2 of the request, and its uid is field 2 of DelWorkload.
        assert_eq!(
            request(Payload::Del(DelWorkload { uid: "u".into() })),
            [0x12, 0x03, 0x12, 0x01, b'u']
        );
        // keep is field 5 of the request, its uid field 1.
        assert_eq!(
            request(Payload::Keep(KeepWorkload { uid: "u".into() })),
            [0x2a, 0x03, 0x0a, 0x01, b'u']
        );
    }

    #[test]
    fn add_round_trips_with_its_workload_info() {
        let add = Payload::Add(AddWorkload {
            uid: "0c4f3a5e-1111-2222-3333-444455556666".into(),
            workload_info: Some(WorkloadInfo {
                name: "sleep-7d9f".into(),
                namespace: "default".into(),
                service_account: "sleep".into(),
            }),
        });
        let bytes = request(add.clone());
        assert_eq!(bytes[0], 0x0a, "add is field 1");
        let back = WorkloadRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.payload, Some(add));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for bad in [
            &[0x0a, 0x05, 0x01][..],
            &[0xff; 12][..],
            &[0x0a][..],
            &[0x12, 0x80][..],
        ] {
            assert!(WorkloadRequest::decode(bad).is_err(), "{bad:02x?} decoded");
        }
        // Unknown fields are skipped, as protobuf requires: a newer peer stays readable.
        let with_unknown = [0x1a, 0x00, 0x78, 0x01];
        let decoded = WorkloadRequest::decode(&with_unknown[..]).unwrap();
        assert_eq!(
            decoded.payload,
            Some(Payload::SnapshotSent(SnapshotSent {}))
        );
    }
}
