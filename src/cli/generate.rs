//! The man page and shell completions, generated from the clap definitions so that they
//! can never disagree with the binary.

use std::io;
use std::path::Path;

use clap::CommandFactory;

use super::Cli;

/// Writes `egressguard.8` into `dir`.
pub fn man(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone()).section("8");
    let mut out = Vec::new();
    man.render(&mut out)?;
    // One page documents every visible verb.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let title = format!(".SH \"EGRESSGUARD {}\"\n", sub.get_name().to_uppercase());
        out.extend_from_slice(title.as_bytes());
        let page = clap_mangen::Man::new(
            sub.clone()
                .bin_name(format!("egressguard {}", sub.get_name())),
        );
        page.render_description_section(&mut out)?;
        page.render_options_section(&mut out)?;
    }
    std::fs::write(dir.join("egressguard.8"), out)
}

/// Writes bash (`egressguard`) and zsh (`_egressguard`) completions into `dir`.
pub fn completions(dir: &Path) -> io::Result<()> {
    use clap_complete::{Shell, generate_to};
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    generate_to(Shell::Bash, &mut cmd, "egressguard", dir)?;
    generate_to(Shell::Zsh, &mut cmd, "egressguard", dir)?;
    Ok(())
}
