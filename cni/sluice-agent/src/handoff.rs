//! The agent's side of the ZDS hand-off: one connected proxy, a request at a time, each
//! answered by one ack.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use sluice_zds::messages::workload_request::Payload;
use sluice_zds::messages::{
    AddWorkload, DelWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_response,
};
use sluice_zds::{Channel, ZdsError};

use crate::selection::PodInfo;

/// A proxy that answers within this time is healthy; one that does not is dropped (it
/// reconnects and gets a fresh snapshot).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not get a clean ack.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The connection is unusable; drop it.
    #[error("proxy connection: {0}")]
    Broken(#[from] ZdsError),
    #[error("the proxy sent a response without an ack")]
    NoAck,
    /// The proxy answered, with an error: the connection is fine, the request failed.
    #[error("the proxy refused: {0}")]
    Refused(String),
}

impl HandoffError {
    pub fn connection_lost(&self) -> bool {
        !matches!(self, HandoffError::Refused(_))
    }
}

/// A connected proxy that has said hello.
pub struct Proxy {
    channel: Channel,
    pub pid: u32,
}

impl Proxy {
    /// Takes a fresh connection: reads the hello and checks the version.
    pub fn accept(channel: Channel) -> Result<Self, HandoffError> {
        channel
            .set_timeout(Some(ACK_TIMEOUT))
            .map_err(ZdsError::Io)?;
        let pid = channel.peer_pid().map_err(ZdsError::Io)?;
        let hello: ZdsHello = channel.recv()?.decode()?;
        if hello.version != Version::V1 as i32 {
            return Err(HandoffError::Refused(format!(
                "hello with version {}, this agent speaks version 1",
                hello.version
            )));
        }
        Ok(Self { channel, pid })
    }

    pub fn add(&self, pod: &PodInfo, netns: BorrowedFd<'_>) -> Result<(), HandoffError> {
        self.ask(
            Payload::Add(AddWorkload {
                uid: pod.uid.clone(),
                workload_info: Some(WorkloadInfo {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                }),
            }),
            Some(netns),
        )
    }

    pub fn del(&self, uid: &str) -> Result<(), HandoffError> {
        self.ask(
            Payload::Del(DelWorkload {
                uid: uid.to_owned(),
            }),
            None,
        )
    }

    pub fn snapshot_sent(&self) -> Result<(), HandoffError> {
        self.ask(Payload::SnapshotSent(SnapshotSent {}), None)
    }

    /// Whether the proxy hung up since the last request.
    pub fn gone(&self) -> bool {
        self.channel.peer_gone()
    }

    fn ask(&self, payload: Payload, fd: Option<BorrowedFd<'_>>) -> Result<(), HandoffError> {
        let request = WorkloadRequest {
            payload: Some(payload),
        };
        self.channel.send(&request, fd)?;
        let response: WorkloadResponse = self.channel.recv()?.decode()?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(HandoffError::Refused(ack.error)),
            None => Err(HandoffError::NoAck),
        }
    }
}
