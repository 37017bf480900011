//! The process's open-file limit: raised to its hard limit at start-up, and what the listeners'
//! connection caps must fit under.
//!
//! Every connection holds a file descriptor; so do the database pool, RPC and PCCS sockets, log
//! files and the data-directory lock. A connection cap above what the limit leaves for
//! connections makes `accept` fail with "too many open files" once the cap is near, and then
//! nothing, health checks included, gets through.

/// Descriptors kept for everything that is not a listener's connection (database pool, RPC and
/// PCCS clients, OTLP, files).
pub const RESERVED_FDS: u64 = 128;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns `(soft, hard)` after it
/// (`u64::MAX` for unlimited). A refusal to raise leaves the soft limit as it was, which the
/// caller reports.
pub fn raise_nofile() -> (u64, u64, Option<std::io::Error>) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let (soft, hard) = (current.unwrap_or(u64::MAX), maximum.unwrap_or(u64::MAX));
    if soft >= hard {
        return (soft, hard, None);
    }
    let raised = Rlimit {
        current: maximum,
        maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => (hard, hard, None),
        Err(e) => (soft, hard, Some(e.into())),
    }
}

/// The connection cap that fits: `wanted`, or what `soft` leaves for connections after
/// [`RESERVED_FDS`] and `others` (the other listeners' caps), at least 1.
pub fn fitting_cap(wanted: usize, soft: u64, others: usize) -> usize {
    let room = soft
        .saturating_sub(RESERVED_FDS)
        .saturating_sub(others as u64)
        .max(1);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_under_the_open_file_limit() {
        assert_eq!(fitting_cap(1024, 1_048_576, 128), 1024);
        assert_eq!(fitting_cap(1024, 1024, 128), 1024 - 128 - 128);
        assert_eq!(fitting_cap(1024, 100, 128), 1);
        assert_eq!(fitting_cap(1024, u64::MAX, 128), 1024);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let (soft, hard, err) = raise_nofile();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(soft, hard);
    }
}
