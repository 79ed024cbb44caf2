//! TCP MD5 signatures (RFC 2385) for BGP sessions: reading the password file and installing
//! the key for a peer address on a socket (`setsockopt(TCP_MD5SIG)`), on the connecting
//! socket before `connect` and on the listening socket for inbound sessions.
//!
//! This is the crate's one unsafe island (STYLE rule 11): no maintained crate wraps
//! `TCP_MD5SIG` (nix 0.29 and socket2 0.6 do not), so the option is set with libc's
//! `setsockopt`. The `struct tcp_md5sig` argument is built entirely in safe code as plain
//! bytes in a `#[repr(C)]` struct whose layout is pinned by a test against the kernel's
//! (linux/tcp.h); the only `unsafe` is the call itself, with its SAFETY argument.

#![allow(unsafe_code)]

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Longest key the kernel takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_KEY_LEN: usize = 80;

/// Why a TCP MD5 key could not be read or installed.
#[derive(Debug, thiserror::Error)]
pub enum Md5Error {
    /// The password file could not be read.
    #[error("cannot read TCP MD5 password file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The password file holds no password.
    #[error("TCP MD5 password file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The password is longer than the kernel accepts.
    #[error(
        "TCP MD5 password in {path} is {len} bytes; at most 80 are allowed (RFC 2385 keys in Linux)"
    )]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The kernel refused the key (e.g. built without CONFIG_TCP_MD5SIG).
    #[error("setsockopt(TCP_MD5SIG) for {peer} failed")]
    Setsockopt {
        /// The peer address the key was for.
        peer: IpAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A TCP MD5 password, at most [`MAX_KEY_LEN`] bytes. Its `Debug` output hides the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Password(<{} bytes>)", self.0.len())
    }
}

