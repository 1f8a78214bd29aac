//! The AppSpec rules: from the located YAML tree to typed values, collecting every finding.
//!
//! The rules are CodeDeploy's (what its agent and service refuse), plus those a careful tool
//! adds (paths that escape the bundle, relative destinations, unknown keys, YAML 1.1 octal
//! surprises). Each check reports and carries on, so one run shows every problem.

use pier_protocol::quote::{escape_bytes, MAX_MESSAGE_CHARS};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tree::{self, Node, Value};
use super::{
    AppSpec, Diagnostic, FileExistsBehavior, FileMapping, Hook, LifecycleEvent, ObjectType, Os,
    Parsed, Permission, SeLinuxContext, Severity, Span,
};

/// CodeDeploy's default, and its ceiling for all the scripts of one event together.
const DEFAULT_TIMEOUT_SECS: u64 = 3600;

const TOP_KEYS: &[&str] = &[
    "version",
    "os",
    "files",
    "file_exists_behavior",
    "permissions",
    "hooks",
];
const FILE_KEYS: &[&str] = &["source", "destination"];
const PERMISSION_KEYS: &[&str] = &[
    "object", "pattern", "except", "owner", "group", "mode", "acls", "context", "type",
];
const CONTEXT_KEYS: &[&str] = &["name", "type", "range"];
const HOOK_KEYS: &[&str] = &["location", "timeout", "runas"];

/// Collects findings for one AppSpec file.
struct Ctx<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn push(&mut self, severity: Severity, span: Span, key: &str, message: String, hint: &str) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            span,
            key: key.to_string(),
            message,
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        });
    }

    fn error(&mut self, span: Span, key: &str, message: String, hint: &str) {
        self.push(Severity::Error, span, key, message, hint);
    }

    fn warn(&mut self, span: Span, key: &str, message: String, hint: &str) {
        self.push(Severity::Warning, span, key, message, hint);
    }

    /// The entries of a mapping node by name, reporting non-mappings, duplicate keys and
    /// unknown keys (a warning: CodeDeploy ignores them, but they are usually typos).
    fn mapping<'n>(&mut self, node: &'n Node, key: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(pairs) = &node.value else {
            self.error(
                node.span,
                key,
                format!("expected a mapping of keys, found {}", node.kind()),
                &format!("write `key: value` lines, one of: {}", known.join(", ")),
            );
            return None;
        };
        let mut fields = Fields::default();
        for (k, v) in pairs {
            let Some(name) = k.text().filter(|_| !k.is_null()) else {
                self.error(
                    k.span,
                    key,
                    format!("a key must be a plain name, found {}", k.kind()),
                    &format!("use one of: {}", known.join(", ")),
                );
                continue;
            };
            let path = join_key(key, name);
            if let Some((_, first, _)) = fields.entries.iter().find(|(n, _, _)| *n == name) {
                let first_line = fields.key_spans[*first].line;
                self.error(
                    k.span,
                    &path,
                    format!("{} appears twice (first on line {first_line})", quote(name)),
                    "keep one of them; YAML would silently use only the last",
                );
                continue;
            }
            if !known.contains(&name) {
                let hint = match did_you_mean(name, known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("known keys here: {}", known.join(", ")),
                };
                self.warn(
                    k.span,
                    &path,
                    format!("unknown key `{name}` is ignored"),
                    &hint,
                );
                continue;
            }
            fields.key_spans.push(k.span);
            let idx = fields.key_spans.len() - 1;
            fields.entries.push((name, idx, v));
        }
        Some(fields)
    }

    /// A required or optional single value as text; reports lists/mappings. Null is None.
    fn scalar<'n>(&mut self, node: &'n Node, key: &str, what: &str) -> Option<&'n str> {
        if node.is_null() {
            return None;
        }
        match node.text() {
            Some(t) => Some(t),
            None => {
                self.error(
                    node.span,
                    key,
                    format!("expected {what}, found {}", node.kind()),
                    "write a single value on the same line as the key",
                );
                None
            }
        }
    }

    /// The items of a list node (null is an empty list).
    fn list<'n>(&mut self, node: &'n Node, key: &str, hint: &str) -> &'n [Node] {
        match &node.value {
            _ if node.is_null() => &[],
            Value::Seq(items) => items,
            _ => {
                self.error(
                    node.span,
                    key,
                    format!("expected a list, found {}", node.kind()),
                    hint,
                );
                &[]
            }
        }
    }
}

/// The known keys of one mapping, first occurrence each.
#[derive(Default)]
struct Fields<'n> {
    entries: Vec<(&'n str, usize, &'n Node)>,
    key_spans: Vec<Span>,
}

