//! Runs the `nft` program: one `nft -j -f -` per transaction, `nft -j list table` to read the
//! agent's table back, and the classification of its failures into errors that name the fix.
//!
//! The payload is built with the `nftables` crate's schema types ([`super::layout`]); the
//! process is run here rather than by `nftables::helper`, because the helper does not capture
//! nft's stderr (its error text would be lost, and with it the cause shown to the operator)
//! and cannot run asynchronously without another runtime feature. The child is spawned from
//! the calling thread, so it inherits that thread's network namespace.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::EnforceError;
use super::kernel::{KernelTable, ParseError, read_table};
use super::layout::Tx;

/// The default nft program, looked up in `PATH`.
pub const DEFAULT_NFT: &str = "nft";

/// What nft's stderr says went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No privilege (not root, no CAP_NET_ADMIN).
    Permission,
    /// The kernel lacks nf_tables or a part of it.
    Kernel,
    /// The object does not exist.
    NotFound,
    /// Anything else.
    Other,
}

/// Classifies nft's stderr (run with `LC_ALL=C`, so the messages are the C locale's).
pub fn classify(stderr: &str) -> Failure {
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        Failure::Permission
    } else if stderr.contains("Protocol not supported")
        || stderr.contains("Address family not supported")
        || stderr.contains("Operation not supported")
        || stderr.contains("cannot open netlink socket")
    {
        Failure::Kernel
    } else if stderr.contains("No such file or directory") {
        Failure::NotFound
    } else {
        Failure::Other
    }
}

/// The `nft` program.
#[derive(Clone, Debug)]
pub struct Nft {
    program: PathBuf,
}

struct Output {
    ok: bool,
    stderr: String,
}

impl Nft {
    /// Uses `program` as nft.
    pub fn new(program: impl Into<PathBuf>) -> Nft {
        Nft {
            program: program.into(),
        }
    }

    /// The program path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Runs nft with `stdin`; what it prints on stdout is not wanted.
    async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output, EnforceError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| self.spawn_error(source))?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data).await.map_err(EnforceError::NftIo)?;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(EnforceError::NftIo)?;
        Ok(Output {
            ok: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn spawn_error(&self, source: std::io::Error) -> EnforceError {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            EnforceError::PermissionDenied {
                detail: format!("cannot execute {}: {source}", self.program.display()),
            }
        } else {
            EnforceError::NftMissing {
                program: self.program.clone(),
                source,
            }
        }
    }

    fn failure(stderr: String, otherwise: impl FnOnce(String) -> EnforceError) -> EnforceError {
        match classify(&stderr) {
            Failure::Permission => EnforceError::PermissionDenied { detail: stderr },
            Failure::Kernel => EnforceError::KernelUnsupported { detail: stderr },
            Failure::NotFound | Failure::Other => otherwise(stderr),
        }
    }

    /// Applies `tx` as one transaction: all of it or nothing.
    pub async fn apply(&self, tx: &Tx) -> Result<(), EnforceError> {
        if tx.is_empty() {
            return Ok(());
        }
        let json = tx.to_json();
        let out = self.run(&["-j", "-f", "-"], Some(json.as_bytes())).await?;
        if out.ok {
            return Ok(());
        }
        Err(Self::failure(out.stderr, |stderr| {
            EnforceError::NftFailed {
                commands: tx.len(),
                stderr,
            }
        }))
    }

    /// Runs an nft script in its text syntax (`nft -f -`), one transaction: for what the
    /// JSON cannot spell.
    pub async fn apply_script(&self, script: &str) -> Result<(), EnforceError> {
        let out = self.run(&["-f", "-"], Some(script.as_bytes())).await?;
        if out.ok {
            return Ok(());
        }
        Err(Self::failure(out.stderr, |stderr| {
            EnforceError::NftFailed {
                commands: script.lines().count(),
                stderr,
            }
        }))
    }

    /// Reads the table back; `None` when it does not exist. The listing is parsed as nft
    /// writes it ([`read_table`]): in a storm the counter and meter sets list hundreds of
    /// thousands of elements, which would otherwise be held as text.
    pub async fn list_table(&self, table: &str) -> Result<Option<KernelTable>, EnforceError> {
        // Spawned here, so the child is in this thread's network namespace; read on a
        // blocking thread, as the parser reads.
        let mut child = std::process::Command::new(&self.program)
            .args(["-j", "list", "table", "inet", table])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        let stdout = child.stdout.take();
        let owned = table.to_owned();
        let (parsed, status, stderr) = tokio::task::spawn_blocking(move || {
            let parsed = stdout.map(|out| read_table(out, &owned));
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                // Best effort: the status below says whether it failed.
                let _ = err.read_to_string(&mut stderr);
            }
            (parsed, child.wait(), stderr)
        })
        .await
        .map_err(|e| EnforceError::NftIo(std::io::Error::other(e)))?;
        let status = status.map_err(EnforceError::NftIo)?;
        let stderr = stderr.trim().to_owned();
        if !status.success() {
            if classify(&stderr) == Failure::NotFound {
                return Ok(None);
            }
            return Err(Self::failure(stderr, |stderr| EnforceError::ListFailed {
                table: table.to_owned(),
                stderr,
            }));
        }
        parsed
            .unwrap_or_else(|| Err(ParseError::Shape("no output".into())))
            .map(Some)
            .map_err(|source| EnforceError::Listing {
                table: table.to_owned(),
                source,
            })
    }

    /// Deletes the table; `false` when it was already gone.
    pub async fn delete_table(&self, table: &str) -> Result<bool, EnforceError> {
        let mut tx = Tx::new();
        tx.delete_table(table);
        match self.apply(&tx).await {
            Ok(()) => Ok(true),
            Err(EnforceError::NftFailed { stderr, .. })
                if classify(&stderr) == Failure::NotFound =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_nft_messages() {
        assert_eq!(
            classify(
                "Operation not permitted (you must be root)\nnetlink: Error: cache initialization failed: Operation not permitted"
            ),
            Failure::Permission
        );
        assert_eq!(
            classify("Error: cannot open netlink socket: Protocol not supported"),
            Failure::Kernel
        );
        assert_eq!(
            classify("Error: Could not process rule: Operation not supported"),
            Failure::Kernel
        );
        assert_eq!(
            classify("Error: No such file or directory\nlist table inet nope"),
            Failure::NotFound
        );
        assert_eq!(
            classify("Error: interval overlaps with an existing one"),
            Failure::Other
        );
    }
}
