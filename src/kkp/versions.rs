//! The kubeone and KKP installer versions a repository needs, read from the repository itself, and the
//! warnings `kkpipe ci` prints when a pipeline's pin contradicts them.
//!
//! kubeone refuses a cluster whose Kubernetes version is outside the range its release supports (a hard
//! validation error), and KKP upgrades one minor version at a time, so neither can be a fixed default: a
//! wizard repository from 2022 (Kubernetes v1.22/v1.23, KKP v2.19) needs kubeone 1.5 and installer v2.19.

use std::path::Path;

/// The kubeone manifest the pipeline's kubeone-apply stage reads.
pub(crate) const KUBEONE_MANIFEST: &str = "kubeone/kubeone.yaml";
/// Where the wizard pins the KKP version of the charts Flux deploys.
pub(crate) const KKP_GIT_SOURCE: &str = "flux/clusters/master/kubermatic/kubermatic-git-source.yaml";

/// Where `flux bootstrap --path=flux/clusters/master` keeps Flux's own manifests.
pub(crate) const FLUX_SYSTEM: &str = "flux/clusters/master/flux-system";

/// A `major.minor` version.
type Minor = (u32, u32);

/// The oldest Kubernetes each Flux minor version supports, from `kubernetesConstraints` of cmd/flux/check.go at
/// each tag (fluxcd/flux2: v0.25.3 ">=1.19.0-0", v0.26-v0.41 ">=1.20.6-0", v2.0.0 ">=1.24.0-0", v2.1 ">=1.25.0-0",
/// v2.2 ">=1.26.0-0", v2.3.0 ">=1.28.0-0", v2.5.0 ">=1.30.0-0", v2.6.0 ">=1.31.0-0"; v2.4 between them, 1.29).
/// A newer Flux is taken to need at least what the newest one here does.
const FLUX_MIN_KUBERNETES: &[(Minor, Minor)] = &[
    ((0, 25), (1, 19)),
    ((0, 26), (1, 20)),
    ((2, 0), (1, 24)),
    ((2, 1), (1, 25)),
    ((2, 2), (1, 26)),
    ((2, 3), (1, 28)),
    ((2, 4), (1, 29)),
    ((2, 5), (1, 30)),
    ((2, 6), (1, 31)),
];

/// Helm releases and the newest Kubernetes minor version each supports; each supports that and the three
/// before it (helm.sh "Helm Version Support Policy": 3.8.x 1.23-1.20, ..., 3.16.x 1.31-1.28).
const HELM: &[(&str, Minor)] = &[
    ("3.8.2", (1, 23)),
    ("3.9.4", (1, 24)),
    ("3.10.3", (1, 25)),
    ("3.11.3", (1, 26)),
    ("3.12.3", (1, 27)),
    ("3.13.3", (1, 28)),
    ("3.14.4", (1, 29)),
    ("3.15.4", (1, 30)),
    ("3.16.4", (1, 31)),
];

/// The newest patch release of the Flux minor versions a new installation may get (fluxcd/flux2 releases).
const FLUX_RELEASES: &[&str] = &["0.41.2", "2.0.1", "2.1.2", "2.2.3", "2.3.0"];

/// The newest patch release of each kubeone minor version and the Kubernetes minor versions it accepts,
/// from `pkg/apis/kubeone/validation/validation.go` at each tag (kubermatic/kubeone; e.g. v1.5.8
/// 28cfd461: ">= 1.22", "<= 1.24"; v1.8.6 5c92917b: ">= 1.27", "<= 1.30"; v1.11.4 2cdd7c51: 1.30-1.33).
const KUBEONE: &[(&str, Minor, Minor)] = &[
    ("1.4.14", (1, 20), (1, 23)),
    ("1.5.8", (1, 22), (1, 24)),
    ("1.6.6", (1, 24), (1, 26)),
    ("1.7.6", (1, 25), (1, 27)),
    ("1.8.6", (1, 27), (1, 30)),
    ("1.9.2", (1, 29), (1, 31)),
    ("1.10.4", (1, 30), (1, 32)),
    ("1.11.4", (1, 30), (1, 33)),
];

/// A version a pipeline pins, and the sentence saying where it came from (a comment in pipeline.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pin {
    pub version: String,
    pub why: String,
}

