//! `run`: the daemon.

use super::runtime;
use anyhow::Result;
use hostbind_proxy::config::Config;

/// Runs the daemon until SIGTERM or SIGINT.
pub(crate) fn daemon(cfg: Config, reset_ledger: bool) -> Result<()> {
    init_logging(cfg.log_level.as_str());
    let opts = hostbind_proxy::ledger::OpenOptions {
        reset: reset_ledger,
    };
    runtime()?.block_on(hostbind_proxy::daemon::run(cfg, opts))?;
    Ok(())
}

/// Text on a terminal, JSON lines for journald, files and pipes (`HOSTBIND_LOG_FORMAT` overrides).
fn init_logging(level: &str) {
    hostbind_cli::logging::init(level);
}
