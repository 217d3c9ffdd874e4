//! PicoD: the small HTTP daemon inside every sandbox. It executes commands and moves files for the
//! Router, and accepts only requests carrying an RS256 JWT signed by the Router.
//!
//! Main flow:
//! 0. Started as PID 1 of its namespace (a container's entrypoint), `main` becomes its init
//!    ([`init`]: reaps orphans, forwards signals) and serves from a child.
//! 1. `main` parses flags/env into a [`Config`] and binds a listener ([`ListenAddr::bind`]: TCP
//!    or a Unix socket, marked listening once bound: [`listen`]).
//! 2. [`AppState::new`] canonicalises the workspace and loads the public key ([`auth::Verifier`];
//!    `main` has installed [`ring_rsa`] as jsonwebtoken's RSA verifier).
//! 3. [`run`] serves [`app`]: `GET /health`, and behind [`auth::require_token`] `POST /api/execute`
//!    ([`exec`]), `POST|GET /api/files`, `GET /api/files/{*path}` ([`files`]).
//!    Background processes: [`process`] (`/api/processes`: start, list, output with resume,
//!    stdin, signals; [`sweep`]: every process but PicoD ended). Stateful Python and bash
//!    contexts: [`context`] (`/api/contexts`).
//! 4. Every user path goes through [`jail::Workspace::walk`]; errors map to HTTP in [`error`].
//! 5. Optionally ([`forward`]) Unix sockets forward to TCP ports inside the sandbox, for local
//!    AgentRuntime sandboxes whose agent `main` starts as a child process.
//! 6. With `--metrics`, `GET /metrics` ([`metrics`]) is served without authentication.
//! 7. [`run`] serves through `agentcube-serve`, the seam every component shares (timeouts,
//!    connection cap, `TCP_NODELAY`); on shutdown, in-flight requests get 10 s to finish.
//!
//! Depends on `agentcube-types` only: it runs in every sandbox, so it stays small.

pub mod auth;
pub mod config;
pub mod context;
pub mod diagnose;
pub mod error;
pub mod exec;
pub mod files;
pub mod forward;
pub mod init;
pub mod jail;
pub mod listen;
pub mod metrics;
pub mod process;
pub mod ring_rsa;
pub mod server;
pub mod sweep;

pub use config::{Auth, Config, ListenAddr};
pub use error::ApiError;
pub use server::{AppState, COMPRESS_FROM_BYTES, app, run};
