//! Man pages and shell completions for hostbind's binaries, generated from their clap
//! definitions so that they never drift from `--help`.
//!
//! Each binary calls [`handle_generate_docs`] first thing in `main`. `BIN generate-docs --out DIR`
//! (a hidden command: it is in no help text, man page or completion) then writes
//! - `DIR/man/BIN.1` and one page per subcommand (`BIN-SUB.1`, `BIN-SUB-SUBSUB.1`, ...), with the
//!   hand-written sections the binary supplies in [`Extras`] (FILES, ENVIRONMENT, EXIT STATUS,
//!   EXAMPLES, SEE ALSO) and any further pages (e.g. `hostbind-proxy.toml.5`),
//! - `DIR/completions/BIN.bash`, `DIR/completions/_BIN` (zsh) and `DIR/completions/BIN.fish`,
//!
//! which the Debian packages install under `/usr/share/man/man1/` (and `man5/`),
//! `/usr/share/bash-completion/completions/`, `/usr/share/zsh/vendor-completions/` and
//! `/usr/share/fish/vendor_completions.d/`.

use clap::{Arg, Command};
use clap_complete::{Generator, Shell};
use roff::{bold, roman, Roff};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The name of the hidden command every binary answers to.
pub const GENERATE_DOCS: &str = "generate-docs";

/// The shells completion scripts are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The manual every page belongs to.
pub const MANUAL: &str = "hostbind manual";

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
    /// Man pages: the command's own first, then its subcommands', then [`Extras::pages`].
    pub man_pages: Vec<PathBuf>,
    /// Completion scripts, in the order of [`SHELLS`].
    pub completions: Vec<PathBuf>,
}

/// One entry of a hand-written man page section: a tag (a file, a variable, an exit code, a
/// command line; set in bold) and what it means. An empty tag makes a plain paragraph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The tag.
    pub tag: String,
    /// The text (blank lines separate paragraphs).
    pub text: String,
}

impl Entry {
    /// An entry `tag`: `text`.
    pub fn new(tag: impl Into<String>, text: impl Into<String>) -> Entry {
        Entry {
            tag: tag.into(),
            text: text.into(),
        }
    }
}

/// A hand-written man page section (FILES, ENVIRONMENT, EXIT STATUS, EXAMPLES, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The heading, upper case by convention ("EXIT STATUS").
    pub title: String,
    /// Paragraphs before the entries (blank lines separate them); may be empty.
    pub intro: String,
    /// The entries.
    pub entries: Vec<Entry>,
    /// Text shown as is after the entries (no filling: a file, a session); may be empty.
    pub literal: String,
}

impl Section {
    /// A section `title` with `entries`.
    pub fn new(title: impl Into<String>, entries: Vec<Entry>) -> Section {
        Section {
            title: title.into(),
            intro: String::new(),
            entries,
            literal: String::new(),
        }
    }

    /// The same with an introduction.
    pub fn with_intro(mut self, intro: impl Into<String>) -> Section {
        self.intro = intro.into();
        self
    }

    /// The same with text shown as is after the entries.
    pub fn with_literal(mut self, literal: impl Into<String>) -> Section {
        self.literal = literal.into();
        self
    }
}

/// The EXIT STATUS section of a hostbind binary: 0 success, 1 an error (`error` says where the
/// message goes), 2 a bad command line, then `more` codes.
pub fn exit_status(error: &str, more: &[(&str, &str)]) -> Section {
    let mut entries = vec![
        Entry::new("0", "Success."),
        Entry::new("1", error),
        Entry::new("2", "The command line is wrong."),
    ];
    entries.extend(more.iter().map(|(c, t)| Entry::new(*c, *t)));
    Section::new("EXIT STATUS", entries)
}

/// A man page that is not generated from a clap command (e.g. a configuration file's page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraPage {
    /// The file name, e.g. `hostbind-proxy.toml.5`.
    pub file_name: String,
    /// The whole page in roff (see [`page`]).
    pub roff: String,
}

