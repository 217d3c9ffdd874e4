//! Wire and domain types shared by every agentcube component. serde only, no I/O.
//!
//! Main flow: the Router, the Workload Manager and PicoD exchange the bodies defined here; the store
//! persists [`session`] records. Keeping them in one crate means a field rename shows up everywhere.
//!
//! Modules:
//! - [`duration`]: Go `time.Duration` syntax (`15m0s`, `120.0s`), used in records, CRDs and PicoD.
//! - [`api`]: Workload Manager request/response bodies and [`api::WorkloadKind`].
//! - [`picod`]: PicoD request/response bodies.
//! - [`claims`]: JWT claims the Router signs.
//! - [`session`]: the session record kept in the store (upstream `SandboxInfo`).
//! - [`headers`]: header names.
//! - [`browser`]: requests a web page may have sent (servers on loopback without a token).

pub mod api;
pub mod browser;
pub mod claims;
pub mod duration;
pub mod headers;
pub mod picod;
pub mod session;

pub use duration::{DurationError, GoDuration};
pub use session::{BackingKind, EntryPoint, SessionRecord, SessionStatus};
