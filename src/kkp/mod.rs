//! The KKP delivery pipeline: `kkpipe init` templates and the offline `kkpipe demo`.

pub mod demo;
pub mod template;
pub mod versions;