/// What a binary's man pages get beyond its clap definition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Sections of the command's own page (FILES, ENVIRONMENT, EXAMPLES, ...), in order.
    pub sections: Vec<Section>,
    /// Sections of subcommand pages, by the subcommand's path below the binary
    /// (`"license remove"`).
    pub command_sections: Vec<(String, Section)>,
    /// Sections of every page (e.g. EXIT STATUS), after the others.
    pub common_sections: Vec<Section>,
    /// Pages every page refers to under SEE ALSO, besides the binary's own (`"hostbind-proxy.toml(5)"`).
    pub see_also: Vec<String>,
    /// Further pages.
    pub pages: Vec<ExtraPage>,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> DocsError + '_ {
    move |source| DocsError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the man pages of `cmd` and all its visible subcommands, with `extras`, to `out/man/`
/// and completion scripts for bash, zsh and fish to `out/completions/`; creates the directories
/// as needed.
pub fn generate(cmd: Command, extras: &Extras, out: &Path) -> Result<Generated, DocsError> {
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
    let ctx = PageContext {
        bin: &name,
        source: &source,
        dir: &man_dir,
        extras,
    };
    man_pages_of(page_cmd, &[], &ctx, &mut man_pages)?;
    for p in &extras.pages {
        let path = man_dir.join(&p.file_name);
        std::fs::write(&path, &p.roff).map_err(write_err(&path))?;
        man_pages.push(path);
    }

    let mut completions = Vec::new();
    let mut comp_cmd = cmd;
    for shell in SHELLS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut comp_cmd, &name, &mut script);
        let mut script = String::from_utf8_lossy(&script).into_owned();
        if shell == Shell::Bash {
            script = fix_bash_states(script, &name);
        }
        let path = comp_dir.join(shell.file_name(&name));
        std::fs::write(&path, script).map_err(write_err(&path))?;
        completions.push(path);
    }
    Ok(Generated {
        man_pages,
        completions,
    })
}

/// clap_complete (up to 4.6.12 at least, clap-rs/clap#6421) spells the completion state of a
/// subcommand of a binary with a hyphen in its name two ways: the loop over the words builds
/// `hostbind__proxy__subcmd__license`, the case arms expect
/// `hostbind__subcmd__proxy__subcmd__license`, so nothing after the first word completes.
/// Rewrites the arms to the loop's spelling (a no-op once clap_complete agrees with itself).
fn fix_bash_states(script: String, bin: &str) -> String {
    const SEP: &str = "__subcmd__";
    if !bin.contains('-') {
        return script;
    }
    let wrong = format!("{}{SEP}", bin.replace('-', SEP));
    let right = format!("{}{SEP}", bin.replace('-', "__"));
    script.replace(&wrong, &right)
}

struct PageContext<'a> {
    bin: &'a str,
    source: &'a str,
    dir: &'a Path,
    extras: &'a Extras,
}

/// The roff preamble every [`Roff::render`] starts with (defines the apostrophe string).
fn preamble() -> String {
    Roff::new().render()
}

/// Renders `sections` (and SEE ALSO `see_also`, when not empty) as roff without the preamble.
fn render_sections(sections: &[&Section], see_also: &[String]) -> String {
    let mut r = Roff::new();
    for s in sections {
        r.control("SH", [s.title.as_str()]);
        paragraphs(&mut r, &s.intro);
        for e in &s.entries {
            if e.tag.is_empty() {
                r.control("PP", []);
            } else {
                r.control("TP", []);
                r.text([bold(e.tag.as_str())]);
            }
            let mut first = true;
            for para in e.text.split("\n\n") {
                if !first {
                    r.control("IP", []);
                }
                first = false;
                r.text([roman(para.trim())]);
            }
        }
        if !s.literal.is_empty() {
            r.control("PP", []);
            r.control("nf", []);
            r.control("RS", ["4"]);
            for line in s.literal.lines() {
                r.text([roman(line)]);
            }
            r.control("RE", []);
            r.control("fi", []);
        }
    }
    if !see_also.is_empty() {
        r.control("SH", ["SEE ALSO"]);
        r.text([roman(see_also.join(", "))]);
    }
    let text = r.render();
    text.strip_prefix(preamble().as_str())
        .unwrap_or(&text)
        .to_string()
}

