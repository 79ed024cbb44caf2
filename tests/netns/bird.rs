//! A real BIRD 2 daemon in a namespace, driven through `birdc`: started from a configuration
//! text, stopped and started again (a restart), its tables read back. Stopped on drop.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use egressguard::netns::{Netns, Proc};

use crate::common::wait_for;

/// A BIRD process with its configuration, control socket and log in a temporary directory.
pub struct Bird {
    /// Holds `bird.conf`, `bird.ctl` and `bird.log`.
    pub dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Bird {
    /// Writes `conf` (where `{log}` stands for the log file's path) and starts BIRD in `ns`.
    pub fn start_with(ns: &Netns, conf: &str) -> Bird {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Bird { dir, proc: None };
        b.write_conf(conf);
        b.start(ns);
        b
    }

    fn write_conf(&self, conf: &str) {
        let conf = conf.replace(
            "{log}",
            &self.dir.path().join("bird.log").display().to_string(),
        );
        std::fs::write(self.dir.path().join("bird.conf"), conf).expect("write bird.conf");
    }

    /// Replaces the configuration with `conf` and applies it (`birdc configure`): sessions
    /// stay up unless a changed channel option needs a restart, changed routes are announced
    /// or withdrawn.
    pub fn reconfigure(&self, conf: &str) {
        self.write_conf(conf);
        let out = self.birdc("configure");
        // "Reconfiguration in progress" when a protocol must restart to apply it.
        assert!(
            out.contains("Reconfigured") || out.contains("Reconfiguration in progress"),
            "birdc configure: {out}"
        );
    }

    /// The control socket.
    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("bird.ctl")
    }

    /// Starts (again) with the written configuration; returns once `birdc` answers.
    pub fn start(&mut self, ns: &Netns) {
        crate::common::require_tools("BIRD", &["bird", "birdc"]);
        let conf = self.dir.path().join("bird.conf");
        let sock = self.sock();
        let _ = std::fs::remove_file(&sock);
        let p = ns
            .spawn(&[
                "bird",
                "-c",
                conf.to_str().expect("utf-8 path"),
                "-s",
                sock.to_str().expect("utf-8 path"),
                "-f",
            ])
            .expect("start bird");
        self.proc = Some(p);
        wait_for("bird control socket", Duration::from_secs(10), || {
            self.try_birdc("show status")
                .filter(|o| o.contains("Daemon is up"))
        });
    }

    /// Stops BIRD (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(3));
        }
    }

    /// Runs one `birdc` command; `None` when it fails.
    pub fn try_birdc(&self, cmd: &str) -> Option<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.sock())
            .args(cmd.split_whitespace())
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs one `birdc` command; panics when it fails.
    pub fn birdc(&self, cmd: &str) -> String {
        self.try_birdc(cmd)
            .unwrap_or_else(|| panic!("birdc {cmd} failed"))
    }

    /// BIRD's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bird.log")).unwrap_or_default()
    }
}