/// The versions `init` writes into the pipeline for one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pins {
    pub kubeone: Pin,
    pub kkp: Pin,
    pub flux: Pin,
    /// kubectl and helm for kkp-deploy, within what the cluster's Kubernetes allows (`None`: no manifest says
    /// which Kubernetes; the CI file's defaults).
    pub kubectl: Option<Pin>,
    pub helm: Option<Pin>,
    /// The repository's Flux syncs over SSH with a deploy key (`gotk-sync.yaml`'s `url: ssh://...`): bootstrap
    /// keeps it so, without `--token-auth`.
    pub flux_over_ssh: bool,
}

/// `major.minor[.patch]` of a version string such as `v1.23.3` or `"2.19.2"`.
fn numbers(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.trim().trim_matches(['"', '\'']).trim_start_matches('v');
    let mut it = v.split(['.', '-', '+']).map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next()?.ok()?;
    let patch = it.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether `version` is `major.minor` or later (an unreadable version counts as later: kkpipe's defaults are).
pub(crate) fn at_least(version: &str, minor: Minor) -> bool {
    numbers(version).is_none_or(|(a, b, _)| (a, b) >= minor)
}

/// The first value of `key:` in a YAML text (the wizard's files keep it on one line).
fn yaml_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim_start().strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

/// The Kubernetes version of the repository's kubeone manifest (`versions.kubernetes`).
pub(crate) fn kubernetes(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(KUBEONE_MANIFEST)).ok()?;
    let v = yaml_value(&text, "kubernetes")?.trim_matches(['"', '\'']);
    numbers(v).map(|_| v.to_string())
}

/// The Kubernetes minor versions a kubeone version accepts, when kkpipe knows its minor version.
fn kubeone_range(kubeone: &str) -> Option<(Minor, Minor)> {
    let (ma, mi, _) = numbers(kubeone)?;
    KUBEONE.iter().find(|(v, _, _)| numbers(v).is_some_and(|(a, b, _)| (a, b) == (ma, mi))).map(|&(_, l, h)| (l, h))
}

/// The newest kubeone release that accepts this Kubernetes version.
fn kubeone_for(kubernetes: &str) -> Option<&'static str> {
    let (a, b, _) = numbers(kubernetes)?;
    KUBEONE.iter().rev().find(|(_, low, high)| *low <= (a, b) && (a, b) <= *high).map(|(v, _, _)| *v)
}

/// The KKP version the repository says, and where: the installer `VERSION=` of the wizard's workflow, else
/// the tag of the charts Flux deploys (the wizard's may be a patch release behind). A CI file kkpipe wrote
/// does not count: its pin is the pipeline's, which this is checked against.
pub(crate) fn kkp(dir: &Path) -> Option<(String, String)> {
    for ci in [".github/workflows/kkp.yaml", ".github/workflows/kkp.yml", ".gitlab-ci.yml", "bitbucket-pipelines.yml"] {
        let Ok(text) = std::fs::read_to_string(dir.join(ci)) else { continue };
        let found = text.lines().find_map(|l| {
            let l = l.trim().trim_start_matches("- ").trim_start_matches("export ").trim_matches('"');
            let v = l.strip_prefix("VERSION=")?;
            let v = v.trim().trim_matches(['"', '\'']).trim_start_matches('v');
            numbers(v).filter(|(major, _, _)| *major == 2).map(|_| v.to_string())
        });
        if let Some(v) = found {
            return Some((v, format!("the installer version of `{ci}`")));
        }
    }
    let text = std::fs::read_to_string(dir.join(KKP_GIT_SOURCE)).ok()?;
    let tag = yaml_value(&text, "tag")?.trim_matches(['"', '\'']).trim_start_matches('v');
    numbers(tag).map(|_| (tag.to_string(), format!("the chart tag of `{KKP_GIT_SOURCE}`")))
}

/// The Flux version of the repository's `flux-system/gotk-components.yaml` (`flux bootstrap` writes
/// "# Flux Version: v2.3.0" at its top: pkg/manifestgen/install/install.go, GetGenWarning).
pub(crate) fn flux(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(FLUX_SYSTEM).join("gotk-components.yaml")).ok()?;
    let v =
        text.lines().take(20).find_map(|l| l.trim().strip_prefix("# Flux Version:"))?.trim().trim_start_matches('v');
    numbers(v).map(|_| v.to_string())
}

