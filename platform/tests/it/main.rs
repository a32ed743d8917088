//! Integration tests for molecule-platform: the library's service in-process
//! against a stand-in of GitHub's API, and the real binary.
//!
//! One test binary (modules below) keeps link time down on shared CI cores.

mod binary;
mod github;
mod github_grants;
mod github_spec;
mod grants;
mod metrics;
mod replicas;
mod service;
mod slow_clients;
mod support;