impl<'n> Fields<'n> {
    /// Where the key `name` is written, when it is.
    fn key_span(&self, name: &str) -> Option<Span> {
        self.entries
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, i, _)| self.key_spans[*i])
    }

    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, v)| *v)
    }

    /// The value node, but only when it is not null (a key with no value counts as absent).
    fn value(&self, name: &str) -> Option<&'n Node> {
        self.get(name).filter(|n| !n.is_null())
    }
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A close known name for a misspelt one: same letters in another case, or at most two edits.
fn did_you_mean<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    if let Some(k) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) {
        return Some(k);
    }
    known
        .iter()
        .map(|k| {
            (
                edit_distance(&name.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A value from the AppSpec fit for a diagnostic: in backticks, escaped and cut like every
/// name pier quotes (`pier_protocol::quote`), so a huge or control-laden scalar cannot make
/// the diagnostic grow with it.
fn quote(s: &str) -> String {
    format!("`{}`", escape_bytes(s.as_bytes(), MAX_MESSAGE_CHARS))
}

/// A path inside the bundle, normalized. A leading `/` means the bundle root, as in
/// CodeDeploy (`source: /` is the whole bundle); `..` may not climb above the root.
pub(crate) fn bundle_path(raw: &str) -> Result<String, String> {
    if raw.contains('\0') {
        return Err("contains a NUL character".to_string());
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{} climbs out of the bundle with `..`", quote(raw)));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// An absolute path on the host, normalized; `..` is refused rather than resolved because
/// it usually means a path built by mistake.
fn host_path(raw: &str) -> Result<PathBuf, String> {
    if !raw.starts_with('/') {
        return Err(format!("{} is not an absolute path", quote(raw)));
    }
    if raw.contains('\0') {
        return Err("contains a NUL character".to_string());
    }
    let mut out = PathBuf::from("/");
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{} contains `..`", quote(raw))),
            p => out.push(p),
        }
    }
    Ok(out)
}

pub(crate) fn parse(file: &str, text: &str) -> Result<Parsed, Vec<Diagnostic>> {
    let mut ctx = Ctx {
        file,
        diags: Vec::new(),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let root = match tree::parse(text) {
        Ok(doc) => {
            if let Some(span) = doc.second_document {
                ctx.warn(
                    span,
                    "",
                    "a second YAML document starts here and is ignored".to_string(),
                    "keep one document per AppSpec file; remove this `---` and what follows",
                );
            }
            doc.root
        }
        Err(e) => {
            ctx.error(
                e.span,
                "",
                format!("YAML syntax error: {}", e.message),
                "fix the YAML here (indentation, a missing `:`, a tab, or an unclosed quote are the usual causes)",
            );
            return Err(ctx.diags);
        }
    };
    let root = match root {
        Some(r) if !r.is_null() => r,
        _ => {
            ctx.error(
                Span { line: 1, col: 1 },
                "",
                "the AppSpec is empty".to_string(),
                "start with `version: 0.0` and `os: linux`, then `files` and `hooks`",
            );
            return Err(ctx.diags);
        }
    };
    let spec = top(&mut ctx, &root);
    ctx.diags.sort_by_key(|d| d.span);
    match spec {
        Some(spec) if !ctx.diags.iter().any(Diagnostic::is_error) => Ok(Parsed {
            spec,
            warnings: ctx.diags,
        }),
        _ => Err(ctx.diags),
    }
}

fn top(ctx: &mut Ctx, root: &Node) -> Option<AppSpec> {
    let Value::Map(_) = &root.value else {
        ctx.error(
            root.span,
            "",
            format!(
                "the AppSpec must be a mapping of keys (version, os, files, hooks...), found {}",
                root.kind()
            ),
            "start with `version: 0.0` and `os: linux` on their own lines",
        );
        return None;
    };
    let f = ctx.mapping(root, "", TOP_KEYS)?;
    let version = version(ctx, &f, root.span);
    let os = os(ctx, &f, root.span);
    let files = f.get("files").map(|n| files(ctx, n)).unwrap_or_default();
    let feb = f
        .value("file_exists_behavior")
        .and_then(|n| file_exists_behavior(ctx, n));
    let permissions = f
        .get("permissions")
        .map(|n| permissions(ctx, n, &files))
        .unwrap_or_default();
    let hooks = f.get("hooks").map(|n| hooks(ctx, n)).unwrap_or_default();
    Some(AppSpec {
        version: version?,
        os: os?,
        files,
        file_exists_behavior: feb,
        permissions,
        hooks,
    })
}

fn version(ctx: &mut Ctx, f: &Fields, root: Span) -> Option<String> {
    let Some(node) = f.value("version") else {
        ctx.error(
            f.key_span("version").unwrap_or(root),
            "version",
            if f.get("version").is_some() {
                "`version` has no value".to_string()
            } else {
                "`version` is missing".to_string()
            },
            "add `version: 0.0`, the only AppSpec version for EC2/on-premises",
        );
        return None;
    };
    let text = ctx.scalar(node, "version", "0.0")?;
    if text != "0.0" {
        ctx.error(
            node.span,
            "version",
            format!("version must be 0.0, found `{text}`"),
            "write `version: 0.0`, the only AppSpec version for EC2/on-premises",
        );
        return None;
    }
    Some(text.to_string())
}

fn os(ctx: &mut Ctx, f: &Fields, root: Span) -> Option<Os> {
    let Some(node) = f.value("os") else {
        ctx.error(
            f.key_span("os").unwrap_or(root),
            "os",
            if f.get("os").is_some() {
                "`os` has no value".to_string()
            } else {
                "`os` is missing".to_string()
            },
            "add `os: linux`",
        );
        return None;
    };
    let text = ctx.scalar(node, "os", "linux")?;
    match text {
        "linux" => Some(Os::Linux),
        "windows" => {
            ctx.error(
                node.span,
                "os",
                "this AppSpec is for Windows Server instances and pier deploys to Linux"
                    .to_string(),
                "write `os: linux` if the bundle's files and scripts are for Linux",
            );
            None
        }
        other => {
            let hint = if other.eq_ignore_ascii_case("linux") {
                "write it in lower case: `os: linux`"
            } else {
                "write `os: linux`"
            };
            ctx.error(
                node.span,
                "os",
                format!("os must be linux (or windows, which pier refuses), found `{other}`"),
                hint,
            );
            None
        }
    }
}

fn files(ctx: &mut Ctx, node: &Node) -> Vec<FileMapping> {
    let items = ctx.list(
        node,
        "files",
        "write each entry as `- source: PATH` with `destination: /ABS/PATH` under it",
    );
    let mut out: Vec<FileMapping> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("files[{i}]");
        let Some(f) = ctx.mapping(item, &key, FILE_KEYS) else {
            continue;
        };
        let source = match f.value("source") {
            None => {
                ctx.error(
                    item.span,
                    &format!("{key}.source"),
                    "`source` is missing".to_string(),
                    "add `source: PATH` relative to the bundle root (`/` copies the whole bundle)",
                );
                None
            }
            Some(n) => ctx
                .scalar(n, &format!("{key}.source"), "a path in the bundle")
                .and_then(|raw| match bundle_path(raw) {
                    Ok(p) => Some(p),
                    Err(why) => {
                        ctx.error(
                            n.span,
                            &format!("{key}.source"),
                            format!("source {why}"),
                            "give a path inside the bundle, relative to its root",
                        );
                        None
                    }
                }),
        };
        let destination = match f.value("destination") {
            None => {
                ctx.error(
                    item.span,
                    &format!("{key}.destination"),
                    "`destination` is missing".to_string(),
                    "add `destination: /ABSOLUTE/DIR` where the source is copied to",
                );
                None
            }
            Some(n) => ctx
                .scalar(n, &format!("{key}.destination"), "an absolute path")
                .and_then(|raw| match host_path(raw) {
                    Ok(p) => Some(p),
                    Err(why) => {
                        ctx.error(
                            n.span,
                            &format!("{key}.destination"),
                            format!("destination {why}"),
                            "write an absolute directory path such as /var/www/app",
                        );
                        None
                    }
                }),
        };
        let (Some(source), Some(destination)) = (source, destination) else {
            continue;
        };
        if let Some((j, prev)) = out
            .iter()
            .enumerate()
            .find(|(_, m)| m.source == source && m.destination == destination)
        {
            ctx.error(
                item.span,
                &key,
                format!(
                    "copies `{}` to `{}` a second time (files[{j}] on line {} already does)",
                    display_source(&source),
                    destination.display(),
                    prev.span.line
                ),
                "remove one of the two entries",
            );
            continue;
        }
        out.push(FileMapping {
            source,
            destination,
            span: item.span,
        });
    }
    out
}

fn display_source(s: &str) -> &str {
    if s.is_empty() {
        "/"
    } else {
        s
    }
}

fn file_exists_behavior(ctx: &mut Ctx, node: &Node) -> Option<FileExistsBehavior> {
    let text = ctx.scalar(
        node,
        "file_exists_behavior",
        "DISALLOW, OVERWRITE or RETAIN",
    )?;
    match text.parse::<FileExistsBehavior>() {
        Ok(b) => Some(b),
        Err(_) => {
            let hint = match text.to_ascii_uppercase().parse::<FileExistsBehavior>() {
                Ok(b) => format!("write it in capitals: `{b}`"),
                Err(_) => "use DISALLOW (the default), OVERWRITE or RETAIN".to_string(),
            };
            ctx.error(
                node.span,
                "file_exists_behavior",
                format!("unknown file_exists_behavior `{text}`"),
                &hint,
            );
            None
        }
    }
}

fn permissions(ctx: &mut Ctx, node: &Node, files: &[FileMapping]) -> Vec<Permission> {
    let items = ctx.list(
        node,
        "permissions",
        "write each entry as `- object: /ABS/PATH` with owner, group, mode... under it",
    );
    let mut out: Vec<Permission> = Vec::new();
    // Every entry whose object could be read, valid or not, with its index.
    let mut seen: Vec<(usize, Permission)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("permissions[{i}]");
        let Some(f) = ctx.mapping(item, &key, PERMISSION_KEYS) else {
            continue;
        };
        if let Some((p, ok)) = permission(ctx, item, &key, &f) {
            let overlaps = |a: &[ObjectType], b: &[ObjectType]| {
                a.is_empty() || b.is_empty() || a.iter().any(|t| b.contains(t))
            };
            if let Some((j, prev)) = seen.iter().find(|(_, q)| {
                q.object == p.object && q.pattern == p.pattern && overlaps(&q.types, &p.types)
            }) {
                ctx.error(
                    item.span,
                    &format!("{key}.object"),
                    format!(
                        "`{}` already has permissions (permissions[{j}] on line {})",
                        p.object.display(),
                        prev.span.line
                    ),
                    "merge the two entries, or tell them apart with `pattern` or `type`",
                );
                continue;
            }
            if !files.is_empty() && !files.iter().any(|m| p.object.starts_with(&m.destination)) {
                ctx.warn(
                    item.span,
                    &format!("{key}.object"),
                    format!(
                        "`{}` is not under any files destination, and permissions apply only to what Install places",
                        p.object.display()
                    ),
                    "point object at a destination (or a path under one)",
                );
            }
            seen.push((i, p.clone()));
            if ok {
                out.push(p);
            }
        }
    }
    out
}

/// The entry as far as it could be read, and whether it was free of errors (an entry with a
/// bad mode still takes part in the duplicate-object check, so both problems are reported).
fn permission(ctx: &mut Ctx, item: &Node, key: &str, f: &Fields) -> Option<(Permission, bool)> {
    let mut ok = true;
    let object = match f.value("object") {
        None => {
            ctx.error(
                item.span,
                &format!("{key}.object"),
                "`object` is missing".to_string(),
                "add `object: /ABSOLUTE/PATH`, a file or directory that files installs",
            );
            None
        }
        Some(n) => ctx
            .scalar(n, &format!("{key}.object"), "an absolute path")
            .and_then(|raw| match host_path(raw) {
                Ok(p) => Some(p),
                Err(why) => {
                    ctx.error(
                        n.span,
                        &format!("{key}.object"),
                        format!("object {why}"),
                        "write the absolute path of an installed file or directory",
                    );
                    None
                }
            }),
    };

    let mut pattern = None;
    if let Some(n) = f.value("pattern") {
        let k = format!("{key}.pattern");
        if let Some(raw) = ctx.scalar(n, &k, "a glob pattern") {
            if let Err(why) = check_glob(raw) {
                ctx.error(
                    n.span,
                    &k,
                    format!("pattern `{raw}` is not a valid glob: {why}"),
                    "use * ? [abc] and ** (the default, every object)",
                );
                ok = false;
            } else if raw != "**" {
                pattern = Some(raw.to_string());
            }
        } else {
            ok = false;
        }
    }

    let mut except = Vec::new();
    if let Some(n) = f.value("except") {
        let k = format!("{key}.except");
        let items = ctx.list(n, &k, "write `except: [PATTERN, ...]`");
        for (j, it) in items.iter().enumerate() {
            let kj = format!("{k}[{j}]");
            match ctx.scalar(it, &kj, "a glob pattern") {
                Some(raw) => match check_glob(raw) {
                    Ok(()) => except.push(raw.to_string()),
                    Err(why) => {
                        ctx.error(
                            it.span,
                            &kj,
                            format!("{} is not a valid glob: {why}", quote(raw)),
                            "use * ? [abc] and **",
                        );
                        ok = false;
                    }
                },
                None => {
                    if it.is_null() {
                        ctx.error(
                            it.span,
                            &kj,
                            "empty pattern".to_string(),
                            "remove the empty item",
                        );
                    }
                    ok = false;
                }
            }
        }
    }

    let owner = name_field(ctx, f, key, "owner", &mut ok);
    let group = name_field(ctx, f, key, "group", &mut ok);

    let mut mode = None;
    if let Some(n) = f.value("mode") {
        let k = format!("{key}.mode");
        match ctx.scalar(n, &k, "octal digits such as 644") {
            Some(raw) => match parse_mode(raw) {
                Ok(m) => {
                    mode = Some(m);
                    let plain = matches!(n.value, Value::Scalar { plain: true, .. });
                    if plain && raw.len() == 4 && raw.starts_with('0') {
                        ctx.warn(
                            n.span,
                            &k,
                            format!(
                                "CodeDeploy's YAML reads an unquoted `{raw}` as an octal number and gets another mode; pier reads it as mode {raw}"
                            ),
                            &format!("write `mode: {}` (or quote it) to mean the same everywhere", &raw[1..]),
                        );
                    }
                }
                Err(why) => {
                    ctx.error(
                        n.span,
                        &k,
                        why,
                        "write 3 or 4 octal digits, such as 644, 0750 or 4755",
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }

    let mut acls = Vec::new();
    if let Some(n) = f.value("acls") {
        let k = format!("{key}.acls");
        let items = ctx.list(n, &k, "write `acls:` followed by `- u:USER:rwx` lines");
        for (j, it) in items.iter().enumerate() {
            let kj = format!("{k}[{j}]");
            let Some(raw) = ctx.scalar(it, &kj, "an ACL entry") else {
                ok = false;
                continue;
            };
            match check_acl(raw) {
                Ok(()) => acls.push(raw.to_string()),
                Err(why) => {
                    ctx.error(
                        it.span,
                        &kj,
                        format!("ACL entry `{raw}` is invalid: {why}"),
                        "write [d:]{u|g}:NAME:PERMS or [d:]{m|o}::PERMS, e.g. u:bob:rw, d:g:staff:rx, o::r",
                    );
                    ok = false;
                }
            }
        }
    }

    let mut context = None;
    if let Some(n) = f.value("context") {
        let k = format!("{key}.context");
        match context_of(ctx, n, &k) {
            Some(c) => context = Some(c),
            None => ok = false,
        }
    }

    let mut types = Vec::new();
    if let Some(n) = f.get("type") {
        let k = format!("{key}.type");
        let items = ctx.list(n, &k, "write `type: [file]`, `type: [directory]` or both");
        if items.is_empty() && (n.is_null() || matches!(n.value, Value::Seq(_))) {
            ctx.error(
                n.span,
                &k,
                "type lists no object kinds, so the entry would apply to nothing".to_string(),
                "list file, directory or both, or remove `type` (both is the default)",
            );
            ok = false;
        }
        for (j, it) in items.iter().enumerate() {
            let kj = format!("{k}[{j}]");
            let t = match ctx.scalar(it, &kj, "file or directory") {
                Some("file") => ObjectType::File,
                Some("directory") => ObjectType::Directory,
                Some(other) => {
                    ctx.error(
                        it.span,
                        &kj,
                        format!("unknown object type `{other}`"),
                        "use `file` or `directory`",
                    );
                    ok = false;
                    continue;
                }
                None => {
                    ok = false;
                    continue;
                }
            };
            if !types.contains(&t) {
                types.push(t);
            }
        }
    }

    if owner.is_none()
        && group.is_none()
        && mode.is_none()
        && acls.is_empty()
        && context.is_none()
        && ok
        && object.is_some()
    {
        ctx.warn(
            item.span,
            key,
            "this entry sets nothing".to_string(),
            "add owner, group, mode, acls or context, or remove the entry",
        );
    }

    let object = object?;
    Some((
        Permission {
            object,
            pattern,
            except,
            owner,
            group,
            mode,
            acls,
            context,
            types,
            span: item.span,
        },
        ok,
    ))
}

/// `owner` or `group`: a user or group name as `chown` takes it.
fn name_field(ctx: &mut Ctx, f: &Fields, key: &str, name: &str, ok: &mut bool) -> Option<String> {
    let n = f.value(name)?;
    let k = format!("{key}.{name}");
    let raw = ctx.scalar(n, &k, "a name")?;
    if raw.is_empty()
        || raw
            .chars()
            .any(|c| c.is_whitespace() || c == ':' || c == '/')
    {
        ctx.error(
            n.span,
            &k,
            format!("{} is not a valid {name} name", quote(raw)),
            &format!("write one {name} name, e.g. www-data, without spaces, `:` or `/`"),
        );
        *ok = false;
        return None;
    }
    Some(raw.to_string())
}

fn check_glob(raw: &str) -> Result<(), String> {
    if raw.is_empty() {
        return Err("it is empty".to_string());
    }
    globset::Glob::new(raw)
        .map(|_| ())
        .map_err(|e| e.kind().to_string())
}

/// Three or four octal digits, as CodeDeploy takes them (`644`, `0750`, `4755`).
fn parse_mode(raw: &str) -> Result<u32, String> {
    if !(3..=4).contains(&raw.len()) || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("mode must be 3 or 4 octal digits, found `{raw}`"));
    }
    if let Some(bad) = raw.chars().find(|c| *c == '8' || *c == '9') {
        return Err(format!("mode `{raw}` is not octal (digit {bad})"));
    }
    u32::from_str_radix(raw, 8).map_err(|e| format!("mode `{raw}`: {e}"))
}

/// A setfacl entry: `[d[efault]:]{u[ser]|g[roup]}:[NAME]:PERMS` or
/// `[d[efault]:]{m[ask]|o[ther]}:[:]PERMS`, PERMS from `rwxX-` or one octal digit.
pub(crate) fn check_acl(raw: &str) -> Result<(), String> {
    let mut parts: Vec<&str> = raw.split(':').collect();
    if matches!(parts.first(), Some(&"d") | Some(&"default")) && parts.len() >= 3 {
        parts.remove(0);
    }
    let (tag, qualifier, perms) = match parts.as_slice() {
        [tag, q, perms] => (*tag, *q, *perms),
        [tag, perms] => (*tag, "", *perms),
        _ => return Err("expected TYPE:NAME:PERMS".to_string()),
    };
    let named = match tag {
        "u" | "user" | "g" | "group" => true,
        "m" | "mask" | "o" | "other" => false,
        "" => return Err("the entry type is missing".to_string()),
        other => return Err(format!("unknown entry type `{other}` (use u, g, m or o)")),
    };
    if !named && !qualifier.is_empty() {
        return Err(format!("a `{tag}` entry takes no name"));
    }
    if named && parts.len() == 2 {
        return Err(format!(
            "a `{tag}` entry needs a name field (empty for the owner): {tag}:NAME:PERMS"
        ));
    }
    if qualifier.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(format!("{} is not a valid name", quote(qualifier)));
    }
    if perms.is_empty() {
        return Err("the permissions are missing".to_string());
    }
    if perms.len() == 1 && perms.as_bytes()[0].is_ascii_digit() {
        return if perms.as_bytes()[0] <= b'7' {
            Ok(())
        } else {
            Err(format!("{} is not an octal digit", quote(perms)))
        };
    }
    let mut seen = String::new();
    for c in perms.chars() {
        if !"rwxX-".contains(c) {
            return Err(format!(
                "{} is not a permission (use r, w, x, X or -)",
                quote(&c.to_string())
            ));
        }
        if c != '-' && seen.contains(c) {
            return Err(format!("{} is repeated", quote(&c.to_string())));
        }
        seen.push(c);
    }
    Ok(())
}

fn context_of(ctx: &mut Ctx, node: &Node, key: &str) -> Option<SeLinuxContext> {
    let f = ctx.mapping(node, key, CONTEXT_KEYS)?;
    let mut ok = true;
    let mut ident = |ctx: &mut Ctx, name: &str| -> Option<String> {
        let n = f.value(name)?;
        let k = format!("{key}.{name}");
        let raw = ctx.scalar(n, &k, "an SELinux name")?;
        if raw.is_empty() || !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            ctx.error(
                n.span,
                &k,
                format!("{} is not a valid SELinux {name}", quote(raw)),
                "SELinux names use letters, digits and `_`, e.g. system_u or httpd_sys_content_t",
            );
            ok = false;
            return None;
        }
        Some(raw.to_string())
    };
    let user = ident(ctx, "name");
    let kind = ident(ctx, "type");
    let mut range = None;
    if let Some(n) = f.value("range") {
        let k = format!("{key}.range");
        if let Some(raw) = ctx.scalar(n, &k, "an MLS range") {
            match check_range(raw) {
                Ok(()) => range = Some(raw.to_string()),
                Err(why) => {
                    ctx.error(
                        n.span,
                        &k,
                        format!("range `{raw}` is invalid: {why}"),
                        "write LOW[-HIGH] with levels like s0 or s0:c0.c255, e.g. s0-s0:c0.c1023",
                    );
                    ok = false;
                }
            }
        }
    }
    if f.value("type").is_none() {
        ctx.error(
            node.span,
            &format!("{key}.type"),
            "an SELinux context needs a `type`".to_string(),
            "add `type: TYPE_t`, e.g. httpd_sys_content_t",
        );
        return None;
    }
    if !ok {
        return None;
    }
    Some(SeLinuxContext {
        user,
        kind: kind?,
        range,
    })
}

/// An MLS/MCS range: `LEVEL[-LEVEL]`, LEVEL = `sN[:CATS]`, CATS = `cN[.cM]` joined by `,`.
pub(crate) fn check_range(raw: &str) -> Result<(), String> {
    let levels: Vec<&str> = raw.split('-').collect();
    if levels.len() > 2 {
        return Err("more than one `-`".to_string());
    }
    let mut sens = Vec::new();
    for level in &levels {
        let (s, cats) = match level.split_once(':') {
            Some((s, c)) => (s, Some(c)),
            None => (*level, None),
        };
        sens.push(
            numbered(s, 's').ok_or_else(|| format!("{} is not a sensitivity like s0", quote(s)))?,
        );
        if let Some(cats) = cats {
            for cat in cats.split(',') {
                let (a, b) = match cat.split_once('.') {
                    Some((a, b)) => (a, Some(b)),
                    None => (cat, None),
                };
                let lo = numbered(a, 'c').ok_or_else(|| {
                    format!("{} is not a category like c0 or c0.c255", quote(cat))
                })?;
                if let Some(b) = b {
                    let hi = numbered(b, 'c').ok_or_else(|| {
                        format!("{} is not a category like c0 or c0.c255", quote(cat))
                    })?;
                    if hi < lo {
                        return Err(format!("category range `{cat}` runs backwards"));
                    }
                }
            }
        }
    }
    if sens.len() == 2 && sens[1] < sens[0] {
        return Err("the high level is below the low level".to_string());
    }
    Ok(())
}

fn numbered(s: &str, prefix: char) -> Option<u32> {
    let digits = s.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn hooks(ctx: &mut Ctx, node: &Node) -> BTreeMap<LifecycleEvent, Vec<Hook>> {
    let mut out = BTreeMap::new();
    if node.is_null() {
        return out;
    }
    let Value::Map(pairs) = &node.value else {
        ctx.error(
            node.span,
            "hooks",
            format!(
                "expected a mapping of lifecycle events, found {}",
                node.kind()
            ),
            "write each event name (e.g. ApplicationStart:) with its list of scripts under it",
        );
        return out;
    };
    let hookable: Vec<&str> = LifecycleEvent::ALL
        .iter()
        .filter(|e| e.is_hookable())
        .map(|e| e.as_str())
        .collect();
    let mut seen: HashMap<LifecycleEvent, usize> = HashMap::new();
    for (k, v) in pairs {
        let Some(name) = k.text().filter(|_| !k.is_null()) else {
            ctx.error(
                k.span,
                "hooks",
                format!("an event name must be a plain name, found {}", k.kind()),
                "use an event name such as ApplicationStart",
            );
            continue;
        };
        let key = format!("hooks.{name}");
        let ev = match name.parse::<LifecycleEvent>() {
            Ok(ev) if ev.is_hookable() => ev,
            Ok(ev) => {
                ctx.error(
                    k.span,
                    &key,
                    format!("{ev} is performed by the agent itself and cannot run scripts"),
                    "move these scripts to BeforeInstall or AfterInstall",
                );
                continue;
            }
            Err(_) => {
                let hint = match did_you_mean(name, &hookable) {
                    Some(s) => format!("did you mean `{s}`? (event names are case-sensitive)"),
                    None => format!("use one of: {}", hookable.join(", ")),
                };
                ctx.error(
                    k.span,
                    &key,
                    format!("unknown lifecycle event `{name}`"),
                    &hint,
                );
                continue;
            }
        };
        if let Some(line) = seen.get(&ev) {
            ctx.error(
                k.span,
                &key,
                format!("{ev} appears twice (first on line {line})"),
                "put all of the event's scripts in one list",
            );
            continue;
        }
        seen.insert(ev, k.span.line);
        if v.is_null() {
            ctx.warn(
                k.span,
                &key,
                format!("{ev} lists no scripts"),
                "add `- location: SCRIPT` under it, or remove the event",
            );
            continue;
        }
        let items = ctx.list(v, &key, "start each script with `- location: PATH`");
        let mut list = Vec::new();
        let mut total = 0u64;
        for (i, item) in items.iter().enumerate() {
            let hk = format!("{key}[{i}]");
            let Some(f) = ctx.mapping(item, &hk, HOOK_KEYS) else {
                continue;
            };
            if let Some(h) = hook(ctx, item, &hk, &f) {
                total = total.saturating_add(h.timeout.as_secs());
                list.push(h);
            }
        }
        if total > DEFAULT_TIMEOUT_SECS && list.len() > 1 {
            ctx.warn(
                k.span,
                &key,
                format!("the timeouts of {ev}'s scripts add up to {total} s; CodeDeploy caps one event at 3600 s (pier does not)"),
                "keep the sum at or below 3600 if the bundle must also run under CodeDeploy",
            );
        }
        if !list.is_empty() {
            out.insert(ev, list);
        }
    }
    out
}

fn hook(ctx: &mut Ctx, item: &Node, key: &str, f: &Fields) -> Option<Hook> {
    let mut ok = true;
    let location = match f.value("location") {
        None => {
            ctx.error(
                item.span,
                &format!("{key}.location"),
                "`location` is missing".to_string(),
                "add `location: scripts/NAME.sh`, the script's path in the bundle",
            );
            None
        }
        Some(n) => {
            let k = format!("{key}.location");
            ctx.scalar(n, &k, "a path in the bundle")
                .and_then(|raw| match bundle_path(raw) {
                    Ok(p) if p.is_empty() => {
                        ctx.error(
                            n.span,
                            &k,
                            format!("location `{raw}` is the bundle root, not a script"),
                            "name the script file, e.g. scripts/start.sh",
                        );
                        None
                    }
                    Ok(p) => {
                        if raw.starts_with('/') {
                            // CodeDeploy joins location to the bundle root too, but a reader
                            // may take `/opt/x.sh` for a script already on the host.
                            ctx.warn(
                                n.span,
                                &k,
                                format!("location `{raw}` is read inside the bundle, as `{p}`, not on the host"),
                                &format!("write `location: {p}`"),
                            );
                        }
                        Some(p)
                    }
                    Err(why) => {
                        ctx.error(
                            n.span,
                            &k,
                            format!("location {why}"),
                            "give the script's path inside the bundle, relative to its root",
                        );
                        None
                    }
                })
        }
    };
    let mut timeout = Duration::from_secs(DEFAULT_TIMEOUT_SECS);
    if let Some(n) = f.value("timeout") {
        let k = format!("{key}.timeout");
        match ctx.scalar(n, &k, "a number of seconds") {
            Some(raw) => match raw.trim().parse::<i64>() {
                Ok(s) if s > 0 => {
                    timeout = Duration::from_secs(s as u64);
                    if s as u64 > DEFAULT_TIMEOUT_SECS {
                        ctx.warn(n.span, &k, format!("timeout {s} s is above CodeDeploy's limit of 3600 s (pier allows it)"), "keep it at or below 3600 if the bundle must also run under CodeDeploy");
                    }
                }
                Ok(s) => {
                    ctx.error(
                        n.span,
                        &k,
                        format!("timeout must be a positive number of seconds, found {s}"),
                        "write a whole number of seconds from 1 to 3600, e.g. `timeout: 300`",
                    );
                    ok = false;
                }
                Err(_) => {
                    ctx.error(
                        n.span,
                        &k,
                        format!("timeout must be a whole number of seconds, found `{raw}`"),
                        "write a whole number of seconds from 1 to 3600, e.g. `timeout: 300`",
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    let mut runas = None;
    if let Some(n) = f.value("runas") {
        let k = format!("{key}.runas");
        match ctx.scalar(n, &k, "a user name") {
            Some(raw)
                if !raw.is_empty()
                    && !raw
                        .chars()
                        .any(|c| c.is_whitespace() || c == ':' || c == '/') =>
            {
                runas = Some(raw.to_string())
            }
            Some(raw) => {
                ctx.error(n.span, &k, format!("{} is not a valid user name", quote(raw)), "write one user name, e.g. www-data, or remove runas to run as the agent's user");
                ok = false;
            }
            None => ok = false,
        }
    }
    let location = location?;
    ok.then_some(Hook {
        location,
        timeout,
        runas,
        span: item.span,
    })
}

/// The checks that need the bundle and the host: each `files` source and hook `location`
/// must exist in the bundle (`bundle_has` takes a normalized bundle-relative path), and each
/// `runas` user on the host. With `user_exists` None (validating off-host) users are not
/// checked and a warning says so.
pub fn check_environment(
    file: &str,
    spec: &AppSpec,
    bundle_has: &dyn Fn(&str) -> bool,
    user_exists: Option<&dyn Fn(&str) -> bool>,
) -> Vec<Diagnostic> {
    let mut ctx = Ctx {
        file,
        diags: Vec::new(),
    };
    for (i, m) in spec.files.iter().enumerate() {
        if !m.source.is_empty() && !bundle_has(&m.source) {
            ctx.error(
                m.span,
                &format!("files[{i}].source"),
                format!("{} does not exist in the bundle", quote(&m.source)),
                "add it to the bundle, or fix the path (relative to the bundle root); a symlink on the way must stay inside the bundle",
            );
        }
    }
    for (ev, hooks) in &spec.hooks {
        for (i, h) in hooks.iter().enumerate() {
            let key = format!("hooks.{ev}[{i}]");
            if !bundle_has(&h.location) {
                ctx.error(
                    h.span,
                    &format!("{key}.location"),
                    format!("script {} does not exist in the bundle", quote(&h.location)),
                    "add the script to the bundle, or fix the path (relative to the bundle root); a symlink on the way must stay inside the bundle",
                );
            }
            if let Some(user) = &h.runas {
                match user_exists {
                    Some(exists) if !exists(user) => ctx.error(
                        h.span,
                        &format!("{key}.runas"),
                        format!("user `{user}` does not exist on this host"),
                        "create the user (useradd) before deploying, or change runas",
                    ),
                    Some(_) => {}
                    None => ctx.warn(
                        h.span,
                        &format!("{key}.runas"),
                        format!("user `{user}` not checked: validating off-host"),
                        "make sure the user exists on every target host",
                    ),
                }
            }
        }
    }
    ctx.diags.sort_by_key(|d| d.span);
    ctx.diags
}

/// The checks that need to know which bundle paths are files (`is_file` takes a normalized
/// bundle-relative path): `pattern`/`except` only make sense on a directory object, so a
/// permission whose object is where a file source lands may not have them; and two file
/// sources with the same name may not land in the same destination.
pub fn check_file_objects(
    file: &str,
    spec: &AppSpec,
    is_file: &dyn Fn(&str) -> bool,
) -> Vec<Diagnostic> {
    let mut ctx = Ctx {
        file,
        diags: Vec::new(),
    };
    // Where each file source lands: destination/NAME.
    let landed: Vec<(usize, PathBuf)> = spec
        .files
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.source.is_empty() && is_file(&m.source))
        .map(|(i, m)| {
            let name = Path::new(&m.source).file_name().unwrap_or_default();
            (i, m.destination.join(name))
        })
        .collect();
    for (a, (i, path)) in landed.iter().enumerate() {
        if let Some((j, _)) = landed[..a].iter().find(|(_, p)| p == path) {
            let m = &spec.files[*i];
            ctx.error(
                m.span,
                &format!("files[{i}]"),
                format!(
                    "`{}` and files[{j}]'s `{}` would both be installed as `{}`",
                    m.source,
                    spec.files[*j].source,
                    path.display()
                ),
                "give one of them another destination",
            );
        }
    }
    for (i, p) in spec.permissions.iter().enumerate() {
        if p.pattern.is_none() && p.except.is_empty() {
            continue;
        }
        if let Some((j, _)) = landed.iter().find(|(_, path)| *path == p.object) {
            ctx.error(
                p.span,
                &format!("permissions[{i}]"),
                format!(
                    "`{}` is a file (installed from files[{j}]) and pattern/except apply only to directory objects",
                    p.object.display()
                ),
                "remove pattern and except, or make object the directory that holds the file",
            );
        }
    }
    ctx.diags.sort_by_key(|d| d.span);
    ctx.diags
}
