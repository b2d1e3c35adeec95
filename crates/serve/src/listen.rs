//! Where serve listens: a Unix socket (the default, reachable only by the
//! socket's owner and group), a TCP address given explicitly, or a socket
//! systemd opened for us (`LISTEN_FDS`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// How `Server::bind` gets its listening socket.
#[derive(Debug)]
pub enum Bind {
    /// A Unix socket at this path, created mode 0660.
    Unix(PathBuf),
    /// A TCP address such as `127.0.0.1:8080`.
    Tcp(String),
    /// The socket systemd passed as descriptor 3 (socket activation).
    Inherited,
    /// A TCP socket the caller bound already (the demo and the tests bind
    /// port 0 and keep what they got, where binding a port picked earlier
    /// could lose it to another process).
    TcpListener(TcpListener),
}

/// Who is at the other end of a connection, as far as the transport says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Someone allowed by the Unix socket's mode: Apache.
    Unix,
    Tcp(IpAddr),
}

pub(crate) enum Listener {
    Tcp(TcpListener),
    /// `remove`: the path we created, removed again when we stop.
    Unix {
        listener: UnixListener,
        remove: Option<PathBuf>,
    },
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            remove: Some(path), ..
        } = self
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    pub(crate) fn bind(how: &Bind, group: Option<&str>) -> Result<Self> {
        let listener = match how {
            Bind::Tcp(addr) => Listener::Tcp(
                TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?,
            ),
            Bind::Unix(path) => Listener::Unix {
                listener: bind_unix(path, group)?,
                remove: Some(path.clone()),
            },
            Bind::TcpListener(listener) => Listener::Tcp(
                listener
                    .try_clone()
                    .context("taking over the listening socket")?,
            ),
            Bind::Inherited => inherited()?.context(
                "no socket passed by systemd (LISTEN_PID and LISTEN_FDS do not name this process)",
            )?,
        };
        listener
            .set_nonblocking()
            .context("making the listening socket non-blocking")?;
        Ok(listener)
    }

    /// `unix:/path` or `http://addr/`, for the start-up line.
    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("http://{addr}/"),
                Err(_) => "a TCP socket".into(),
            },
            Listener::Unix { listener, .. } => match listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned))
            {
                Some(path) => format!("unix:{}", path.display()),
                None => "a Unix socket".into(),
            },
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<(Stream, Peer)> {
        let (stream, peer) = match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                (Stream::Tcp(s), Peer::Tcp(addr.ip()))
            }
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                (Stream::Unix(s), Peer::Unix)
            }
        };
        // Connections are served by blocking reads with timeouts.
        stream.set_nonblocking(false)?;
        Ok((stream, peer))
    }
}

/// Binds a Unix socket that only its owner and group may connect to. A
/// stale socket left by a killed serve is replaced; a live one is not.
fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!("{} is in use by a running server", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    // A restrictive umask while binding: no moment in which anyone else
    // could connect. umask is process-wide, but binding happens at start-up
    // before any thread of ours runs.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("looking up group {group}"))?
            .with_context(|| format!("serve_socket_group: no group {group}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {group} {}", path.display()))?;
    }
    Ok(listener)
}

/// The listening socket systemd passed, if it passed one to this process.
fn inherited() -> Result<Option<Listener>> {
    const FIRST_FD: RawFd = 3;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    if !ours {
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    // Children (none today) must not think the sockets are theirs.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if count != 1 {
        bail!("systemd passed {count} sockets; serve takes exactly one");
    }
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike};
    use nix::sys::socket::{SockType, SockaddrStorage};
    // SAFETY: systemd hands descriptor 3 to us (LISTEN_PID is our pid) and
    // nothing else in this process owns it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(FIRST_FD) };
    let kind = getsockopt(&fd, sockopt::SockType).context("descriptor 3 is not a socket")?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    if kind != SockType::Stream || !listening {
        bail!("descriptor 3 from systemd is not a listening stream socket");
    }
    let family = getsockname::<SockaddrStorage>(FIRST_FD)
        .context("reading the address of descriptor 3")?
        .family();
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("setting close-on-exec on descriptor 3")?;
    // SAFETY: as above; from here on the listener owns descriptor 3.
    Ok(Some(match family {
        Some(AddressFamily::Unix) => Listener::Unix {
            listener: unsafe { UnixListener::from_raw_fd(FIRST_FD) },
            remove: None,
        },
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            Listener::Tcp(unsafe { TcpListener::from_raw_fd(FIRST_FD) })
        }
        _ => bail!("descriptor 3 from systemd is neither a Unix nor a TCP socket"),
    }))
}

/// One accepted connection.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(timeout)),
            Stream::Unix(s) => s.set_read_timeout(Some(timeout)),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(timeout)),
            Stream::Unix(s) => s.set_write_timeout(Some(timeout)),
        }
    }

    pub(crate) fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}
