//! Cutting Apache's open tunnels (websockets, long polls) to backends whose
//! route ended: a tunnel outlives the route that opened it, and an open
//! JupyterLab websocket is a kernel channel, so an ended session must lose
//! it at once.
//!
//! The kernel's `sock_diag` netlink interface does it in one pass and
//! without a helper program: one dump of the host's TCP sockets (IPv4 and
//! IPv6), the matching ones picked here, then `SOCK_DESTROY` for each of
//! them by its exact identity (addresses, ports and cookie), so a socket
//! that closed and was reused meanwhile is never hit. Only sockets owned by
//! Apache's worker user are cut, not every connection of the host to that
//! backend (an admin's ssh tunnel, a monitoring probe). It needs
//! CAP_NET_ADMIN and a kernel built with `CONFIG_INET_DIAG_DESTROY`; what
//! `ss -K` needs too, and [`probe`] tells whether this host has both.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const IPPROTO_TCP: u8 = 6;
const NLMSG_HEADER: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then
/// expires, rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
const DIAG_MSG_UID: usize = 4 + SOCKID_LEN + 12;

/// TCP states whose sockets carry a tunnel (`1 << TCP_*`): established,
/// SYN sent and received, and close-wait (the backend hung up, Apache has
/// not yet).
const TUNNEL_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 8);

/// What one cut did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Sockets to a target, owned by the owner, that were destroyed.
    pub destroyed: usize,
    /// Sockets that closed by themselves between the dump and the cut.
    pub already_gone: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CutError {
    #[error("this kernel cannot destroy sockets (built without CONFIG_INET_DIAG_DESTROY)")]
    Unsupported,
    #[error("not permitted to destroy sockets (needs CAP_NET_ADMIN)")]
    NotPermitted,
    #[error("cutting tunnels took longer than {0:?}; the rest is left for the next run")]
    Deadline(Duration),
    #[error("sock_diag netlink: {0}")]
    Netlink(#[from] io::Error),
}

impl From<nix::Error> for CutError {
    fn from(e: nix::Error) -> Self {
        CutError::Netlink(io::Error::from(e))
    }
}

/// Destroys the TCP connections to any of `targets` owned by `owner` (a
/// uid; `None`: every owner), within `limit`.
pub fn cut(
    targets: &[SocketAddr],
    owner: Option<u32>,
    limit: Duration,
) -> Result<CutReport, CutError> {
    find(targets, owner, limit)?.destroy(&[])
}

/// The open connections to some targets, as one dump found them: the
/// first half of a cut, so that the caller can decide what to spare from
/// what it reads *after* the dump. A route to one of the targets that
/// went live before the dump is then seen by that read, and a connection
/// opened after the dump is not in the set: a new session on an ended
/// session's `ip:port` never loses its first request.
pub struct Found {
    /// None when there was nothing to look for.
    diag: Option<DiagSocket>,
    /// The peer of each socket and its `inet_diag_msg` head.
    sockets: Vec<(SocketAddr, Vec<u8>)>,
}

/// Dumps the host's TCP sockets once and keeps those to any of `targets`
/// owned by `owner` (`None`: every owner); `limit` covers the dump and the
/// [`Found::destroy`] after it.
pub fn find(
    targets: &[SocketAddr],
    owner: Option<u32>,
    limit: Duration,
) -> Result<Found, CutError> {
    let targets: HashSet<SocketAddr> = targets.iter().map(|t| canonical(*t)).collect();
    let mut sockets = Vec::new();
    if targets.is_empty() {
        return Ok(Found {
            diag: None,
            sockets,
        });
    }
    let diag = DiagSocket::open(Instant::now() + limit, limit)?;
    for family in [
        libc_family(AddressFamily::Inet),
        libc_family(AddressFamily::Inet6),
    ] {
        diag.dump(family, &mut |msg| {
            let (Some(peer), Some(uid)) = (peer_of(msg), uid_of(msg)) else {
                return;
            };
            let peer = canonical(peer);
            if targets.contains(&peer) && owner.is_none_or(|o| o == uid) {
                sockets.push((peer, msg[..4 + SOCKID_LEN].to_vec()));
            }
        })?;
    }
    Ok(Found {
        diag: Some(diag),
        sockets,
    })
}

impl Found {
    /// Destroys the sockets found, but those to a target in `spare`.
    pub fn destroy(self, spare: &[SocketAddr]) -> Result<CutReport, CutError> {
        let spare: HashSet<SocketAddr> = spare.iter().map(|t| canonical(*t)).collect();
        let mut report = CutReport::default();
        let Some(diag) = &self.diag else {
            return Ok(report);
        };
        for (peer, head) in &self.sockets {
            if spare.contains(peer) {
                continue;
            }
            match diag.destroy(head)? {
                Destroyed::Yes => report.destroyed += 1,
                Destroyed::Gone => report.already_gone += 1,
            }
        }
        Ok(report)
    }
}

/// Whether this process can cut tunnels here: it opens a loopback
/// connection of its own and destroys it.
pub fn probe() -> Result<(), CutError> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let target = listener.local_addr()?;
    let _client = std::net::TcpStream::connect(target)?;
    let _server = listener.accept()?;
    let me = nix::unistd::Uid::current().as_raw();
    let report = cut(&[target], Some(me), Duration::from_secs(5))?;
    if report.destroyed == 0 {
        return Err(CutError::Netlink(io::Error::other(
            "the probe's own connection was not found in the socket dump",
        )));
    }
    Ok(())
}

