//! Sockets inside a pod: listeners and upstream connections are created in the pod's netns
//! (through `sluice_capture::netns`, the one place that enters a netns) and used from here.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use sluice_capture::PROXY_MARK;
use sluice_capture::netns::Netns;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SOL_IP: libc::c_int = 0;
const SOL_IPV6: libc::c_int = 41;
const SO_ORIGINAL_DST: libc::c_int = 80;
const LISTEN_BACKLOG: i32 = 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates a listening socket inside `netns`. `dual_stack` listeners on `[::]` also take IPv4.
pub fn listen_in(netns: &Netns, addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))??;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` from inside `netns`, marked so the iptables rules let the proxy's own
/// traffic through (eBPF capture never sees it: the proxy is not in the pod's cgroup).
pub async fn connect_in(netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )),
    }
}

/// Where a captured connection was going before capture rewrote it, as the kernel reports it
/// to `getsockopt(SO_ORIGINAL_DST)`: conntrack after an iptables REDIRECT, or sluice's
/// cgroup/getsockopt program after an eBPF redirect.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // SAFETY: the fd stays open for the call; the stream owns it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match stream.local_addr()? {
        SocketAddr::V4(_) => sockopt_addr(fd, SOL_IP),
        SocketAddr::V6(local) if local.ip().to_ipv4_mapped().is_some() => sockopt_addr(fd, SOL_IP),
        SocketAddr::V6(_) => sockopt_addr(fd, SOL_IPV6),
    }
}

fn sockopt_addr(fd: BorrowedFd<'_>, level: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are valid for writes of the given size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut storage).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned a malformed address",
        )
    };
    let addr = match i32::from(storage.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in.
            let sin = unsafe { &*std::ptr::from_ref(&storage).cast::<libc::sockaddr_in>() };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family and length say the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*std::ptr::from_ref(&storage).cast::<libc::sockaddr_in6>() };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            ))
        }
        _ => return Err(bad()),
    };
    Ok(canonical(addr))
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// All addresses: eBPF capture redirects to the pod's own address (so the client's address is
/// unique on the node), iptables REDIRECT to loopback. Connections from outside the pod to
/// 15001 never get here: both backends steer them to 15006 like any other inbound port.
pub fn outbound_v4() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        sluice_capture::PORT_OUTBOUND,
    ))
}

pub fn outbound_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_OUTBOUND,
        0,
        0,
    ))
}

pub fn inbound_any_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_INBOUND,
        0,
        0,
    ))
}

/// HBONE, on all addresses of the pod (dual-stack).
pub fn hbone_any_v6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        sluice_capture::PORT_HBONE,
        0,
        0,
    ))
}

pub fn inbound_any_v4() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        sluice_capture::PORT_INBOUND,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_folds_v4_mapped_only() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
