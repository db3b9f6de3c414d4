//! Integration tests, one binary: real registries (`docker-registry`) started per test.

mod copy;
mod crd;
mod faults;
mod memory;
mod resume;
mod support;
