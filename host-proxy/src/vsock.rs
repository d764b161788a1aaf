//! The AF_VSOCK listener for production KVM hosts (vhost-vsock): the peer's CID identifies the VM.
//! Enabled only by `listen.af_vsock = true`; tests never enable it (build machines are VMs whose
//! vsock belongs to the infrastructure), and it is exercised inside QEMU guests' hosts only.

use crate::config::Config;
use crate::server::{refuse, serve_limited};
use crate::service::{Service, Vm};
use hostbind_attest::wire::{ErrorBody, ErrorCode};
use std::sync::Arc;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// The VM a connection from guest `cid` belongs to, or the refusal to send.
pub fn vm_for_cid(cfg: &Config, cid: u32) -> Result<Vm, ErrorBody> {
    cfg.vm_by_cid(cid)
        .map(|v| Vm {
            name: v.name.clone(),
            uuid: v.uuid.0.clone(),
        })
        .ok_or_else(|| ErrorBody {
            code: ErrorCode::UnknownVm,
            message: format!(
                "vsock CID {cid} belongs to no VM known to this host proxy; the host admin must add it to the proxy configuration"
            ),
        })
}

/// The VM of a connection from guest `cid`: from the admission port when it knows VMs by CID
/// (libvirt's running domains), else from the static `[[vm]]` map.
pub fn resolve_cid(svc: &Service, cid: u32) -> Result<Vm, ErrorBody> {
    svc.admission()
        .vm_for_cid(cid)
        .unwrap_or_else(|| vm_for_cid(svc.config(), cid))
}

/// Serves one accepted connection from guest `cid` within the connection limits (the same
/// [`serve_limited`] as the Unix listeners), or refuses it when the CID is unknown.
pub async fn serve_peer<S>(svc: Arc<Service>, stream: S, cid: u32)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    match resolve_cid(&svc, cid) {
        Ok(vm) => serve_limited(svc, stream, Arc::new(vm)).await,
        Err(e) => {
            tracing::warn!(cid, "refused vsock connection: {}", e.message);
            refuse(stream, e.code, e.message).await;
        }
    }
}

/// Binds AF_VSOCK on `port` for any CID and serves agents until the task is dropped.
pub async fn serve(svc: Arc<Service>, port: u32) -> std::io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    tracing::info!(port, "listening on AF_VSOCK");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                crate::ratelog::accept_failed(
                    &crate::server::GUEST_ACCEPT_LOG,
                    "AF_VSOCK listener",
                    &e,
                )
                .await;
                continue;
            }
        };
        svc.spawn_connection(serve_peer(svc.clone(), stream, peer.cid()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_maps_to_configured_vm_or_is_refused() {
        let cfg = Config::parse(
            r#"
[listen]
af_vsock = true
[[vm]]
name = "db"
uuid = "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01"
cid = 7
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(vm_for_cid(&cfg, 7).unwrap().name, "db");
        let e = vm_for_cid(&cfg, 8).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownVm);
        assert!(e.message.contains("CID 8"));
    }
}
