//! Operating the host: the admin listener, hot swap of component files.

pub mod admin;
pub mod watch;