fn paragraphs(r: &mut Roff, text: &str) {
    for (i, para) in text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        if i > 0 {
            r.control("PP", []);
        }
        r.text([roman(para)]);
    }
}

/// A whole man page that clap does not describe: `.TH`, NAME (`name \- summary`), `sections`
/// and SEE ALSO, e.g. `page("hostbind-proxy.toml", "5", "configuration of ...", "hostbind 0.1.0",
/// &sections, &["hostbind-proxy(1)".into()])`.
pub fn page(
    name: &str,
    section: &str,
    summary: &str,
    source: &str,
    sections: &[Section],
    see_also: &[String],
) -> String {
    let mut r = Roff::new();
    r.control("TH", [name, section, "", source, MANUAL]);
    r.control("SH", ["NAME"]);
    r.text([roman(format!("{name} - {summary}"))]);
    let head = r.render();
    let refs: Vec<&Section> = sections.iter().collect();
    head + &render_sections(&refs, see_also)
}

/// Writes the page of `cmd` (at `path` below the binary), then those of its visible
/// subcommands (depth first).
fn man_pages_of(
    cmd: Command,
    path: &[String],
    ctx: &PageContext<'_>,
    pages: &mut Vec<PathBuf>,
) -> Result<(), DocsError> {
    let subs: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let has_long_about = cmd.get_long_about().is_some();
    let has_args = cmd.get_arguments().any(|a| !a.is_hide_set());
    let has_subs = !subs.is_empty();
    let has_version = cmd.get_version().is_some() || cmd.get_long_version().is_some();
    let man = clap_mangen::Man::new(cmd)
        .source(ctx.source.to_string())
        .manual(MANUAL);
    let file = ctx.dir.join(man.get_filename());
    // Rendered piece by piece: DESCRIPTION only when there is more to say than NAME does, the
    // hand-written sections before VERSION, and no EXTRA (after_help) section.
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut put = |f: &dyn Fn(&mut Vec<u8>) -> io::Result<()>| -> io::Result<()> {
        let mut b = Vec::new();
        f(&mut b)?;
        parts.push(b);
        Ok(())
    };
    let w = write_err(&file);
    let rendered = (|| -> io::Result<()> {
        put(&|b| man.render_title(b))?;
        put(&|b| man.render_name_section(b))?;
        put(&|b| man.render_synopsis_section(b))?;
        if has_long_about {
            put(&|b| man.render_description_section(b))?;
        }
        if has_args {
            put(&|b| man.render_options_section(b))?;
        }
        if has_subs {
            put(&|b| man.render_subcommands_section(b))?;
        }
        Ok(())
    })();
    rendered.map_err(w)?;
    let pre = preamble();
    let mut page = String::new();
    for (i, p) in parts.iter().enumerate() {
        let s = String::from_utf8_lossy(p);
        page.push_str(if i == 0 {
            &s
        } else {
            s.strip_prefix(pre.as_str()).unwrap_or(&s)
        });
    }
    let key = path.join(" ");
    let mut sections: Vec<&Section> = Vec::new();
    if path.is_empty() {
        sections.extend(ctx.extras.sections.iter());
    }
    sections.extend(
        ctx.extras
            .command_sections
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, s)| s),
    );
    sections.extend(ctx.extras.common_sections.iter());
    let mut see_also = Vec::new();
    if !path.is_empty() {
        see_also.push(format!("{}(1)", ctx.bin));
    }
    see_also.extend(ctx.extras.see_also.iter().cloned());
    page.push_str(&render_sections(&sections, &see_also));
    if has_version {
        let mut b = Vec::new();
        man.render_version_section(&mut b)
            .map_err(write_err(&file))?;
        let s = String::from_utf8_lossy(&b);
        page.push_str(s.strip_prefix(pre.as_str()).unwrap_or(&s));
    }
    std::fs::write(&file, page).map_err(write_err(&file))?;
    pages.push(file);
    for s in subs {
        let mut sub_path = path.to_vec();
        sub_path.push(s.get_name().to_string());
        man_pages_of(s, &sub_path, ctx, pages)?;
    }
    Ok(())
}