/// Whether the repository's Flux syncs over SSH (`gotk-sync.yaml`: `url: ssh://...`, the default of `flux
/// bootstrap`, with a deploy key in the `flux-system` secret; `--token-auth` would make it HTTPS with a token).
pub(crate) fn flux_over_ssh(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(FLUX_SYSTEM).join("gotk-sync.yaml"))
        .is_ok_and(|t| yaml_value(&t, "url").is_some_and(|u| u.trim_matches(['"', '\'']).starts_with("ssh://")))
}

/// The oldest Kubernetes a Flux version supports, when kkpipe knows its minor version.
fn flux_min_kubernetes(flux: &str) -> Option<Minor> {
    let (a, b, _) = numbers(flux)?;
    FLUX_MIN_KUBERNETES.iter().rev().find(|(f, _)| *f <= (a, b)).map(|&(_, k)| k)
}

/// The newest Flux release kkpipe knows that supports this Kubernetes version.
fn flux_for(kubernetes: &str) -> Option<&'static str> {
    let (a, b, _) = numbers(kubernetes)?;
    FLUX_RELEASES.iter().rev().copied().find(|f| flux_min_kubernetes(f).is_some_and(|low| low <= (a, b)))
}

/// The pinned variables a stage's tool can be asked about, with the tool and its own version command
/// (`kubeone version` prints JSON with `gitVersion`; the installer and `flux version --client` a line).
pub(crate) const VERSION_COMMANDS: &[(&str, &str, &[&str])] = &[
    ("KUBECTL_VERSION", "kubectl", &["version", "--client"]),
    ("HELM_VERSION", "helm", &["version", "--short"]),
    ("KUBEONE_VERSION", "kubeone", &["version"]),
    ("KKP_VERSION", "kubermatic-installer", &["version"]),
    ("FLUX_VERSION", "flux", &["version", "--client"]),
];

/// The first `major.minor.patch` in a tool's version output (`v1.5.8`, `"gitVersion": "v1.5.8"`).
pub(crate) fn first_version(text: &str) -> Option<String> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_matches('.'))
        .find(|t| t.split('.').filter(|p| !p.is_empty()).count() >= 3)
        .map(str::to_string)
}

/// Whether two version strings name the same release (`v1.5.8` and `1.5.8`).
pub(crate) fn same_version(a: &str, b: &str) -> bool {
    numbers(a).is_some() && numbers(a) == numbers(b)
}

/// What `init` pins for the repository in `dir`: what it says, else kkpipe's defaults (said as such).
pub(crate) fn pins(dir: &Path) -> Pins {
    let default_kubeone = crate::ci::files::default_version("KUBEONE_VERSION");
    let default_kkp = crate::ci::files::default_version("KKP_VERSION");
    let kubeone = match kubernetes(dir) {
        Some(k) => match kubeone_for(&k) {
            Some(v) => Pin {
                version: v.into(),
                why: format!("the newest kubeone that accepts Kubernetes {k} ({KUBEONE_MANIFEST})"),
            },
            None => Pin {
                version: default_kubeone.into(),
                why: format!(
                    "kkpipe knows no kubeone release for Kubernetes {k} ({KUBEONE_MANIFEST}): set one that accepts it"
                ),
            },
        },
        None => Pin {
            version: default_kubeone.into(),
            why: format!("kkpipe's default: no `{KUBEONE_MANIFEST}` with a Kubernetes version"),
        },
    };
    let kkp = match kkp(dir) {
        Some((v, from)) => Pin { version: v, why: format!("from {from}; KKP upgrades one minor version at a time") },
        None => {
            Pin { version: default_kkp.into(), why: "kkpipe's default: the repository names no KKP version".into() }
        }
    };
    let flux = match (flux(dir), kubernetes(dir).and_then(|k| flux_for(&k).map(|f| (k, f)))) {
        (Some(v), _) => Pin {
            version: v,
            why: format!("the Flux `{FLUX_SYSTEM}/gotk-components.yaml` says runs (kept: bootstrap never upgrades it)"),
        },
        (None, Some((k, f))) => {
            Pin { version: f.into(), why: format!("the newest Flux that supports Kubernetes {k} ({KUBEONE_MANIFEST})") }
        }
        (None, None) => Pin {
            version: crate::ci::files::default_version("FLUX_VERSION").into(),
            why: format!("kkpipe's default: no `{FLUX_SYSTEM}/gotk-components.yaml` and no Kubernetes version"),
        },
    };
    let k8s = kubernetes(dir);
    let kubectl = k8s.as_deref().and_then(|k| {
        let (a, b, _) = numbers(k)?;
        let why = format!("the cluster's Kubernetes minor version ({KUBEONE_MANIFEST}); kubectl talks to one minor version either side");
        Some(Pin { version: format!("{a}.{b}.0"), why })
    });
    let helm = k8s.as_deref().and_then(|k| {
        let v = helm_for(k)?;
        Some(Pin {
            version: v.into(),
            why: format!("the newest Helm that supports Kubernetes {k} ({KUBEONE_MANIFEST})"),
        })
    });
    Pins { kubeone, kkp, flux, flux_over_ssh: flux_over_ssh(dir), kubectl, helm }
}

