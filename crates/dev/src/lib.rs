//! What runs beside the liveness gateway but is never shipped with it: an emulator of the
//! provider's Liveness Short endpoint (for the tests, the load harness and compose) and the
//! offline demo (the gateway, the emulator and a browser client on one machine).

pub mod demo;
pub mod emulator;