fn libc_family(family: AddressFamily) -> u8 {
    family as i32 as u8
}

/// IPv4-mapped IPv6 addresses as IPv4, so that either form matches.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::ipmask::canonical_ip(addr.ip()), addr.port())
}

/// The remote end of a socket in an `inet_diag_msg`.
fn peer_of(msg: &[u8]) -> Option<SocketAddr> {
    if msg.len() < DIAG_MSG_LEN {
        return None;
    }
    let port = u16::from_be_bytes([msg[6], msg[7]]);
    let dst = &msg[24..40];
    let ip = match msg[0] {
        f if f == libc_family(AddressFamily::Inet) => {
            IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]))
        }
        f if f == libc_family(AddressFamily::Inet6) => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(dst).ok()?))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn uid_of(msg: &[u8]) -> Option<u32> {
    let bytes = msg.get(DIAG_MSG_UID..DIAG_MSG_UID + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

enum Destroyed {
    Yes,
    Gone,
}

struct DiagSocket {
    fd: OwnedFd,
    deadline: Instant,
    limit: Duration,
}

impl DiagSocket {
    fn open(deadline: Instant, limit: Duration) -> Result<Self, CutError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(DiagSocket {
            fd,
            deadline,
            limit,
        })
    }

    fn send(&self, kind: u16, flags: u16, family: u8, sockid: &[u8]) -> Result<(), CutError> {
        let mut message = Vec::with_capacity(NLMSG_HEADER + 8 + SOCKID_LEN);
        let length = (NLMSG_HEADER + 8 + SOCKID_LEN) as u32;
        message.extend_from_slice(&length.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
                                                        // struct inet_diag_req_v2
        message.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        let states = if kind == SOCK_DESTROY {
            u32::MAX
        } else {
            TUNNEL_STATES
        };
        message.extend_from_slice(&states.to_ne_bytes());
        message.extend_from_slice(sockid);
        message.resize(length as usize, 0);
        sendto(
            self.fd.as_raw_fd(),
            &message,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    /// One datagram of netlink messages, within the deadline.
    fn receive(&self, buffer: &mut [u8]) -> Result<usize, CutError> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(CutError::Deadline(self.limit))?;
        let timeout = TimeVal::new(left.as_secs() as _, left.subsec_micros().max(1) as _);
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &timeout)?;
        match recv(self.fd.as_raw_fd(), buffer, MsgFlags::empty()) {
            Ok(n) => Ok(n),
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => Err(CutError::Deadline(self.limit)),
            Err(e) => Err(e.into()),
        }
    }

    /// Calls `each` with every `inet_diag_msg` of the family's TCP sockets
    /// in a tunnel state.
    fn dump(&self, family: u8, each: &mut dyn FnMut(&[u8])) -> Result<(), CutError> {
        self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[0; SOCKID_LEN],
        )?;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = self.receive(&mut buffer)?;
            for (kind, body) in messages(&buffer[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return Err(netlink_error(body).unwrap_or(CutError::Unsupported)),
                    _ => each(body),
                }
            }
        }
    }

    /// Destroys the socket whose `inet_diag_msg` head (family, state,
    /// timer, retrans, sockid) is `head`.
    fn destroy(&self, head: &[u8]) -> Result<Destroyed, CutError> {
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, head[0], &head[4..])?;
        let mut buffer = vec![0u8; 4096];
        loop {
            let n = self.receive(&mut buffer)?;
            for (kind, body) in messages(&buffer[..n]) {
                if kind != NLMSG_ERROR {
                    continue;
                }
                return match netlink_error(body) {
                    None => Ok(Destroyed::Yes),
                    Some(CutError::Netlink(e)) if e.raw_os_error() == Some(nix::libc::ENOENT) => {
                        Ok(Destroyed::Gone)
                    }
                    Some(err) => Err(err),
                };
            }
        }
    }
}

