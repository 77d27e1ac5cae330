//! A terraform plan, summarised for review: what `terraform show -json PLANFILE` says it will do.
//!
//! Read from terraform's JSON plan representation (internal/command/jsonplan in hashicorp/terraform): each
//! `resource_changes[]` element has an `address`, a `mode` (`managed` or `data`), `change.actions` (`["create"]`,
//! `["update"]`, `["delete"]`, `["delete","create"]` or `["create","delete"]` for a replacement, `["read"]`,
//! `["no-op"]`, `["forget"]`, `["open"]`), an optional `previous_address` (moved) and `change.importing` (imported);
//! `output_changes` maps each root output to its `actions`. Only addresses, actions and output names are kept:
//! values (and their `*_sensitive` masks) are never shown, so nothing secret can reach a review. The one value
//! read is the `id` of a destroyed object (`change.before.id`), kept as a BLAKE3 fingerprint: which object a
//! reviewed deletion was of.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a plan will do, by action.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub(crate) struct PlanSummary {
    pub create: Vec<String>,
    pub update: Vec<String>,
    pub delete: Vec<String>,
    /// Destroyed and created again (either order).
    pub replace: Vec<String>,
    /// Data sources read during apply.
    pub read: Vec<String>,
    pub forget: Vec<String>,
    /// Resources whose address changes (`moved` blocks).
    pub moved: Vec<Moved>,
    pub imported: Vec<String>,
    /// Root outputs whose value changes, and how.
    pub outputs: Vec<OutputChange>,
    /// Of each resource deleted or replaced, a fingerprint of the object (BLAKE3 of its `id`, never the id):
    /// what a review checks it is still the same object (crate::remote::review).
    #[serde(skip)]
    pub destroyed_ids: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Moved {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct OutputChange {
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
}

impl PlanSummary {
    /// Nothing to create, change, destroy, move or import.
    pub(crate) fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.update.is_empty()
            && self.delete.is_empty()
            && self.replace.is_empty()
            && self.forget.is_empty()
            && self.moved.is_empty()
            && self.imported.is_empty()
    }

    /// `2 to create, 1 to update, 0 to delete, 1 to replace`, and reads, moves and imports when there are any.
    pub(crate) fn counts(&self) -> String {
        let mut s = format!(
            "{} to create, {} to update, {} to delete, {} to replace",
            self.create.len(),
            self.update.len(),
            self.delete.len(),
            self.replace.len()
        );
        for (n, what) in [(self.read.len(), "to read"), (self.moved.len(), "moved"), (self.imported.len(), "imported")]
        {
            if n > 0 {
                s.push_str(&format!(", {n} {what}"));
            }
        }
        if !self.forget.is_empty() {
            s.push_str(&format!(", {} to forget", self.forget.len()));
        }
        s
    }
}

/// The actions a plan policy can deny (`plan_policy.deny` in pipeline.toml).
pub(crate) const ACTIONS: &[&str] = &["create", "update", "delete", "replace", "read", "forget"];

/// What a policy denies by default: destroying anything (deleted, or destroyed and created again).
pub(crate) const DENY_BY_DEFAULT: &[&str] = &["delete", "replace"];

impl PlanSummary {
    /// The addresses of one action (one of [`ACTIONS`]).
    pub(crate) fn with_action(&self, action: &str) -> &[String] {
        match action {
            "create" => &self.create,
            "update" => &self.update,
            "delete" => &self.delete,
            "replace" => &self.replace,
            "read" => &self.read,
            "forget" => &self.forget,
            _ => &[],
        }
    }

    /// `(address, action)` of every change of a `deny`ed action on an address `allowed` does not cover.
    pub(crate) fn denied(&self, deny: &[String], allowed: &dyn Fn(&str) -> bool) -> Vec<(String, String)> {
        deny.iter()
            .flat_map(|a| self.with_action(a).iter().map(move |addr| (addr.clone(), a.clone())))
            .filter(|(addr, _)| !allowed(addr))
            .collect()
    }
}

/// A resource a `terraform plan`'s human output says changes: what a drift probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextChange {
    pub address: String,
    /// `create`, `update`, `delete`, `replace`, `read`, `forget`, `import`, `move`, or `changed-outside` /
    /// `deleted-outside` (terraform's "Objects have changed outside of Terraform").
    pub change: String,
}

