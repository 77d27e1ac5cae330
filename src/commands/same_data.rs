//! `kkpipe same-data A B [--at PATH]`: the data comparison probes use (crate::data).

use crate::cli::SameDataArgs;
use crate::data::{self, Difference};
use crate::error::{Error, exit};
use std::io::Read;
use std::path::Path;

pub(super) fn same_data(args: &SameDataArgs) -> Result<u8, Error> {
    if args.first.as_os_str() == "-" && args.second.as_os_str() == "-" {
        return Err(Error::Usage("only one of the two documents can be standard input (`-`)".into()));
    }
    let first = load(&args.first, args.at.as_deref())?;
    let second = load(&args.second, args.at.as_deref())?;
    let difference = match (&first, &second) {
        (Some(a), Some(b)) => data::compare(a, b),
        (None, None) => None,
        (a, _) => {
            let at = args.at.iter().flat_map(|p| p.split('.')).map(|k| data::Step::Key(k.to_string())).collect();
            let kind = if a.is_some() { data::Kind::OnlyInFirst } else { data::Kind::OnlyInSecond };
            Some(Difference { at, kind })
        }
    };
    Ok(match difference {
        None => exit::OK,
        Some(d) => {
            eprintln!("kkpipe: `{}` and `{}` differ {d}", args.first.display(), args.second.display());
            exit::FAILED
        }
    })
}

/// The document at `path`, or the value at `at` in it (None when the path is absent).
fn load(path: &Path, at: Option<&str>) -> Result<Option<yaml_rust2::Yaml>, Error> {
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| Error::io("read", path, e))?;
    let doc = data::parse(&text)
        .map_err(|why| Error::Usage(format!("`{}` is not one YAML or JSON document: {why}", path.display())))?;
    Ok(match at {
        Some(p) => data::at(&doc, p).cloned(),
        None => Some(doc),
    })
}