/// Completes `words` (the command line so far; the last word is the one being completed, `""`
/// after a space) the way bash does on TAB, with the completion script at `script`: sources
/// it, sets `COMP_WORDS`/`COMP_CWORD`, calls the function it registered for `words[0]` and
/// returns `COMPREPLY`. For tests and the package checks.
pub fn bash_complete(script: &Path, words: &[&str]) -> io::Result<Vec<String>> {
    const PROG: &str = r#"
set -u
source "$HB_SCRIPT" || exit 3
# like bash: the compspec of the full path, else of its basename
spec=$(complete -p "$1" 2>/dev/null || complete -p "${1##*/}") || { echo "no completion registered for $1" >&2; exit 4; }
fn=$(sed -n 's/.*-F \([^ ]*\).*/\1/p' <<<"$spec")
[ -n "$fn" ] || { echo "no -F function in: $spec" >&2; exit 5; }
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
prev=""
[ "$COMP_CWORD" -gt 0 ] && prev=${COMP_WORDS[COMP_CWORD-1]}
COMPREPLY=()
"$fn" "$1" "${COMP_WORDS[COMP_CWORD]}" "$prev"
for w in "${COMPREPLY[@]}"; do printf '%s\n' "$w"; done
"#;
    let out = std::process::Command::new("bash")
        .arg("--norc")
        .arg("-c")
        .arg(PROG)
        .arg("bash")
        .args(words)
        .env("HB_SCRIPT", script)
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "bash completion of {words:?} with {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
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
/// clap command (e.g. `<Cli as clap::CommandFactory>::command`), `extras` its hand-written
/// man page sections and pages.
pub fn handle_generate_docs(cmd: impl FnOnce() -> Command, extras: impl FnOnce() -> Extras) {
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
    match generate(cmd, &extras(), out) {
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
        ///
        /// The file is checked first.
        Add {
            /// The file.
            file: PathBuf,
            /// Overwrite.
            #[arg(long)]
            force: bool,
        },
        /// Drop one.
        Remove,
    }

    fn names(v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn extras() -> Extras {
        Extras {
            sections: vec![Section::new(
                "FILES",
                vec![Entry::new("/etc/demo.toml", "The configuration.")],
            )],
            command_sections: vec![(
                "license add".into(),
                Section::new(
                    "EXAMPLES",
                    vec![Entry::new("demo-tool license add a.lic", "Adds a.lic.")],
                ),
            )],
            common_sections: vec![Section::new(
                "EXIT STATUS",
                vec![Entry::new("0", "Success."), Entry::new("1", "Failure.")],
            )],
            see_also: vec!["demo.toml(5)".into()],
            pages: vec![ExtraPage {
                file_name: "demo.toml.5".into(),
                roff: page(
                    "demo.toml",
                    "5",
                    "configuration of demo-tool",
                    "hostbind 1.2.3",
                    &[Section::new(
                        "KEYS",
                        vec![Entry::new("state_dir", "Where.")],
                    )],
                    &["demo-tool(1)".into()],
                ),
            }],
        }
    }

    #[test]
    fn writes_a_page_per_visible_command_extra_pages_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(
            <Cli as clap::CommandFactory>::command(),
            &extras(),
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            names(&g.man_pages),
            [
                "demo-tool.1",
                "demo-tool-run.1",
                "demo-tool-license.1",
                "demo-tool-license-add.1",
                "demo-tool-license-remove.1",
                "demo.toml.5"
            ]
        );
        assert_eq!(
            names(&g.completions),
            ["demo-tool.bash", "_demo-tool", "demo-tool.fish"]
        );
        let top = std::fs::read_to_string(dir.path().join("man/demo-tool.1")).unwrap();
        assert!(top.starts_with(".ie"), "not roff: {top}");
        assert_eq!(top.matches(".ds Aq").count(), 2, "one preamble: {top}");
        assert!(top.contains(".TH demo-tool 1"), "{top}");
        assert!(top.contains("hostbind 1.2.3"), "{top}");
        assert!(top.contains("demo\\-tool\\-license(1)"), "{top}");
        assert!(!top.contains("secret"), "hidden command documented: {top}");
        // Hand-written sections in order, before VERSION.
        let at = |s: &str| top.find(s).unwrap_or_else(|| panic!("no {s}: {top}"));
        assert!(
            at(".SH FILES") < at(".SH \"EXIT STATUS\"")
                && at(".SH \"EXIT STATUS\"") < at(".SH \"SEE ALSO\"")
        );
        assert!(at(".SH \"SEE ALSO\"") < at(".SH VERSION"), "{top}");
        assert!(top.contains("demo.toml(5)"), "{top}");
        // NAME says what about says; no DESCRIPTION repeats it.
        assert!(!top.contains(".SH DESCRIPTION"), "{top}");

        let add = std::fs::read_to_string(dir.path().join("man/demo-tool-license-add.1")).unwrap();
        assert!(add.contains("Add a license file"), "{add}");
        assert!(
            add.contains(".SH DESCRIPTION") && add.contains("The file is checked first"),
            "{add}"
        );
        assert!(
            add.contains(".SH EXAMPLES") && add.contains("Adds a.lic."),
            "{add}"
        );
        assert!(add.contains(".SH \"EXIT STATUS\""), "{add}");
        assert!(
            add.contains("demo\\-tool(1)"),
            "no SEE ALSO to the main page: {add}"
        );
        assert!(!add.contains(".SH FILES"), "{add}");
        let remove =
            std::fs::read_to_string(dir.path().join("man/demo-tool-license-remove.1")).unwrap();
        assert!(!remove.contains(".SH EXAMPLES"), "{remove}");

        let five = std::fs::read_to_string(dir.path().join("man/demo.toml.5")).unwrap();
        assert!(five.contains(".TH demo.toml 5"), "{five}");
        assert!(
            five.contains(".SH KEYS") && five.contains("state_dir"),
            "{five}"
        );

        let bash = std::fs::read_to_string(&g.completions[0]).unwrap();
        assert!(bash.contains("complete -F"), "{bash}");
        let fish = std::fs::read_to_string(&g.completions[2]).unwrap();
        assert!(fish.contains("complete -c demo-tool"), "{fish}");
    }

    #[test]
    fn bash_completes_past_the_first_word_of_a_hyphenated_binary() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(
            <Cli as clap::CommandFactory>::command(),
            &Extras::default(),
            dir.path(),
        )
        .unwrap();
        let script = &g.completions[0];
        let first = bash_complete(script, &["demo-tool", "li"]).unwrap();
        assert_eq!(first, ["license"]);
        let mut sub = bash_complete(script, &["demo-tool", "license", ""]).unwrap();
        sub.retain(|w| !w.starts_with('-'));
        sub.sort();
        assert_eq!(sub, ["add", "help", "remove"], "{sub:?}");
        let opts = bash_complete(script, &["demo-tool", "license", "add", "--f"]).unwrap();
        assert_eq!(opts, ["--force"]);
        // Also when the command is typed with its path.
        let sub = bash_complete(script, &["/usr/bin/demo-tool", "license", "re"]).unwrap();
        assert_eq!(sub, ["remove"]);
    }

    #[test]
    fn unwritable_output_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = generate(
            <Cli as clap::CommandFactory>::command(),
            &Extras::default(),
            &file,
        )
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