/// The comment terraform's human plan renderer (internal/command/jsonformat/plan.go, `resourceChangeComment`,
/// terraform 1.x) writes after `  # ADDRESS` above each resource; the first that starts the rest wins. Any other
/// `will be` or `must be` is shown as a `change`, never hidden.
const TEXT_CHANGES: [(&str, &str); 13] = [
    ("will be created", "create"),
    ("will be updated in-place", "update"),
    ("will be destroyed", "delete"),
    ("must be replaced", "replace"),
    ("is tainted, so must be replaced", "replace"),
    ("will be replaced", "replace"),
    ("will be read during apply", "read"),
    ("will no longer be managed by Terraform", "forget"),
    ("will be imported", "import"),
    ("has moved to ", "move"),
    ("has changed", "changed-outside"),
    ("has been deleted", "deleted-outside"),
    ("will be ", "change"),
];

/// Terminal colour sequences (`ESC [ ... letter`), which a probe without `-no-color` prints.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `ADDRESS rest` split where the address ends: at the first space outside brackets and quotes (for_each keys
/// are quoted strings and may hold spaces).
fn split_address(text: &str) -> Option<(&str, &str)> {
    let (mut depth, mut quoted, mut escaped) = (0i32, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth -= 1,
            ' ' if !quoted && depth == 0 => return Some((&text[..i], &text[i + 1..])),
            _ => {}
        }
    }
    None
}

