//! The KKP delivery pipeline: `kkpipe init` templates and the offline `kkpipe demo`.

pub(crate) mod demo;
pub(crate) mod template;
pub(crate) mod versions;
