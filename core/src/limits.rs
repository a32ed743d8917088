//! Process limits the long-running binaries set the same way.
//!
//! The daemon holds one descriptor per waiting client and the platform one
//! per connection; both raise their open-file limit to what the hard limit
//! allows, since the common soft limit of 1024 is below their connection
//! caps. Defined once so the two cannot drift.

/// Raises `RLIMIT_NOFILE`'s soft limit to the hard limit. `Ok(None)` when it
/// already was; `Ok(Some((old, new)))` when raised.
pub fn raise_open_file_limit() -> nix::Result<Option<(u64, u64)>> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Some((soft, hard)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        raise_open_file_limit().expect("raise");
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .expect("read");
        assert_eq!(soft, hard);
        assert_eq!(raise_open_file_limit().expect("again"), None);
    }
}
