//! Integration tests, one binary: real registries (`docker-registry`) started per test.

mod argocd;
mod auth;
mod controller;
mod controller_idle;
mod controller_lifecycle;
mod controller_prune;
mod copy;
mod crd;
mod faults;
mod first_contact;
mod hostile;
mod http_versions;
mod kube_api;
mod layout;
mod layout_crash;
mod memory;
mod platforms;
mod prune;
mod prune_referrers;
mod redirects;
mod referrers;
mod resume;
mod scale_bench;
mod sharding;
mod support;
mod validation;