/// The resources a `terraform plan` (run without `-json`, as a drift probe runs it) printed as changing, each
/// once per kind of change, in order. Only the lines terraform writes at the top level, indented by exactly
/// two spaces (a value's text, such as a heredoc, is indented deeper); text that is no plan gives none.
pub(crate) fn changes_in_text(text: &str) -> Vec<TextChange> {
    let mut out: Vec<TextChange> = Vec::new();
    for line in text.lines() {
        let line = strip_ansi(line);
        let Some(rest) = line.strip_prefix("  # ") else { continue };
        let Some((address, mut said)) = split_address(rest) else { continue };
        // `ADDRESS (deposed object 1a2b3c4d) will be destroyed`: the deposed object of that address.
        if let Some(after) = said.strip_prefix("(deposed object ").and_then(|r| r.split_once(") ")) {
            said = after.1;
        }
        let Some((_, change)) = TEXT_CHANGES.iter().find(|(words, _)| said.starts_with(words)) else { continue };
        if address.is_empty() || address.starts_with('(') {
            continue;
        }
        let c = TextChange { address: address.to_string(), change: change.to_string() };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// `a` (update), `b` (delete), and 3 more: at most `max` named, each as `show` renders an address.
pub(crate) fn name_changes(changes: &[TextChange], more: usize, max: usize, show: &dyn Fn(&str) -> String) -> String {
    let mut names: Vec<String> =
        changes.iter().take(max).map(|c| format!("{} ({})", show(&c.address), c.change)).collect();
    let more = more + changes.len().saturating_sub(max);
    if more > 0 {
        names.push(format!("and {more} more"));
    }
    names.join(", ")
}

/// Resource address patterns (blank ones ignored), as `plan_policy.allow` and `KKPIPE_ALLOW_DESTROY` give
/// them: `*` matches anything, every other character itself, so an address is its own pattern
/// (`terraform_data.node[2]`, `module.x["a"]`: brackets are not character classes here).
pub(crate) fn address_patterns<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<globset::GlobSet, String> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let literal: Vec<String> = p.split('*').map(globset::escape).collect();
        let glob = globset::GlobBuilder::new(&literal.join("*")).literal_separator(false).build();
        b.add(glob.map_err(|e| format!("address pattern `{p}`: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

/// `terraform show -json PLAN` in `cwd` (where terraform was initialised), summarised. `env`: the whole
/// environment terraform gets (a stage's), or None for the caller's.
pub(crate) fn show(
    plan: &std::path::Path,
    cwd: &std::path::Path,
    env: Option<Vec<(String, String)>>,
) -> Result<PlanSummary, String> {
    let mut cmd = std::process::Command::new("terraform");
    cmd.args(["show", "-json", "-no-color"]).arg(plan).current_dir(cwd);
    if let Some(env) = env {
        cmd.env_clear().envs(env);
    }
    let what = format!("`terraform show -json {}`", plan.display());
    let out = cmd.output().map_err(|e| format!("{what} could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    parse(&out.stdout).map_err(|e| format!("{what}: {e}"))
}

#[derive(Deserialize)]
struct Plan {
    #[serde(default)]
    resource_changes: Vec<ResourceChange>,
    #[serde(default)]
    output_changes: BTreeMap<String, Change>,
}

#[derive(Deserialize)]
struct ResourceChange {
    address: String,
    #[serde(default)]
    previous_address: Option<String>,
    change: Change,
}

#[derive(Deserialize)]
struct Change {
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    importing: Option<serde_json::Value>,
    /// Read only for the `id` of what is destroyed, which is fingerprinted, never kept.
    #[serde(default)]
    before: Option<serde_json::Value>,
}

/// Reads `terraform show -json` output.
pub(crate) fn parse(json: &[u8]) -> Result<PlanSummary, String> {
    let plan: Plan = serde_json::from_slice(json).map_err(|e| format!("not terraform's JSON plan: {e}"))?;
    let mut s = PlanSummary::default();
    for rc in plan.resource_changes {
        let a: Vec<&str> = rc.change.actions.iter().map(String::as_str).collect();
        let address = rc.address.clone();
        match a.as_slice() {
            // CreateThenForget (terraform 1.10+): created, then left out of the state.
            ["create"] | ["create", "forget"] => s.create.push(address),
            ["update"] => s.update.push(address),
            ["delete"] => s.delete.push(address),
            ["delete", "create"] | ["create", "delete"] => s.replace.push(address),
            ["read"] => s.read.push(address),
            ["forget"] => s.forget.push(address),
            // `open`: an ephemeral resource, which changes nothing that lasts.
            ["no-op"] | ["open"] | [] => {}
            // An action a newer terraform added: listed as a change rather than hidden.
            _ => s.update.push(address),
        }
        if matches!(a.as_slice(), ["delete"] | ["delete", "create"] | ["create", "delete"])
            && let Some(id) = rc.change.before.as_ref().and_then(|b| b.get("id")).and_then(|i| i.as_str())
        {
            let print = blake3::hash(id.as_bytes()).to_hex()[..16].to_string();
            s.destroyed_ids.insert(rc.address.clone(), print);
        }
        if let Some(from) = rc.previous_address.filter(|p| *p != rc.address) {
            s.moved.push(Moved { from, to: rc.address.clone() });
        }
        if rc.change.importing.is_some() {
            s.imported.push(rc.address);
        }
    }
    for (name, c) in plan.output_changes {
        let how = match c.actions.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["no-op"] | [] => continue,
            ["create"] => "added",
            ["delete"] => "removed",
            _ => "changed",
        };
        s.outputs.push(OutputChange { name, change: how });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `terraform show -json` writes (values included, which the summary never keeps).
    #[test]
    fn actions_become_counts_and_addresses_and_values_are_never_read() {
        let json = br#"{"format_version":"1.2","resource_changes":[
            {"address":"terraform_data.a","mode":"managed","change":{"actions":["create"],"after":{"input":"s3cret"},"after_sensitive":{"input":true}}},
            {"address":"terraform_data.b","mode":"managed","change":{"actions":["update"]}},
            {"address":"terraform_data.c","mode":"managed","change":{"actions":["delete","create"]}},
            {"address":"terraform_data.d","mode":"managed","change":{"actions":["create","delete"]}},
            {"address":"terraform_data.e","mode":"managed","change":{"actions":["delete"]}},
            {"address":"terraform_data.f","mode":"managed","change":{"actions":["no-op"]}},
            {"address":"data.x.y","mode":"data","change":{"actions":["read"]}},
            {"address":"terraform_data.new","previous_address":"terraform_data.old","mode":"managed","change":{"actions":["no-op"]}},
            {"address":"aws_s3_bucket.b","mode":"managed","change":{"actions":["no-op"],"importing":{"id":"b"}}}],
            "output_changes":{"endpoint":{"actions":["update"],"after_sensitive":true},"same":{"actions":["no-op"]},"new":{"actions":["create"]}}}"#;
        let s = parse(json).unwrap();
        assert_eq!(s.create, ["terraform_data.a"]);
        assert_eq!(s.update, ["terraform_data.b"]);
        assert_eq!(s.replace, ["terraform_data.c", "terraform_data.d"]);
        assert_eq!(s.delete, ["terraform_data.e"]);
        assert_eq!(s.read, ["data.x.y"]);
        assert_eq!(s.moved, [Moved { from: "terraform_data.old".into(), to: "terraform_data.new".into() }]);
        assert_eq!(s.imported, ["aws_s3_bucket.b"]);
        let outputs: Vec<(&str, &str)> = s.outputs.iter().map(|o| (o.name.as_str(), o.change)).collect();
        assert_eq!(outputs, [("endpoint", "changed"), ("new", "added")]);
        assert_eq!(s.counts(), "1 to create, 1 to update, 1 to delete, 2 to replace, 1 to read, 1 moved, 1 imported");
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn a_policy_denies_its_actions_except_on_allowed_addresses() {
        let s = PlanSummary {
            create: vec!["a.new".into()],
            delete: vec!["a.old".into(), "module.dns.x".into()],
            replace: vec!["a.node[0]".into()],
            ..Default::default()
        };
        let deny: Vec<String> = DENY_BY_DEFAULT.iter().map(|a| a.to_string()).collect();
        let denied = s.denied(&deny, &|addr| addr.starts_with("module.dns."));
        let pairs: Vec<(&str, &str)> = denied.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(pairs, [("a.old", "delete"), ("a.node[0]", "replace")]);
        assert!(s.denied(&deny, &|_| true).is_empty());
        assert_eq!(s.denied(&["create".into()], &|_| false), [("a.new".to_string(), "create".to_string())]);
    }

    /// An address is its own pattern: brackets and quotes match themselves; `*` is the one wildcard.
    #[test]
    fn address_patterns_match_addresses_literally_but_for_stars() {
        let p = address_patterns(["terraform_data.node[2]", "module.dns.*", " "]).unwrap();
        assert!(p.is_match("terraform_data.node[2]"));
        assert!(!p.is_match("terraform_data.node2") && !p.is_match("terraform_data.node[3]"));
        assert!(p.is_match("module.dns.aws_route53_record.x[\"a\"]"));
        assert!(address_patterns(["*"]).unwrap().is_match("module.a.b[0]"));
        assert!(address_patterns([" ", ""]).unwrap().is_empty());
    }

    #[test]
    fn an_empty_plan_and_garbage() {
        let s = parse(br#"{"format_version":"1.2","planned_values":{}}"#).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.counts(), "0 to create, 0 to update, 0 to delete, 0 to replace");
        assert!(parse(b"Error: no plan").is_err());
        let newer = parse(br#"{"resource_changes":[{"address":"a","change":{"actions":["explode"]}}]}"#).unwrap();
        assert_eq!(newer.update, ["a"], "an unknown action is shown as a change, never hidden");
    }

    /// What `terraform plan` prints when the live system drifted (the demo's probe, terraform 1.11), with what
    /// must not be read as a resource: a value's heredoc text, a shell comment, a colour sequence.
    #[test]
    fn the_resources_a_plan_prints_as_changing() {
        let text = "terraform_data.vpc: Refreshing state... [id=f4d8]\n\
            Note: Objects have changed outside of Terraform\n\
            \x20 # terraform_data.api_lb has changed\n\
            Terraform will perform the following actions:\n\
            \x20 # terraform_data.api_lb will be updated in-place\n\
            \x20 ~ resource \"terraform_data\" \"api_lb\" {\n\
            \x20     input = <<-EOT\n\
            \x20         # nginx.conf will be created\n\
            \x20     EOT\n\
            \x20 # terraform_data.node[\"a b\"] must be replaced\n\
            \x20 # module.dns.aws_route53_record.api will be destroyed\n\
            \x20 # aws_instance.x (deposed object 1a2b3c4d) will be destroyed\n\
            \x20 # terraform_data.api_lb will be updated in-place\n\
            \x20 # terraform_data.old has moved to terraform_data.new\n\
            \x20 # terraform_data.t will be replaced due to changes in replace_triggered_by\n\
            \x20 # \u{1b}[1mterraform_data.c\u{1b}[0m will be created\n\
            \x20 # terraform_data.d will be frobnicated\n\
            # a shell comment will be destroyed\n\
            Plan: 0 to add, 1 to change, 0 to destroy.\n";
        let got: Vec<(String, String)> = changes_in_text(text).into_iter().map(|c| (c.address, c.change)).collect();
        let want = [
            ("terraform_data.api_lb", "changed-outside"),
            ("terraform_data.api_lb", "update"),
            ("terraform_data.node[\"a b\"]", "replace"),
            ("module.dns.aws_route53_record.api", "delete"),
            ("aws_instance.x", "delete"),
            ("terraform_data.old", "move"),
            ("terraform_data.t", "replace"),
            ("terraform_data.c", "create"),
            ("terraform_data.d", "change"),
        ];
        assert_eq!(got, want.map(|(a, c)| (a.to_string(), c.to_string())));
        assert!(changes_in_text("helm: release oauth has other values\n  # not a plan\n").is_empty());
        let named = name_changes(&changes_in_text(text), 4, 2, &|a| format!("`{a}`"));
        assert_eq!(named, "`terraform_data.api_lb` (changed-outside), `terraform_data.api_lb` (update), and 11 more");
    }
}
