//! `hostbind-proxy run`: wires the TPM thread, ledger, service, listeners and periodic tasks
//! together and runs until SIGTERM/SIGINT.

use crate::config::Config;
use crate::ledger::{Ledger, OpenOptions};
use crate::ports::{Admission, ConfiguredVms, Metering, NoMetering, NoPools, Pools};
use crate::server::{accept_unix, bind_unix, hybrid_path};
use crate::service::{Service, ServiceParts, Vm};
use crate::tpm_service::TpmService;
use crate::{admin, enroll};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// File name of the ledger in the state dir.
pub const LEDGER_FILE: &str = "ledger.redb";

/// Creates the directory of the socket `p` (set by config key `key`) if it is missing, or
/// says why it cannot and what to do.
fn ensure_parent(p: &Path, key: &str) -> Result<()> {
    let Some(d) = p.parent() else { return Ok(()) };
    match std::fs::create_dir_all(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let systemd = if d.starts_with("/run/hostbind") {
                "; under systemd the unit creates /run/hostbind (RuntimeDirectory=hostbind); when you run the proxy by hand, "
            } else {
                "; "
            };
            anyhow::bail!(
                "cannot create directory {} for {key} = \"{}\": {e}; this process runs as {}{systemd}create it for this user first (install -d -o {} -m 0755 {}) or set {key} to a path in a directory this user may write",
                d.display(),
                p.display(),
                hostbind_fsutil::whoami(),
                hostbind_fsutil::user_name(),
                d.display()
            )
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot create directory {} for {key} = \"{}\": {e}{}",
            d.display(),
            p.display(),
            hostbind_fsutil::io_hint(&e, hostbind_fsutil::Access::Write)
        )),
    }
}

/// Runs the daemon until a termination signal.
pub async fn run(cfg: Config, ledger_opts: OpenOptions) -> Result<()> {
    // Caught from the start: a stop while the daemon starts (e.g. right after its sockets
    // appear) is an orderly shutdown that seals the usage log, not the default death.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let identity = enroll::load_identity(&cfg.state_dir)?;
    // Held until the daemon ends: no enroll command or second daemon meanwhile (lock.rs).
    let lock = crate::lock::acquire(&cfg.state_dir, crate::lock::Role::Daemon)?;
    let path = cfg.state_dir.join(LEDGER_FILE);
    let ledger =
        tokio::task::spawn_blocking(move || Ledger::open_with(&path, ledger_opts)).await??;
    let (tpm, _) = TpmService::start(&cfg.tpm, cfg.state_dir.clone())?;
    // The ports: admission (libvirt or the configured VMs), metering (the usage log or
    // nothing), clone detection.
    let libvirt_vms = cfg.libvirt.enabled.then(|| {
        tracing::info!(uri = %cfg.libvirt.uri, unassigned = ?cfg.libvirt.unassigned, "taking VM identity from libvirt");
        crate::libvirt::LibvirtVms::new(&cfg)
    });
    let admission: Arc<dyn Admission> = match &libvirt_vms {
        Some(v) => v.clone(),
        None => Arc::new(ConfiguredVms),
    };
    let usage = if cfg.usage.enabled {
        Some(
            crate::usage::UsageLog::open(
                &cfg.usage,
                &cfg.state_dir,
                identity.cert.host_id_hex(),
                tpm.clone(),
            )
            .await?,
        )
    } else {
        tracing::info!("usage log off ([usage] enabled = false)");
        None
    };
    let metering: Arc<dyn Metering> = match &usage {
        Some(u) => u.clone(),
        None => Arc::new(NoMetering),
    };
    // Seat pools: etcd when [pool] is set (the ledger's live pool seats adopted and
    // reconciled), else pool licenses are refused here with the fix named.
    let etcd_seats = match &cfg.pool {
        Some(p) => Some(
            crate::pool::EtcdSeats::start(p, &identity, &ledger, cfg.leases.ttl.0)
                .await
                .map_err(|e| anyhow::anyhow!("[pool]: {e}"))?,
        ),
        None => None,
    };
    let pools: Arc<dyn Pools> = match &etcd_seats {
        Some(p) => p.clone(),
        None => Arc::new(NoPools),
    };
    let svc = Service::new(ServiceParts {
        cfg: cfg.clone(),
        identity,
        ledger,
        tpm,
        admission,
        metering,
        clones: Arc::new(crate::clones::ChainGraph::new(cfg.clones.clone())),
        pools,
    })
    .await?;
    let libvirt = libvirt_vms.map(|v| crate::libvirt::start(&svc, v));
    let mut sockets: Vec<PathBuf> = Vec::new();
    let mut tasks = Vec::new();
    // Tasks that end by themselves at `stop` and are awaited, never aborted: the usage flush
    // loop and the lease sweep (their blocking work cannot be cancelled midway).
    let stop = CancellationToken::new();
    let mut stopping = Vec::new();
    if let Some(u) = &usage {
        stopping.push(tokio::spawn(
            u.clone().run(cfg.usage.flush_interval.0, stop.clone()),
        ));
    }
    if let Some(p) = &etcd_seats {
        stopping.push(tokio::spawn(p.clone().run(svc.clone(), stop.clone())));
    }

    ensure_parent(&cfg.admin_socket, "admin_socket")?;
    let l = admin::bind(&cfg.admin_socket)?;
    sockets.push(cfg.admin_socket.clone());
    tasks.push(tokio::spawn(admin::serve(svc.clone(), l)));

    if let Some(listen) = &cfg.metrics.listen {
        if let crate::metrics::MetricsListen::Unix(p) = listen {
            ensure_parent(p, "[metrics] listen")?;
        }
        let m = crate::metrics::MetricsListener::bind(listen).await?;
        sockets.extend(m.socket_path());
        tasks.push(tokio::spawn(m.serve(svc.clone())));
    }

    for vmc in &cfg.vms {
        let vm = Arc::new(Vm {
            name: vmc.name.clone(),
            uuid: vmc.uuid.0.clone(),
        });
        if let Some(p) = &vmc.unix_socket {
            ensure_parent(p, "[[vm]] unix_socket")?;
            let l = bind_unix(p, 0o660)?;
            tracing::info!(vm = %vm.name, "listening on {}", p.display());
            sockets.push(p.clone());
            tasks.push(tokio::spawn(accept_unix(
                svc.clone(),
                l,
                vm.clone(),
                "unix",
            )));
        }
        if let Some(uds) = &vmc.vhost_uds {
            let p = hybrid_path(uds, cfg.listen.vsock_port);
            ensure_parent(&p, "[[vm]] vhost_uds")?;
            let l = bind_unix(&p, 0o660)?;
            tracing::info!(vm = %vm.name, "listening on hybrid vsock {}", p.display());
            sockets.push(p);
            tasks.push(tokio::spawn(accept_unix(
                svc.clone(),
                l,
                vm.clone(),
                "hybrid vsock",
            )));
        }
    }
    if cfg.listen.af_vsock {
        let (svc2, port) = (svc.clone(), cfg.listen.vsock_port);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::vsock::serve(svc2, port).await {
                tracing::error!("AF_VSOCK listener on port {port} failed: {e}");
            }
        }));
    }

    tasks.push(tokio::spawn(svc.clone().run_key_rotation()));
    let svc2 = svc.clone();
    let sweep = cfg.leases.sweep_interval.0;
    let stop2 = stop.clone();
    stopping.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop2.cancelled() => return,
                _ = tokio::time::sleep(sweep) => {}
            }
            let s = svc2.clone();
            match tokio::task::spawn_blocking(move || s.sweep()).await {
                Ok(Err(e)) => tracing::error!("lease sweep failed: {e}"),
                Err(e) => tracing::error!("lease sweep task failed: {e}"),
                Ok(Ok(_)) => {}
            }
        }
    }));

    tracing::info!(host_id = %svc.identity().cert.host_id_hex(), vms = cfg.vms.len(), "hostbind-proxy ready");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    stop.cancel();
    shut_down(&svc, tasks, stopping, usage, libvirt, &cfg).await;
    // Queued renewals on disk before the state-dir lock goes (the ledger itself is dropped
    // later, with the last reference to the service).
    let s = svc.clone();
    match tokio::task::spawn_blocking(move || s.ledger().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("the last renewals could not be written to the ledger: {e}; their leases keep their earlier expiry"),
        Err(e) => tracing::warn!("writing the last renewals failed: {e}"),
    }
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    drop(lock);
    Ok(())
}

