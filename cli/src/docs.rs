//! Man pages and shell completions for hostbind's binaries, generated from their clap
//! definitions so that they never drift from `--help`.
//!
//! Each binary calls [`handle_generate_docs`] first thing in `main`. `BIN generate-docs --out DIR`
//! (a hidden command: it is in no help text, man page or completion) then writes
//! - `DIR/man/BIN.1` and one page per subcommand (`BIN-SUB.1`, `BIN-SUB-SUBSUB.1`, ...),
//! - `DIR/completions/BIN.bash`, `DIR/completions/_BIN` (zsh) and `DIR/completions/BIN.fish`,
//!
//! which the Debian packages install under `/usr/share/man/man1/`,
//! `/usr/share/bash-completion/completions/`, `/usr/share/zsh/vendor-completions/` and
//! `/usr/share/fish/vendor_completions.d/`.

use clap::{Arg, Command};
use clap_complete::Shell;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The name of the hidden command every binary answers to.
pub const GENERATE_DOCS: &str = "generate-docs";

/// The shells completion scripts are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Why the documentation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// A directory or file could not be written.
    #[error("cannot write {path}: {source}; check that the output directory is writable")]
    Write {
        /// The directory or file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generated {
    /// Man pages (section 1), the command's own first.
    pub man_pages: Vec<PathBuf>,
    /// Completion scripts, in the order of [`SHELLS`].
    pub completions: Vec<PathBuf>,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> DocsError + '_ {
    move |source| DocsError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the man pages of `cmd` and all its visible subcommands to `out/man/` and completion
/// scripts for bash, zsh and fish to `out/completions/`; creates the directories as needed.
pub fn generate(cmd: Command, out: &Path) -> Result<Generated, DocsError> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    for d in [&man_dir, &comp_dir] {
        std::fs::create_dir_all(d).map_err(write_err(d))?;
    }
    let name = cmd.get_name().to_string();
    let source = match cmd.get_version() {
        Some(v) => format!("hostbind {v}"),
        None => "hostbind".to_string(),
    };

    let mut man_pages = Vec::new();
    let mut page_cmd = cmd.clone().disable_help_subcommand(true);
    page_cmd.build();
    man_pages_of(page_cmd, &source, &man_dir, &mut man_pages)?;

    let mut completions = Vec::new();
    let mut comp_cmd = cmd;
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut comp_cmd, &name, &comp_dir)
            .map_err(write_err(&comp_dir))?;
        completions.push(path);
    }
    Ok(Generated {
        man_pages,
        completions,
    })
}

/// Writes the page of `cmd`, then those of its visible subcommands (depth first).
fn man_pages_of(
    cmd: Command,
    source: &str,
    dir: &Path,
    pages: &mut Vec<PathBuf>,
) -> Result<(), DocsError> {
    let subs: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let man = clap_mangen::Man::new(cmd)
        .source(source.to_string())
        .manual("hostbind manual");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page).map_err(write_err(&path))?;
    std::fs::write(&path, page).map_err(write_err(&path))?;
    pages.push(path);
    for s in subs {
        man_pages_of(s, source, dir, pages)?;
    }
    Ok(())
}

/// The command line of `BIN generate-docs`.
fn generate_docs_command(bin: &str) -> Command {
    Command::new(GENERATE_DOCS)
        .bin_name(format!("{bin} {GENERATE_DOCS}"))
        .about("Write man pages and shell completions (bash, zsh, fish) generated from this program's command-line definition")
        .arg(
            Arg::new("out")
                .long("out")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Directory to write man/ and completions/ into (created if missing)"),
        )
}

/// Runs `BIN generate-docs --out DIR` and exits if that is what the command line asks for;
/// returns otherwise, so `main` goes on to parse its own command line. `cmd` builds the binary's
/// clap command (e.g. `<Cli as clap::CommandFactory>::command`).
pub fn handle_generate_docs(cmd: impl FnOnce() -> Command) {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).and_then(|a| a.to_str()) != Some(GENERATE_DOCS) {
        return;
    }
    let cmd = cmd();
    let bin = cmd.get_name().to_string();
    let m = generate_docs_command(&bin)
        .try_get_matches_from(args.iter().skip(1))
        .unwrap_or_else(|e| e.exit());
    let Some(out) = m.get_one::<PathBuf>("out") else {
        // clap enforces `required(true)`; this is only reached if that ever changes.
        eprintln!("{bin} {GENERATE_DOCS}: --out DIR is required");
        std::process::exit(2);
    };
    match generate(cmd, out) {
        Ok(g) => {
            println!(
                "wrote {} man page(s) to {} and {} completion script(s) to {}",
                g.man_pages.len(),
                out.join("man").display(),
                g.completions.len(),
                out.join("completions").display()
            );
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{bin} {GENERATE_DOCS}: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// Demo tool.
    #[derive(Parser)]
    #[command(name = "demo-tool", version = "1.2.3", about)]
    struct Cli {
        /// Config file.
        #[arg(long, global = true, default_value = "/etc/demo.toml")]
        config: PathBuf,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Run it.
        Run,
        /// Manage licenses.
        #[command(subcommand)]
        License(LicenseCmd),
        /// Not for users.
        #[command(hide = true)]
        Secret,
    }

    #[derive(Subcommand)]
    enum LicenseCmd {
        /// Add a license file.
        Add {
            /// The file.
            file: PathBuf,
        },
    }

    fn names(v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn writes_a_page_per_visible_command_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(<Cli as clap::CommandFactory>::command(), dir.path()).unwrap();
        assert_eq!(
            names(&g.man_pages),
            [
                "demo-tool.1",
                "demo-tool-run.1",
                "demo-tool-license.1",
                "demo-tool-license-add.1"
            ]
        );
        assert_eq!(
            names(&g.completions),
            ["demo-tool.bash", "_demo-tool", "demo-tool.fish"]
        );
        let top = std::fs::read_to_string(dir.path().join("man/demo-tool.1")).unwrap();
        assert!(top.starts_with(".ie"), "not roff: {top}");
        assert!(top.contains(".TH demo-tool 1"), "{top}");
        assert!(top.contains("hostbind 1.2.3"), "{top}");
        assert!(top.contains("demo\\-tool\\-license(1)"), "{top}");
        assert!(!top.contains("secret"), "hidden command documented: {top}");
        let add = std::fs::read_to_string(dir.path().join("man/demo-tool-license-add.1")).unwrap();
        assert!(add.contains("Add a license file"), "{add}");
        let bash = std::fs::read_to_string(&g.completions[0]).unwrap();
        assert!(
            bash.contains("complete -F") && bash.contains("license"),
            "{bash}"
        );
        let fish = std::fs::read_to_string(&g.completions[2]).unwrap();
        assert!(fish.contains("complete -c demo-tool"), "{fish}");
    }

    #[test]
    fn unwritable_output_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = generate(<Cli as clap::CommandFactory>::command(), &file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot write") && e.contains("a-file"), "{e}");
    }

    #[test]
    fn generate_docs_command_requires_out() {
        let e = generate_docs_command("x")
            .try_get_matches_from(["generate-docs"])
            .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let m = generate_docs_command("x")
            .try_get_matches_from(["generate-docs", "--out", "/tmp/d"])
            .unwrap();
        assert_eq!(
            m.get_one::<PathBuf>("out").unwrap(),
            &PathBuf::from("/tmp/d")
        );
    }
}
