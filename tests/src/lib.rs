//! Integration tests live under tests/; this library is intentionally empty.
