//! molecule-platform: placeholder.
