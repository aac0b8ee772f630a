//! apptainer-supervisor: runs a long-lived Apptainer service container under systemd.
//!
//! The data path reads one way: [`config`] (TOML → validated [`config::Service`]) →
//! [`argv`] (the plan: argv and environment, pure) → [`supervise`] (launch, watch, stop) →
//! [`notify`] (what the host's systemd hears). [`apptainer`], [`instance`], [`overlay`],
//! [`lock`] and [`host`] own the OS side of each step.

pub mod apptainer;
pub mod argv;
pub mod check;
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod generator;
pub mod host;
pub mod inner;
pub mod instance;
pub mod keys;
pub mod lock;
pub mod logging;
pub mod network;
pub mod notify;
pub mod overlay;
pub mod supervise;
