//! Operating the daemon: metrics and readiness, the admin socket and its
//! client, the connection log, logging and its rate limits.

pub mod accept;
pub mod admin;
pub mod admin_client;
pub mod connlog;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
