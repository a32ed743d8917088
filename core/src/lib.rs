//! credd-core: placeholder.
