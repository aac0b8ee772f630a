//! apptainer-supervisor: runs a long-lived Apptainer service container under systemd.
//!
//! The data path reads one way: [`config`] (TOML → validated [`config::Service`]) →
//! [`argv`] (the plan: argv and environment, pure) → [`supervise`] (launch, watch, stop) →
//! [`notify`] (what the host's systemd hears). [`apptainer`], [`instance`], [`overlay`],
//! [`lock`] and [`host`] own the OS side of each step; [`output`] forwards the instance's
//! own output to the journal ([`journal`]).

pub mod apptainer;
pub mod argv;
pub mod check;
pub mod cli;
pub mod cni;
pub mod config;
pub mod fsutil;
pub mod generator;
pub mod host;
pub mod inner;
pub mod instance;
pub mod journal;
pub mod keys;
pub mod lock;
pub mod logging;
pub mod migrate;
pub mod network;
pub mod notify;
pub mod output;
pub mod overlay;
pub mod privilege;
pub mod state;
pub mod status;
pub mod supervise;
pub mod unit_names;