/// The newest Helm release kkpipe knows that supports this Kubernetes version.
fn helm_for(kubernetes: &str) -> Option<&'static str> {
    let (a, b, _) = numbers(kubernetes)?;
    HELM.iter().rev().find(|(_, max)| max.0 == a && max.1 >= b && max.1 <= b + 3).map(|(v, _)| *v)
}

/// The Kubernetes minor versions a Helm version supports, when kkpipe knows its minor version.
fn helm_range(helm: &str) -> Option<(Minor, Minor)> {
    let (a, b, _) = numbers(helm)?;
    HELM.iter()
        .find(|(v, _)| numbers(v).is_some_and(|(x, y, _)| (x, y) == (a, b)))
        .map(|&(_, max)| ((max.0, max.1.saturating_sub(3)), max))
}

/// kubectl more than one minor version from the cluster, a Helm that does not support it.
fn client_contradictions(k8s: Option<&str>, pins: &dyn Fn(&str) -> Option<String>) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    if let (Some(pin), Some(k)) = (pins("KUBECTL_VERSION"), k8s)
        && let (Some((a, b, _)), Some((c, d, _))) = (numbers(&pin), numbers(k))
        && (a != c || b.abs_diff(d) > 1)
    {
        out.push((true, format!(
            "kubectl {pin} (KUBECTL_VERSION) is more than one minor version from Kubernetes {k} (`{KUBEONE_MANIFEST}`)"
        )));
    }
    if let (Some(pin), Some(k)) = (pins("HELM_VERSION"), k8s)
        && let (Some((low, high)), Some((a, b, _))) = (helm_range(&pin), numbers(k))
        && !(low <= (a, b) && (a, b) <= high)
    {
        out.push((
            true,
            format!(
                "Helm {pin} (HELM_VERSION) supports Kubernetes {}.{}-{}.{}, but `{KUBEONE_MANIFEST}` asks for {k}",
                low.0, low.1, high.0, high.1
            ),
        ));
    }
    out
}

