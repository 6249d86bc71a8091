//! liveness-gateway: a Pingora gateway in front of the kyc.biometric.kz Liveness Short API.
//! It hides the organization key, limits and budgets tenants, validates uploads before they can
//! cost a paid call, answers repeated images from a cache, and exports Prometheus metrics.

pub mod admin;
pub mod auth;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod convert;
pub mod cors;
pub mod edge;
pub mod egress;
pub mod error;
pub mod face;
pub mod image;
pub mod intake;
pub mod issued;
pub mod keys;
pub mod limits;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod multipart;
pub mod notify;
pub mod pool;
pub mod proxy;
pub mod receipt;
pub mod replay;
pub mod server;
pub mod state;
pub mod store;
pub mod throttle;
pub mod trace;
pub mod upstream;
pub mod usage;
pub mod verdict;
