//! The documents made from the command line itself: shell completions
//! (clap_complete) and the manual pages (clap_mangen), both generated from
//! the clap structs in `args.rs`, so they cannot drift from `--help`.

use std::io::{self, Write};

use anyhow::Context;
use clap::CommandFactory;

use super::args::{Cli, CompletionsArgs, ManArgs};

pub(super) fn completions(a: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = io::stdout().lock();
    clap_complete::generate(a.shell, &mut cmd, "nixstream", &mut out);
    out.flush()?;
    Ok(())
}

pub(super) fn man(a: &ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match &a.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
        }
        None => {
            let mut out = io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            out.flush()?;
        }
    }
    Ok(())
}