/// Where a pinned version contradicts the repository in `dir`, each with whether a run must stop for it (a
/// Flux pin other than the Flux that runs may be a deliberate upgrade: only said).
pub(crate) fn contradictions(dir: &Path, pins: &dyn Fn(&str) -> Option<String>) -> Vec<(bool, String)> {
    let (kubeone, kkp_pin, flux_pin) = (pins("KUBEONE_VERSION"), pins("KKP_VERSION"), pins("FLUX_VERSION"));
    let (kubeone, kkp_pin, flux_pin) = (kubeone.as_deref(), kkp_pin.as_deref(), flux_pin.as_deref());
    // The repository is read once, and only for what is pinned.
    let pinned = |vars: &[&str]| vars.iter().any(|v| pins(v).is_some());
    let k8s = pinned(&["KUBECTL_VERSION", "HELM_VERSION", "FLUX_VERSION", "KUBEONE_VERSION"])
        .then(|| kubernetes(dir))
        .flatten();
    let mut out = client_contradictions(k8s.as_deref(), pins);
    if let (Some(pin), Some(k)) = (flux_pin, k8s.as_deref())
        && let (Some(low), Some((a, b, _))) = (flux_min_kubernetes(pin), numbers(k))
        && (a, b) < low
    {
        out.push((
            true,
            format!(
                "Flux {pin} (FLUX_VERSION) needs Kubernetes {}.{} or later, but `{KUBEONE_MANIFEST}` asks for {k}",
                low.0, low.1
            ),
        ));
    }
    if let Some(pin) = flux_pin
        && let Some(repo) = flux(dir)
        && numbers(pin).map(|(a, b, _)| (a, b)) != numbers(&repo).map(|(a, b, _)| (a, b))
    {
        out.push((
            false,
            format!(
                "Flux {pin} (FLUX_VERSION) is not the {repo} that `{FLUX_SYSTEM}/gotk-components.yaml` says runs: \
             bootstrap would replace the cluster's Flux"
            ),
        ));
    }
    if let (Some(pin), Some(k)) = (kubeone, k8s.as_deref())
        && let (Some((low, high)), Some((a, b, _))) = (kubeone_range(pin), numbers(k))
        && !(low <= (a, b) && (a, b) <= high)
    {
        let fit = kubeone_for(k).map(|v| format!("; kubeone {v} does")).unwrap_or_default();
        out.push((true, format!(
            "kubeone {pin} (KUBEONE_VERSION) accepts Kubernetes {}.{}-{}.{}, but `{KUBEONE_MANIFEST}` asks for {k}{fit}",
            low.0, low.1, high.0, high.1
        )));
    }
    if let Some(pin) = kkp_pin
        && let Some((v, from)) = kkp(dir)
        && let (Some((a, b, _)), Some((c, d, _))) = (numbers(pin), numbers(&v))
        && (a, b) != (c, d)
    {
        out.push((
            true,
            format!(
                "KKP {pin} (KKP_VERSION) is not the repository's {v} ({from}); KKP upgrades one minor version at a time"
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wizards_kubernetes_versions_get_kubeone_1_5() {
        assert_eq!(kubeone_for("v1.23.3"), Some("1.5.8"));
        assert_eq!(kubeone_for("v1.22.6"), Some("1.5.8"));
        assert_eq!(kubeone_for("1.29.1"), Some("1.9.2"));
        assert_eq!(kubeone_for("1.19.0"), None);
        assert_eq!(kubeone_range("1.8.0"), Some(((1, 27), (1, 30))));
    }

    #[test]
    fn flux_versions_know_the_oldest_kubernetes_they_support() {
        assert_eq!(flux_min_kubernetes("0.25.1"), Some((1, 19)));
        assert_eq!(flux_min_kubernetes("v0.41.2"), Some((1, 20)));
        assert_eq!(flux_min_kubernetes("2.3.0"), Some((1, 28)));
        assert_eq!(flux_min_kubernetes("2.6.1"), Some((1, 31)));
        assert_eq!(flux_min_kubernetes("2.9.0"), Some((1, 31)), "newer ones: at least what kkpipe knows");
        assert_eq!(flux_min_kubernetes("0.24.0"), None);
        assert_eq!(flux_for("v1.23.3"), Some("0.41.2"), "Flux 2 needs Kubernetes 1.24");
        assert_eq!(flux_for("1.24.0"), Some("2.0.1"));
        assert_eq!(flux_for("1.30.1"), Some("2.3.0"));
        assert_eq!(flux_for("1.18.0"), None);
        assert_eq!(helm_for("v1.23.3"), Some("3.11.3"), "3.11 supports 1.26 down to 1.23");
        assert_eq!(helm_for("1.31.2"), Some("3.16.4"));
        assert_eq!(helm_range("3.14.4"), Some(((1, 26), (1, 29))));
    }

    #[test]
    fn tool_versions_are_read_from_what_the_tools_print() {
        let kubeone = r#"{"kubeone": {"gitVersion": "v1.5.8", "major": "1", "minor": "5"}}"#;
        assert_eq!(first_version(kubeone).as_deref(), Some("1.5.8"));
        assert_eq!(first_version("kubermatic-installer v2.19.2 (Community Edition)").as_deref(), Some("2.19.2"));
        assert_eq!(first_version("flux: v0.41.2").as_deref(), Some("0.41.2"));
        assert_eq!(first_version("no version here 1.2"), None);
        assert!(same_version("v1.5.8", "1.5.8") && !same_version("1.5.8", "1.5.9"));
    }
}
