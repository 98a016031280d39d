//! The coordinator restarts: state comes back from its snapshot and the
//! events stream.