/// The orderly end: stop accepting (listeners, admin socket, periodic tasks), answer the
/// requests in progress within `[shutdown] drain_timeout`, stop issuing tokens, and seal the
/// usage log last, so every token a guest received is in it. `stopping` (the usage flush loop
/// and the lease sweep, already told to stop) finish what they are doing and are awaited
/// before the last seal.
async fn shut_down(
    svc: &Arc<Service>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stopping: Vec<tokio::task::JoinHandle<()>>,
    usage: Option<Arc<crate::usage::UsageLog>>,
    libvirt: Option<impl Send + 'static>,
    cfg: &Config,
) {
    let started = std::time::Instant::now();
    for t in tasks {
        t.abort();
    }
    // the watcher's drop waits for its thread (up to call_timeout + 1 s)
    let _ = tokio::task::spawn_blocking(move || drop(libvirt)).await;
    let left = svc.drain(cfg.shutdown.drain_timeout.0).await;
    if left > 0 {
        tracing::warn!(
            "{left} agent connections still had a request in progress after {:?} ([shutdown] drain_timeout); closing them",
            cfg.shutdown.drain_timeout.0
        );
    }
    for t in stopping {
        let _ = t.await;
    }
    let svc2 = svc.clone();
    let _ = tokio::task::spawn_blocking(move || svc2.close_issue()).await;
    // the refusal counts of the last interval go into the history and the usage log before it
    // is sealed (refusals.rs)
    let svc2 = svc.clone();
    let _ = tokio::task::spawn_blocking(move || svc2.flush_refusals()).await;
    let issued = svc
        .counters
        .tokens_issued
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some(u) = usage {
        // seals what is buffered; what cannot be sealed is kept on disk for the next start
        if let Err(e) = u.close().await {
            tracing::error!("usage log: could not seal or keep the last records (the next start names the gap): {e}");
        }
    }
    tracing::info!(
        tokens_issued = issued,
        "stopped accepting, drained and sealed the usage log in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
}