/// The netlink messages in one datagram: (type, payload).
fn messages(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if length < NLMSG_HEADER || length > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        out.push((kind, &data[NLMSG_HEADER..length]));
        // Messages are aligned to 4 bytes.
        let next = (length + 3) & !3;
        data = data.get(next..).unwrap_or_default();
    }
    out
}

/// The error an `NLMSG_ERROR` payload carries; `None` for an
/// acknowledgement (error 0).
fn netlink_error(body: &[u8]) -> Option<CutError> {
    let code = i32::from_ne_bytes(body.get(..4)?.try_into().ok()?);
    match -code {
        0 => None,
        nix::libc::EPERM | nix::libc::EACCES => Some(CutError::NotPermitted),
        nix::libc::EOPNOTSUPP => Some(CutError::Unsupported),
        errno => Some(CutError::Netlink(io::Error::from_raw_os_error(errno))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// As root (CI), the host must allow cutting: a failed probe fails
    /// the test. Without root there is no CAP_NET_ADMIN to test with.
    fn can_cut() -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: not root, so no CAP_NET_ADMIN");
            return false;
        }
        probe().expect("root can destroy sockets on this kernel");
        true
    }

    #[test]
    fn only_the_owners_connections_to_a_target_are_cut() {
        // Needs CAP_NET_ADMIN (the suite runs as root in CI).
        if !can_cut() {
            return;
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let other = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = listener.local_addr().unwrap();
        let mut to_target = TcpStream::connect(target).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        let mut to_other = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (mut other_served, _) = other.accept().unwrap();
        let me = nix::unistd::Uid::current().as_raw();

        // Another owner's: nothing of ours is touched.
        let report = cut(&[target], Some(me.wrapping_add(1)), Duration::from_secs(5)).unwrap();
        assert_eq!(report.destroyed, 0);
        to_target.write_all(b"a").unwrap();
        let mut byte = [0u8; 1];
        served.read_exact(&mut byte).unwrap();

        let report = cut(&[target], Some(me), Duration::from_secs(5)).unwrap();
        // Only the connection to the target, not the target's own side
        // (whose peer is the client's ephemeral port).
        assert_eq!(report.destroyed, 1);
        to_target
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            to_target.read(&mut byte).is_err() || to_target.write_all(b"b").is_err(),
            "the cut connection still works"
        );
        // The connection to another backend is untouched.
        to_other.write_all(b"c").unwrap();
        other_served.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"c");
    }

    /// The watcher's order (issue 19): what is open at the dump is all a
    /// cut can touch, and a target read as live after it is spared.
    #[test]
    fn a_connection_opened_after_the_dump_or_to_a_spared_target_survives() {
        if !can_cut() {
            return;
        }
        let ended = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let reused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (ended_at, reused_at) = (ended.local_addr().unwrap(), reused.local_addr().unwrap());
        let mut old = TcpStream::connect(ended_at).unwrap();
        let _old_served = ended.accept().unwrap();
        let mut before_reuse = TcpStream::connect(reused_at).unwrap();
        let (mut before_reuse_served, _) = reused.accept().unwrap();
        let me = nix::unistd::Uid::current().as_raw();

        let found = find(&[ended_at, reused_at], Some(me), Duration::from_secs(5)).unwrap();
        // Opened after the dump, to a target the cut is about to hit.
        let mut late = TcpStream::connect(ended_at).unwrap();
        let (mut late_served, _) = ended.accept().unwrap();
        let report = found.destroy(&[reused_at]).unwrap();
        assert_eq!(report.destroyed, 1, "only the old connection is cut");

        let mut byte = [0u8; 1];
        old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            old.read(&mut byte).is_err() || old.write_all(b"x").is_err(),
            "the old connection still works"
        );
        late.write_all(b"l").unwrap();
        late_served.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"l");
        before_reuse.write_all(b"r").unwrap();
        before_reuse_served.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"r");
    }

    #[test]
    fn no_targets_is_no_work_and_no_netlink_socket() {
        assert_eq!(
            cut(&[], None, Duration::from_millis(1)).unwrap(),
            CutReport::default()
        );
    }

    #[test]
    fn a_truncated_or_odd_message_is_skipped_not_a_panic() {
        assert!(messages(&[1, 2, 3]).is_empty());
        let mut bad = vec![0u8; 20];
        bad[0] = 200; // longer than the datagram
        assert!(messages(&bad).is_empty());
        assert_eq!(peer_of(&[0u8; 10]), None);
        assert_eq!(uid_of(&[0u8; 10]), None);
        assert!(netlink_error(&[]).is_none());
    }
}
