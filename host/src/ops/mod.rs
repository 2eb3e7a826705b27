//! Operating the host: the admin listener and its console, hot swap of component files.

pub mod admin;
pub mod console;
pub mod dead_letters;
pub mod watch;