impl Password {
    /// Reads the password from `path`: the whole file, less one trailing newline (`\n` or
    /// `\r\n`), so `echo secret > file` works. Empty or over 80 bytes is an error.
    pub fn read(path: &Path) -> Result<Password, Md5Error> {
        let bytes = std::fs::read(path).map_err(|source| Md5Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Password::from_file_bytes(path, bytes)
    }

    fn from_file_bytes(path: &Path, mut bytes: Vec<u8>) -> Result<Password, Md5Error> {
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(Md5Error::Empty {
                path: path.to_path_buf(),
            });
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(Md5Error::TooLong {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        Ok(Password(bytes))
    }

    /// A password from bytes already in memory (tests, or keys from elsewhere).
    pub fn new(bytes: &[u8]) -> Result<Password, Md5Error> {
        Password::from_file_bytes(Path::new("<memory>"), bytes.to_vec())
    }
}

/// `struct __kernel_sockaddr_storage`: 128 bytes, aligned like a pointer.
#[repr(C, align(8))]
struct SockaddrStorage([u8; 128]);

/// `struct tcp_md5sig` from linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    tcpm_addr: SockaddrStorage,
    tcpm_flags: u8,
    tcpm_prefixlen: u8,
    tcpm_keylen: u16,
    tcpm_ifindex: i32,
    tcpm_key: [u8; MAX_KEY_LEN],
}

impl TcpMd5Sig {
    /// The argument for `peer` with `key` (an empty key deletes the peer's key). Safe code
    /// only: `sockaddr_in`/`sockaddr_in6` written byte by byte (family in host order, port and
    /// address in network order).
    fn new(peer: IpAddr, key: &[u8]) -> TcpMd5Sig {
        let mut addr = [0u8; 128];
        match peer {
            IpAddr::V4(a) => {
                addr[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                // sin_port stays 0: the key applies to every port of the peer.
                addr[4..8].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                addr[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                // sin6_port 0, sin6_flowinfo 0, then the address at offset 8.
                addr[8..24].copy_from_slice(&a.octets());
            }
        }
        let len = key.len().min(MAX_KEY_LEN);
        let mut k = [0u8; MAX_KEY_LEN];
        k[..len].copy_from_slice(&key[..len]);
        TcpMd5Sig {
            tcpm_addr: SockaddrStorage(addr),
            tcpm_flags: 0,
            tcpm_prefixlen: 0,
            tcpm_keylen: len as u16,
            tcpm_ifindex: 0,
            tcpm_key: k,
        }
    }
}

/// Installs `password` as the TCP MD5 key for segments to and from `peer` on `sock` (a
/// connecting socket before `connect`, or a listening socket). `None` removes the key.
///
/// For an IPv4 peer on an IPv6 (dual-stack) socket pass the IPv4-mapped address.
pub fn set_key(
    sock: &impl AsFd,
    peer: IpAddr,
    password: Option<&Password>,
) -> Result<(), Md5Error> {
    let sig = TcpMd5Sig::new(peer, password.map(|p| p.0.as_slice()).unwrap_or_default());
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: `fd` is an open socket borrowed for the duration of the call (`AsFd`);
    // `&sig` points to a live, initialised `TcpMd5Sig` whose size and layout equal the
    // kernel's `struct tcp_md5sig` (test `layout_matches_linux_tcp_h`), and the length
    // passed is exactly its size, so the kernel reads only memory we own and writes none.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast::<libc::c_void>(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Md5Error::Setsockopt {
            peer,
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_linux_tcp_h() {
        // struct tcp_md5sig on every Linux architecture: 128-byte address storage, two u8,
        // one u16, one int, an 80-byte key: 216 bytes.
        assert_eq!(size_of::<TcpMd5Sig>(), 216);
        assert_eq!(offset_of!(TcpMd5Sig, tcpm_flags), 128);
        assert_eq!(offset_of!(TcpMd5Sig, tcpm_prefixlen), 129);
        assert_eq!(offset_of!(TcpMd5Sig, tcpm_keylen), 130);
        assert_eq!(offset_of!(TcpMd5Sig, tcpm_ifindex), 132);
        assert_eq!(offset_of!(TcpMd5Sig, tcpm_key), 136);
        assert_eq!(
            size_of::<SockaddrStorage>(),
            size_of::<libc::sockaddr_storage>()
        );
        assert_eq!(
            std::mem::align_of::<SockaddrStorage>(),
            std::mem::align_of::<libc::sockaddr_storage>()
        );
    }

    #[test]
    fn sockaddr_bytes() {
        let s = TcpMd5Sig::new("192.0.2.7".parse().unwrap(), b"k");
        assert_eq!(
            u16::from_ne_bytes([s.tcpm_addr.0[0], s.tcpm_addr.0[1]]),
            libc::AF_INET as u16
        );
        assert_eq!(&s.tcpm_addr.0[2..8], &[0, 0, 192, 0, 2, 7]);
        assert_eq!((s.tcpm_keylen, s.tcpm_key[0]), (1, b'k'));
        let s = TcpMd5Sig::new("2001:db8::1".parse().unwrap(), b"");
        assert_eq!(
            u16::from_ne_bytes([s.tcpm_addr.0[0], s.tcpm_addr.0[1]]),
            libc::AF_INET6 as u16
        );
        assert_eq!(&s.tcpm_addr.0[8..10], &[0x20, 0x01]);
        assert_eq!(s.tcpm_addr.0[23], 1);
        assert_eq!(s.tcpm_keylen, 0);
    }

    fn file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn password_file_rules() {
        let f = file(b"s3cret\n");
        assert_eq!(Password::read(f.path()).unwrap().0, b"s3cret");
        // Only one newline goes; `\r\n` counts as one.
        let f = file(b"a b\n\n");
        assert_eq!(Password::read(f.path()).unwrap().0, b"a b\n");
        let f = file(b"x\r\n");
        assert_eq!(Password::read(f.path()).unwrap().0, b"x");
        let f = file(&[b'p'; 80]);
        assert_eq!(Password::read(f.path()).unwrap().0.len(), 80);
        let f = file(b"\n");
        let e = Password::read(f.path()).unwrap_err();
        assert!(matches!(e, Md5Error::Empty { .. }), "{e}");
        assert!(e.to_string().contains(&f.path().display().to_string()));
        let f = file(&[b'p'; 81]);
        let e = Password::read(f.path()).unwrap_err();
        assert!(matches!(e, Md5Error::TooLong { len: 81, .. }), "{e}");
        let e = Password::read(Path::new("/nonexistent/egressguard-md5")).unwrap_err();
        assert!(matches!(e, Md5Error::Read { .. }));
        assert!(
            e.to_string().contains("/nonexistent/egressguard-md5"),
            "{e}"
        );
        assert!(!format!("{:?}", Password::new(b"hidden").unwrap()).contains("hidden"));
    }

    /// The real kernel on loopback: same key connects, a different key never completes the
    /// handshake (the kernel drops the unsigned/wrongly signed SYN), no key on the client
    /// neither.
    #[test]
    fn kernel_enforces_the_key_on_loopback() {
        use std::net::{SocketAddr, TcpListener, TcpStream};
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let good = Password::new(b"right").unwrap();
        set_key(&l, lo, Some(&good)).expect("TCP_MD5SIG on the listener");
        let to: SocketAddr = l.local_addr().unwrap();

        let try_connect = |key: Option<&Password>| {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .unwrap();
            if key.is_some() {
                set_key(&s, lo, key).unwrap();
            }
            let s: TcpStream = std::net::TcpStream::from(s);
            // SO_SNDTIMEO bounds a blocking connect(2) on Linux.
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::SendTimeout,
                &nix::sys::time::TimeVal::new(1, 0),
            )
            .unwrap();
            let addr = nix::sys::socket::SockaddrIn::from(match to {
                SocketAddr::V4(a) => a,
                SocketAddr::V6(_) => unreachable!(),
            });
            nix::sys::socket::connect(s.as_raw_fd(), &addr).is_ok()
        };
        assert!(try_connect(Some(&good)), "same key must connect");
        assert!(
            !try_connect(Some(&Password::new(b"wrong").unwrap())),
            "a wrong key must not connect"
        );
        assert!(!try_connect(None), "no key must not connect");
        // Removing the listener's key lets an unsigned client in again.
        set_key(&l, lo, None).unwrap();
        assert!(try_connect(None));
    }
}
