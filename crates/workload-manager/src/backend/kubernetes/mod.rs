//! The Kubernetes backend (work in progress): sandboxes as kubernetes-sigs/agent-sandbox objects.
//!
//! Built so far: [`desired`], the pure builders of the objects spec §2.4 describes. Not built yet:
//! creating them, the shared readiness watch, pod resolution, port probing and rollback, and the
//! CodeInterpreter controller; `--backend kubernetes` is refused until they exist.

pub mod desired;
