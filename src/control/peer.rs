//! The supplementary groups of the process on the other end of a Unix socket
//! (`getsockopt(SO_PEERGROUPS)`, Linux 4.13).
//!
//! The kernel records them with the peer's credentials when it connects, so the answer needs
//! no access to `/proc` (the unit's `ProtectProc=invisible` hides other users' processes from
//! the agent) and cannot be raced by the peer exec'ing something else.
//!
//! An unsafe island (STYLE rule 11): neither nix 0.29, rustix nor socket2 wraps
//! `SO_PEERGROUPS`, so the option is read with libc's `getsockopt` into a `Vec<gid_t>` that
//! this module owns; the only `unsafe` is the call itself, with its SAFETY argument. Tests
//! compare the answer with `getgroups(2)` of the process that made the socket, and grow
//! the buffer past its first size.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

/// Groups the first call makes room for; more take a second call.
const FIRST_GUESS: usize = 32;
/// The kernel's `NGROUPS_MAX`: no process has more supplementary groups.
const NGROUPS_MAX: usize = 65536;

/// The peer's supplementary group ids, as the kernel recorded them at `connect`.
pub fn peer_groups(sock: &impl AsFd) -> std::io::Result<Vec<u32>> {
    peer_groups_with(sock, FIRST_GUESS)
}

fn peer_groups_with(sock: &impl AsFd, first: usize) -> std::io::Result<Vec<u32>> {
    let fd = sock.as_fd().as_raw_fd();
    let gid_size = std::mem::size_of::<libc::gid_t>();
    let mut buf: Vec<libc::gid_t> = vec![0; first.max(1)];
    loop {
        let mut len = libc::socklen_t::try_from(buf.len() * gid_size)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: `fd` is an open socket borrowed for the duration of the call (`AsFd`);
        // `buf` is a live allocation of exactly `len` bytes of `gid_t`, which is what the
        // kernel writes for SO_PEERGROUPS (an array of gid_t, never more than `len` bytes:
        // when it needs more it writes nothing and returns ERANGE with the size it needs in
        // `len`); `len` is a valid, writable socklen_t.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast::<libc::c_void>(),
                &mut len,
            )
        };
        if rc == 0 {
            buf.truncate(len as usize / gid_size);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        let needed = len as usize / gid_size;
        if e.raw_os_error() != Some(libc::ERANGE) || needed <= buf.len() || needed > NGROUPS_MAX {
            return Err(e);
        }
        // The peer's group list is fixed at connect: one more call with the size the kernel
        // named is enough (the loop is bounded by the checks above).
        buf.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn own_groups() -> Vec<u32> {
        let mut g: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        g.sort_unstable();
        g
    }

    #[test]
    fn a_socketpair_reports_the_groups_of_the_process_that_made_it() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut got = peer_groups(&a).unwrap();
        got.sort_unstable();
        assert_eq!(got, own_groups());
    }

    #[test]
    fn the_buffer_grows_when_the_first_guess_is_too_small() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut got = peer_groups_with(&a, 1).unwrap();
        got.sort_unstable();
        assert_eq!(got, own_groups());
    }

    /// As root: a child with 100 supplementary groups (more than the first guess) connects;
    /// the listener sees every one of them.
    #[test]
    fn a_connecting_process_with_many_groups_is_seen_with_all_of_them() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: setgroups needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Traversable and the socket writable for nobody.
        let mode = |p: &std::path::Path, m| {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
        };
        mode(dir.path(), 0o755);
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        mode(&path, 0o777);
        listener.set_nonblocking(true).unwrap();
        let groups: Vec<u32> = (50_000..50_100).collect();
        let list = groups
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",");
        // `setpriv` sets the groups, then python connects and holds the socket open until
        // its stdin closes (bounded by the timeout).
        let mut child = std::process::Command::new("timeout")
            .args(["10", "setpriv", "--reuid=65534", "--regid=65534"])
            .arg(format!("--groups={list}"))
            .args([
                "/usr/bin/python3",
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("the client exited without connecting: {status}");
                    }
                    assert!(std::time::Instant::now() < deadline, "no connection");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let mut got = peer_groups(&conn).unwrap();
        drop(child.stdin.take());
        let _ = child.wait();
        got.sort_unstable();
        assert_eq!(got, groups);
    }
}
