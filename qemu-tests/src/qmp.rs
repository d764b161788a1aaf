//! A small synchronous QMP client on a Unix socket, built on the `qapi` crate (typed commands
//! and events generated from QEMU's schema), with timeouts and event waiting.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qapi::qmp::Event;

use crate::{QemuTestError, Result};

/// How long one QMP answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

/// A QMP connection to one QEMU.
pub struct Qmp {
    vm: String,
    inner: qapi::Qmp<Stream>,
    events: Vec<Event>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("vm", &self.vm).finish()
    }
}

impl Qmp {
    /// Connects to the QMP socket `path` of VM `vm` (retrying until `timeout`) and negotiates
    /// capabilities.
    pub fn connect(vm: &str, path: &Path, timeout: Duration) -> Result<Qmp> {
        let end = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => {
                    return Err(QemuTestError::Qmp {
                        vm: vm.into(),
                        command: "connect".into(),
                        message: format!("cannot connect to {}: {e}", path.display()),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let err = |e: std::io::Error| QemuTestError::Qmp {
            vm: vm.into(),
            command: "connect".into(),
            message: e.to_string(),
        };
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(err)?;
        let reader = stream.try_clone().map_err(err)?;
        let mut inner = qapi::Qmp::new(qapi::Stream::new(BufReader::new(reader), stream));
        inner.handshake().map_err(|e| QemuTestError::Qmp {
            vm: vm.into(),
            command: "qmp_capabilities".into(),
            message: e.to_string(),
        })?;
        Ok(Qmp {
            vm: vm.into(),
            inner,
            events: Vec::new(),
        })
    }

    /// Runs one command and returns its answer; events that arrive meanwhile are kept.
    pub fn execute<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok> {
        let r = self.inner.execute(cmd).map_err(|e| QemuTestError::Qmp {
            vm: self.vm.clone(),
            command: C::NAME.into(),
            message: e.to_string(),
        });
        self.events.extend(self.inner.events());
        r
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.extend(self.inner.events());
        std::mem::take(&mut self.events)
    }

    /// Waits (polling with a cheap command) for an event `pred` accepts; returns it. Other
    /// events are kept for [`Qmp::take_events`].
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        let end = Instant::now() + timeout;
        loop {
            self.events.extend(self.inner.events());
            if let Some(i) = self.events.iter().position(&pred) {
                return Ok(self.events.remove(i));
            }
            if Instant::now() >= end {
                return Err(QemuTestError::Timeout {
                    what: format!("QMP event {what} from {}", self.vm),
                    secs: timeout.as_secs(),
                    context: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
            self.inner.nop().map_err(|e| QemuTestError::Qmp {
                vm: self.vm.clone(),
                command: "query-version (polling for events)".into(),
                message: e.to_string(),
            })?;
        }
    }
}
