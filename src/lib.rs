//! apptainer-supervisor: runs a long-lived Apptainer service container under systemd.
//!
//! The folders follow the data: [`config`] (TOML → validated [`config::Service`]) →
//! [`host`] (paths resolved, checks against this host, privilege, lock, overlay, CNI) →
//! [`plan`] (the one [`plan::Plan`] that `check` prints and `run` executes) → [`run`] (the
//! service's life: leftovers, start, the event loop, halt) → [`status`] (what an operator
//! sees). [`os`] holds the thin wrappers over the world (the Apptainer CLI, processes and
//! pidfds, the notify socket, the journal, the container's bus); [`exit`] every exit code.
//! Nothing lower reaches back up: `os` knows no `run`, `host` no `plan`.

pub mod cli;
pub mod config;
pub mod exit;
pub mod generator;
pub mod host;
pub mod logging;
pub mod migrate;
pub mod os;
pub mod plan;
pub mod run;
pub mod status;
pub mod update;
