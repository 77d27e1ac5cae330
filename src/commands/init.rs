//! `kkpipe init` (the KKP pipeline and its CI file) and `kkpipe ci` (the CI file of any pipeline).

use crate::ci::files;
use crate::cli::{CiArgs, InitArgs};
use crate::error::{Error, exit};
use crate::kkp::template::{self, Cloud, Variant};
use crate::pipeline::FILE_NAME;
use crate::settings::Settings;
use std::path::Path;

/// The cloud and terraform module directory of the repository in `dir`: the one asked for, or the only one
/// there is. A module directory that does not exist is an error: the pipeline would plan nothing.
fn layout(dir: &Path, asked: Option<Cloud>) -> Result<(Cloud, &'static str), Error> {
    let present = |c: Cloud| c.module_dirs().iter().copied().find(|d| dir.join(d).is_dir());
    let looked = |clouds: &[Cloud]| {
        clouds.iter().flat_map(|c| c.module_dirs()).map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ")
    };
    if let Some(c) = asked {
        return present(c).map(|d| (c, d)).ok_or_else(|| {
            Error::Usage(format!(
                "no terraform module for `--cloud {}`: looked for {}\n  hint: run `kkpipe init` in a KKP repository \
                 (the layout the KKP wizard generates: docs/kkp-pipeline.md)",
                c.name(),
                looked(&[c])
            ))
        });
    }
    let found: Vec<(Cloud, &'static str)> =
        template::ALL_CLOUDS.iter().filter_map(|&c| present(c).map(|d| (c, d))).collect();
    match found[..] {
        [one] => Ok(one),
        [] => Err(Error::Usage(format!(
            "no terraform module here: none of {} exists in `{}`\n  hint: run `kkpipe init` at the top of a KKP \
             repository (the layout the KKP wizard generates: docs/kkp-pipeline.md), or point at it with `-C DIR`",
            looked(template::ALL_CLOUDS),
            dir.display()
        ))),
        _ => Err(Error::Usage(format!(
            "cannot tell the cloud: the repository has {}\n  hint: pass `--cloud`",
            found.iter().map(|(_, d)| format!("`{d}`")).collect::<Vec<_>>().join(" and ")
        ))),
    }
}

/// Whether the pipeline updates DNS: `--dns` needs the module in `TF/dns`; without either flag, a module there
/// turns it on (when the variant `with_dns` supports DNS at all).
fn dns_module(dir: &Path, tf: &str, with_dns: Variant, args: &InitArgs) -> Result<bool, Error> {
    let present = dir.join(tf).join("dns").is_dir();
    match (args.dns, args.no_dns, present) {
        (true, _, false) => Err(Error::Usage(format!(
            "`--dns`: there is no DNS module in `{tf}/dns` for the dns-update stage to apply\n  hint: add the \
             terraform module there, or leave out `--dns` (the wizard's repositories have none: their DNS records are \
             updated by hand)"
        ))),
        (true, _, true) => Ok(true),
        (false, false, true) if with_dns.check().is_ok() => {
            eprintln!("kkpipe: `{tf}/dns` is there: `--dns` (pass `--no-dns` to leave the DNS update out)");
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// What an existing file at `path` is, for the message that replaces it (the wizard's workflow says its name).
fn describe(path: &Path) -> String {
    let name = std::fs::read_to_string(path).ok().and_then(|t| {
        t.lines().find_map(|l| l.strip_prefix("name:").map(|n| n.trim().trim_matches(['"', '\'']).to_string()))
    });
    match name {
        Some(n) => format!("`{}` (the workflow \"{n}\")", path.display()),
        None => format!("`{}`", path.display()),
    }
}

pub(super) fn init(settings: &Settings, args: &InitArgs) -> Result<u8, Error> {
    let dir = &settings.start_dir;
    let (cloud, tf) = match args.cloud {
        // An unsupported combination is refused before the layout is looked at.
        Some(c) => {
            Variant::new(args.ci, c, args.dns).check().map_err(|e| Error::Usage(e.to_string()))?;
            layout(dir, Some(c))?
        }
        None => layout(dir, None)?,
    };
    if args.cloud.is_none() {
        eprintln!("kkpipe: `{tf}` is there: `--cloud {}`", cloud.name());
    }
    let dns = dns_module(dir, tf, Variant::new(args.ci, cloud, true), args)?;
    let v = Variant { tf, ..Variant::new(args.ci, cloud, dns) }.check().map_err(|e| Error::Usage(e.to_string()))?;
    let file = dir.join(FILE_NAME);
    let ci_file = dir.join(files::file_name(v.ci));
    for f in [&file, &ci_file] {
        if f.exists() && !args.force {
            return Err(Error::Usage(format!("{} already exists; pass `--force` to replace it", describe(f))));
        }
    }
    let replaced: Vec<String> = [&file, &ci_file].into_iter().filter(|f| f.exists()).map(|f| describe(f)).collect();
    // Read before anything is replaced: the wizard's workflow names the installer version.
    let mut text = template::render(v, &crate::kkp::versions::pins(dir));
    let remote = remote_url(dir, v, args);
    let new_key = remote.as_ref().and_then(|(url, _)| remote_table(&mut text, url, args));
    // The CI file is generated from the pipeline just written, so the two always agree.
    let pipeline = parsed(dir, &file, &text, v)?;
    let ci_text = files::render(&pipeline, v.ci, &args.install);
    write(&file, &text)?;
    write(&ci_file, &ci_text)?;
    let ignored = ignore_outputs(dir, &pipeline)?;
    for r in replaced {
        eprintln!("kkpipe: replaced {r}");
    }
    eprintln!(
        "kkpipe: wrote `{}` with stages {}, and `{}`",
        file.display(),
        v.stage_names().iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
        ci_file.display()
    );
    tell_remote(remote.as_ref(), new_key, args.no_remote);
    if !ignored.is_empty() {
        eprintln!("kkpipe: added to `.gitignore` what the stages make (never committed): {}", ignored.join(", "));
    }
    eprintln!("{}", next_steps(&pipeline, v, args));
    Ok(exit::OK)
}

/// Where the deploy ledger is kept (or why nowhere), and the signing key init made, once.
fn tell_remote(remote: Option<&(String, Option<String>)>, new_key: Option<crate::sign::PrivateKey>, none_asked: bool) {
    match remote {
        Some((url, Some(why))) => eprintln!(
            "kkpipe: the deploy ledger is kept on `{url}` ({why}): a lost CI cache then costs check stages only, \
             never a deploy; `--remote URL` picks another store, `--no-remote` none (docs/remote.md)"
        ),
        Some((_, None)) => {}
        None if !none_asked => eprintln!(
            "kkpipe: no `[remote]`: `backend.tf` names no state bucket and the repository has no `origin` remote, so \
             the deploy ledger lives in the CI cache only (docs/remote.md; `--remote URL` sets one)"
        ),
        None => {}
    }
    if let Some(k) = new_key {
        eprintln!(
            "kkpipe: made a signing key for the remote; pipeline.toml trusts its public half. Store this as the CI \
             secret KKPIPE_SIGNING_KEY of trusted jobs only (it is written nowhere):"
        );
        println!("{}", k.to_text());
    }
}

/// Files the stages make, and kubeone's PKI backup beside its manifest (`kubeone apply` writes
/// `<cluster>.tar.gz` there): never to be committed. Kubeconfigs and plans are credentials.
fn ignore_outputs(dir: &Path, p: &crate::pipeline::Pipeline) -> Result<Vec<String>, Error> {
    let path = dir.join(".gitignore");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let patterns: Vec<&str> = old.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let mut wanted: Vec<String> = p.stages.iter().flat_map(|s| s.outputs.iter().map(|o| o.path.display())).collect();
    wanted.push("kubeone/*.tar.gz".into());
    let mut added: Vec<String> = Vec::new();
    for w in wanted {
        if !ignored_by(&patterns, &w) && !added.contains(&w) {
            added.push(w);
        }
    }
    if added.is_empty() {
        return Ok(added);
    }
    let sep = if old.is_empty() || old.ends_with('\n') { "" } else { "\n" };
    let block = format!(
        "{sep}# Made by the kkpipe pipeline's stages, never committed (kubeconfigs and plans are credentials):\n{}\n",
        added.join("\n")
    );
    std::fs::write(&path, format!("{old}{block}")).map_err(|e| Error::io("write", &path, e))?;
    Ok(added.iter().map(|a| format!("`{a}`")).collect())
}

/// Whether the `.gitignore` `patterns` ignore `path`, as git reads them: the last pattern that covers the path
/// or a directory above it decides, and `!` un-ignores; a pattern with a `/` is relative to the repository's
/// top, one without matches any name.
fn ignored_by(patterns: &[&str], path: &str) -> bool {
    let matches = |pattern: &str, s: &str| {
        globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .is_ok_and(|g| g.compile_matcher().is_match(s))
    };
    let ancestors: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).chain([path]).collect();
    let covers = |p: &str| {
        let p = p.trim_end_matches('/');
        match p.trim_start_matches('/').contains('/') || p.starts_with('/') {
            true => ancestors.iter().any(|a| matches(p.trim_start_matches('/'), a)),
            false => path.split('/').any(|name| matches(p, name)),
        }
    };
    patterns.iter().rev().find_map(|p| match p.strip_prefix('!') {
        Some(negated) => covers(negated).then_some(false),
        None => covers(p).then_some(true),
    }) == Some(true)
}

/// What the team does next: the CI secrets to create, the shared HMAC key, adoption, where CI installs kkpipe.
fn next_steps(p: &crate::pipeline::Pipeline, v: Variant, args: &InitArgs) -> String {
    let secrets: Vec<String> = files::secrets(p, v.ci)
        .into_iter()
        .filter(|s| s != crate::cache::SECRET_KEY_VAR && s != crate::remote::SIGNING_KEY_VAR)
        .map(|s| format!("`{s}`"))
        .collect();
    let mut out = format!(
        "\nNext steps:\n\
         \x20 1. Create these CI secrets (docs/kkp-pipeline.md says what each is): {}.\n\
         \x20 2. Add `KKPIPE_SECRET_KEY` (`openssl rand -hex 32`) as a CI secret too, so runners share the key of\n\
         \x20    secret_env values (docs/secrets.md).\n\
         \x20 3. On a cluster that already runs, record what is in place instead of applying it again:\n\
         \x20    `kkpipe adopt --event push --branch main` (docs/pipeline-toml.md, \"Adoption\").\n\
         \x20 4. Commit `{FILE_NAME}`, `{}` and `.gitignore`; the first push runs only what is not in place.",
        secrets.join(", "),
        files::file_name(v.ci)
    );
    if args.install == crate::ci::install::Install::default() {
        out.push_str(&format!(
            "\n\nwarning: the CI file installs kkpipe from crates.io ({}), which works only once that version is \
             published there\n  hint: pass `--install git:URL#REV` or `--install url:URL` (docs/ci.md)",
            args.install
        ));
    }
    out
}

/// The pipeline `text` as it will load in `dir`. Without the repository layout, `dir` checks fail: then it is
/// parsed in a layout-free copy.
fn parsed(dir: &Path, file: &Path, text: &str, v: Variant) -> Result<crate::pipeline::Pipeline, Error> {
    crate::pipeline::parse(dir, file, text).or_else(|e| match e {
        crate::pipeline::Error::Invalid { .. } => {
            let scratch =
                tempfile::tempdir().map_err(|e| Error::io("create a directory in", &std::env::temp_dir(), e))?;
            for d in [v.tf_dir(), format!("{}/dns", v.tf_dir())] {
                let d = scratch.path().join(d);
                std::fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
            }
            Ok(crate::pipeline::parse(scratch.path(), file, text)?)
        }
        other => Err(Error::from(other)),
    })
}

/// The store `[remote]` names, with why when init chose it: `--remote URL`, or where the team's state already
/// is (issue 23): the terraform state bucket `backend.tf` configures, else (GitLab keeps state in GitLab, and a
/// bucket may not be named) the repository's own `origin`. `None` with `--no-remote`, or when neither is there.
fn remote_url(dir: &Path, v: Variant, args: &InitArgs) -> Option<(String, Option<String>)> {
    if args.no_remote {
        return None;
    }
    if let Some(url) = &args.remote {
        return Some((url.clone(), None));
    }
    let backend = std::fs::read_to_string(dir.join(v.tf).join("backend.tf")).unwrap_or_default();
    let bucket = || state_bucket(&backend);
    let store = match (v.ci, v.cloud) {
        (crate::ci::Provider::Gitlab, _) => None,
        (_, Cloud::Aws) => bucket().filter(|(kind, _)| kind == "s3"),
        (_, Cloud::Gcp) => bucket().filter(|(kind, _)| kind == "gcs"),
        _ => None,
    };
    if let Some((kind, bucket)) = store {
        let why = format!("the terraform state bucket of `{}/backend.tf`, under `kkpipe/`", v.tf);
        // The bucket's region, as terraform's backend has it: the S3 client must ask that region.
        let url = match (kind.as_str(), backend_setting(&backend, "region")) {
            ("s3", Some(r)) => format!("s3://{bucket}/kkpipe?region={r}"),
            ("s3", None) => format!("s3://{bucket}/kkpipe"),
            _ => format!("gs://{bucket}/kkpipe"),
        };
        return Some((url, Some(why)));
    }
    let origin = std::process::Command::new("git").arg("-C").arg(dir).args(["remote", "get-url", "origin"]).output();
    origin
        .is_ok_and(|o| o.status.success())
        .then(|| ("git:origin".to_string(), Some("refs under `refs/kkpipe/` in the repository's `origin`".to_string())))
}

/// The backend kind (`s3`, `gcs`) and bucket of the `terraform { backend "KIND" { bucket = "NAME" } }` block of a
/// `backend.tf`, outside comments.
fn state_bucket(text: &str) -> Option<(String, String)> {
    let code = backend_code(text);
    let at = code.find("backend \"")? + "backend \"".len();
    let kind = code[at..].split('"').next()?.to_string();
    Some((kind, backend_setting(text, "bucket")?))
}

/// `backend.tf` without its comments.
fn backend_code(text: &str) -> String {
    let code: Vec<&str> =
        text.lines().map(|l| l.split('#').next().unwrap_or("").split("//").next().unwrap_or("")).collect();
    code.join("\n")
}

/// A literal string setting (`bucket`, `region`) of the backend block, outside comments; none through a
/// variable or with characters no bucket or region name has.
fn backend_setting(text: &str, key: &str) -> Option<String> {
    let code = backend_code(text);
    let block = &code[code.find("backend \"")?..];
    let (at, _) = block.match_indices(key).find(|(i, _)| {
        let before = block[..*i].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && block[i + key.len()..].trim_start().starts_with('=')
    })?;
    let value = block[at + key.len()..].trim_start().strip_prefix('=')?.trim_start().strip_prefix('"')?;
    let value = value.split('"').next()?.to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
    (!value.is_empty() && value.chars().all(plain)).then_some(value)
}

/// The `[remote]` table for `url` (checked with the rest when the pipeline is parsed). Returns the key pair it
/// made, if no `--trusted-key` was given.
fn remote_table(text: &mut String, url: &str, args: &InitArgs) -> Option<crate::sign::PrivateKey> {
    let (public, made) = match &args.trusted_key {
        Some(k) => (k.clone(), None),
        None => {
            let k = crate::sign::PrivateKey::generate();
            (k.public().to_string(), Some(k))
        }
    };
    let quote = |s: &str| toml::Value::String(s.into()).to_string();
    text.push_str(&format!(
        "\n# The shared cache and deploy ledger (docs/remote.md). Writers need KKPIPE_SIGNING_KEY; pull requests only read.\n\
         [remote]\nurl = {}\ntrusted_keys = [{}]\n",
        quote(url),
        quote(&public)
    ));
    made
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io("write", path, e))
}

/// `kkpipe ci PROVIDER`: the provider's file for the pipeline of this repository.
pub(super) fn ci(settings: &Settings, args: &CiArgs) -> Result<u8, Error> {
    let root = super::root(settings)?;
    let p = crate::pipeline::load(&root)?;
    crate::graph::Graph::build(&p)?;
    files::check_forge(&p, args.provider).map_err(Error::Usage)?;
    let pinned = files::pinned_versions(&p, args.provider);
    let get = |k: &str| pinned.get(k).map(String::as_str);
    for (_, w) in crate::kkp::versions::contradictions(&root, &|k| get(k).map(str::to_string)) {
        eprintln!(
            "kkpipe: warning: {w}\n  hint: set the version in the stage's `env` in {FILE_NAME} (`kkpipe init --force` pins what the repository says)"
        );
    }
    let text = files::render(&p, args.provider, &args.install);
    if args.stdout {
        print!("{text}");
        return Ok(exit::OK);
    }
    let path = root.join(files::file_name(args.provider));
    if path.exists() && !args.force {
        return Err(Error::Usage(format!(
            "`{}` already exists; pass `--force` to overwrite it, or `--stdout` to print it",
            path.display()
        )));
    }
    write(&path, &text)?;
    eprintln!("kkpipe: wrote `{}`", path.display());
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::{ignored_by, state_bucket};

    #[test]
    fn the_state_bucket_is_read_from_the_backend_block_never_from_a_comment() {
        let s3 = "terraform {\n  backend \"s3\" {\n    bucket = \"acme-tfstate\"\n    key = \"kkp\"\n  }\n}\n";
        assert_eq!(state_bucket(s3), Some(("s3".into(), "acme-tfstate".into())));
        let gcs = "terraform {\n  backend \"gcs\" { prefix = \"t\", bucket = \"acme-state\" }\n}\n";
        assert_eq!(state_bucket(gcs), Some(("gcs".into(), "acme-state".into())));
        let commented =
            "# backend \"s3\" { bucket = \"x\" }\nterraform {\n  backend \"local\" {\n    path = \"t\"\n  }\n}\n";
        assert_eq!(state_bucket(commented), None);
        assert_eq!(state_bucket("terraform {\n  backend \"s3\" { bucket = \"${var.b}\" }\n}\n"), None);
        // The wizard's AWS backend (michalvanco/start-kkp-aws-demo, terraform/aws/backend.tf).
        let wizard = "terraform {\n  backend \"s3\" {\n    region  = \"eu-central-1\"\n    bucket  = \"tf-state-kkp-axgoejxazgfd\"\n    key     = \"terraform-kkp.tfstate\"\n    dynamodb_table = \"terraform-state-kkp-locks-axgoejxazgfd\"\n  }\n}\n";
        assert_eq!(state_bucket(wizard), Some(("s3".into(), "tf-state-kkp-axgoejxazgfd".into())));
        assert_eq!(super::backend_setting(wizard, "region").as_deref(), Some("eu-central-1"));
    }

    #[test]
    fn gitignore_patterns_cover_paths_as_git_reads_them() {
        let patterns = ["*.tfplan", "**/.terraform/", "/kubeone/kubeconfig", "secrets/"];
        assert!(ignored_by(&patterns, "terraform/aws/plan.tfplan"), "a name pattern matches at any depth");
        assert!(ignored_by(&patterns, "terraform/aws/.terraform/x"), "a directory pattern covers what is below");
        assert!(ignored_by(&patterns, "kubeone/kubeconfig"));
        assert!(ignored_by(&patterns, "a/secrets/key"));
        assert!(!ignored_by(&patterns, "terraform/aws/output.json"));
        assert!(!ignored_by(&["/kubeconfig"], "kubeone/kubeconfig"), "a leading slash anchors at the top");
        assert!(!ignored_by(&["kubeone/*.json"], "kubeone/sub/x.json"), "`*` does not cross a `/`");
        assert!(!ignored_by(&["*.json", "!terraform/**/*.json"], "terraform/aws/output.json"), "a later `!` wins");
        assert!(ignored_by(&["!x.json", "*.json"], "a/x.json"), "a later pattern wins over an earlier `!`");
    }
}
