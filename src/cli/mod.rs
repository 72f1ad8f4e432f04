//! Commands of the `credlock` binary that are more than wiring (`main.rs` parses the command
//! line and calls them).

pub mod credentials;
