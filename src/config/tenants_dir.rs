//! `tenants_dir`: a folder of `*.toml` files, each holding `[[tenants]]` tables (one team's,
//! say), read with the main file and checked with it as one config, so that a reload takes all
//! of it or none. A problem in one of them is named by its file and line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{span_hint, unknown_key, ConfigIssue, RawTenant};

/// Where a tenant read from the folder was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantOrigin {
    pub file: PathBuf,
    /// Its place among the file's `[[tenants]]`.
    pub index: usize,
    /// The line of its `[[tenants]]`.
    pub line: Option<usize>,
}

/// The `*.toml` files of `dir`, by name (a name need not be UTF-8). Hidden entries are
/// skipped: a Kubernetes ConfigMap mounts its files beside `..data` and `..<timestamp>`
/// folders, which hold them again.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        if !name.starts_with(b".") && name.ends_with(b".toml") && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The folder the config file at `path` names in `tenants_dir` now, resolved against its
/// folder; none when it names none or cannot be read (the watch then keeps to the one in
/// force).
pub fn named_by(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table = text.parse::<toml::Table>().ok()?;
    let dir = PathBuf::from(table.get("tenants_dir")?.as_str()?);
    Some(match dir.is_relative() {
        true => path.parent().unwrap_or(Path::new("")).join(dir),
        false => dir,
    })
}

/// The tenants of every file of `dir` in order, with where each was written; or every problem
/// of every file, each path starting with its file.
pub fn read(dir: &Path) -> Result<(Vec<RawTenant>, Vec<TenantOrigin>), Vec<ConfigIssue>> {
    let cannot = |e: std::io::Error| {
        vec![ConfigIssue {
            path: "tenants_dir".into(),
            message: format!("cannot read the folder {}: {e}", dir.display()),
        }]
    };
    let (mut tenants, mut origins, mut issues) = (Vec::new(), Vec::new(), Vec::new());
    for file in files(dir).map_err(cannot)? {
        let named = |i: ConfigIssue| ConfigIssue {
            path: format!("{}: {}", file.display(), i.path),
            message: i.message,
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                issues.push(ConfigIssue {
                    path: file.display().to_string(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse(&text) {
            Ok(read) => {
                let lines = tenant_lines(&text);
                for (index, t) in read.into_iter().enumerate() {
                    origins.push(TenantOrigin {
                        file: file.clone(),
                        index,
                        line: lines.get(index).copied(),
                    });
                    tenants.push(t);
                }
            }
            Err(found) => issues.extend(found.into_iter().map(named)),
        }
    }
    match issues.is_empty() {
        true => Ok((tenants, origins)),
        false => Err(issues),
    }
}

/// One file's `[[tenants]]`: every problem found, each with its line, or the tenants.
fn parse(text: &str) -> Result<Vec<RawTenant>, Vec<ConfigIssue>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        tenants: Vec<RawTenant>,
    }
    // Anything but `[[tenants]]` at the top is refused: a `[server]` copied into a team's file
    // would otherwise be silently ignored.
    let mut issues = Vec::new();
    match text.parse::<toml::Table>() {
        Ok(table) => {
            for key in table.keys().filter(|k| *k != "tenants") {
                let line = super::line_of(text, &[key.as_str()])
                    .map(|n| format!(" (line {n})"))
                    .unwrap_or_default();
                issues.push(ConfigIssue {
                    path: key.clone(),
                    message: format!(
                        "a tenants_dir file holds only [[tenants]] tables{line}; this belongs in the main config file"
                    ),
                });
            }
        }
        Err(e) => {
            return Err(vec![ConfigIssue {
                path: "(file)".into(),
                message: super::unquoted(&e.message().replace('\n', " "))
                    + &span_hint(text, e.span()),
            }])
        }
    }
    let mut unknown = Vec::new();
    let parsed: Result<File, _> =
        serde_ignored::deserialize(toml::Deserializer::new(text), |path| {
            unknown.push(path.to_string())
        });
    match parsed {
        Ok(file) => {
            for p in unknown {
                let segments: Vec<&str> = p.split('.').filter(|s| *s != "?").collect();
                if segments.first() != Some(&"tenants") {
                    continue; // said above
                }
                let line = super::line_of(text, &segments)
                    .map(|n| format!(" (line {n})"))
                    .unwrap_or_default();
                issues.push(ConfigIssue {
                    path: super::dotted(&segments),
                    message: unknown_key(&segments, &line),
                });
            }
            match issues.is_empty() {
                true => Ok(file.tenants),
                false => Err(issues),
            }
        }
        Err(_) => {
            let mut found = Vec::new();
            super::tenant_errors(text, &mut found);
            super::unknown_key_errors(text, &mut found);
            // Only the tenants' own problems: the other keys were named above.
            issues.extend(found.into_iter().filter(|i| i.path.starts_with("tenants")));
            Err(issues)
        }
    }
}

/// The line of each `[[tenants]]` of a file that parses.
fn tenant_lines(text: &str) -> Vec<usize> {
    #[derive(Deserialize)]
    struct Spans {
        #[serde(default)]
        tenants: Vec<toml::Spanned<toml::Table>>,
    }
    toml::from_str::<Spans>(text)
        .map(|s| {
            s.tenants
                .iter()
                .map(|t| 1 + text[..t.span().start.min(text.len())].matches('\n').count())
                .collect()
        })
        .unwrap_or_default()
}

/// Name the file and line of each problem of a tenant read from the folder: in the config's
/// list of tenants, those from `first` on came from the folder, in the order of `origins`, and
/// `tenants[N]…` of one of them becomes `<file>: tenants[i]…`, with its `[[tenants]]` line.
pub fn locate(
    issues: Vec<ConfigIssue>,
    first: usize,
    origins: &[TenantOrigin],
) -> Vec<ConfigIssue> {
    issues
        .into_iter()
        .map(|issue| {
            let Some(rest) = issue.path.strip_prefix("tenants[") else {
                return issue;
            };
            let Some((n, after)) = rest.split_once(']') else {
                return issue;
            };
            let Some(origin) = n
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(first))
                .and_then(|i| origins.get(i))
            else {
                return issue;
            };
            let line = match (origin.line, issue.message.contains("(line ")) {
                (Some(l), false) => format!(" (the tenant at line {l})"),
                _ => String::new(),
            };
            ConfigIssue {
                path: format!(
                    "{}: tenants[{}]{after}",
                    origin.file.display(),
                    origin.index
                ),
                message: format!("{}{line}", issue.message),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigErrors};
    use std::path::Path;

    fn env(_: &str) -> Option<String> {
        Some("org-key-for-tests".into())
    }

    fn digest(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// A main file naming `tenants.d` beside it, with tenant "main", and the given team files.
    fn folder(files: &[(&str, String)]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let main = format!(
            "tenants_dir = \"tenants.d\"\n[upstream]\nurl = \"http://127.0.0.1:8081\"\napi_key_env = \"ORG_KEY\"\n[[tenants]]\nid = \"main\"\nkey_sha256 = [\"{}\"]\n",
            digest(1)
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, main).expect("main");
        std::fs::create_dir(dir.path().join("tenants.d")).expect("folder");
        for (name, text) in files {
            std::fs::write(dir.path().join("tenants.d").join(name), text).expect("file");
        }
        (dir, path)
    }

    fn team(id: &str, n: u8) -> String {
        format!(
            "[[tenants]]\nid = \"{id}\"\nkey_sha256 = [\"{}\"]\n",
            digest(n)
        )
    }

    fn problems(path: &Path) -> Vec<String> {
        match Config::load(path, &env) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(issues)) => issues.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_folder_s_tenants_join_the_main_file_s_in_file_order() {
        let (dir, path) = folder(&[
            ("b-team.toml", team("beta", 3) + &team("gamma", 4)),
            ("a-team.toml", team("alpha", 2)),
            (".hidden.toml", "not = [valid".into()),
            ("notes.txt", "not toml at all".into()),
        ]);
        let cfg = Config::load(&path, &env).expect("valid");
        let ids: Vec<&str> = cfg.tenants.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["main", "alpha", "beta", "gamma"]);
        assert_eq!(cfg.tenants_dir, Some(dir.path().join("tenants.d")));
    }

    #[test]
    fn a_broken_file_refuses_the_whole_config_and_is_named_with_its_line() {
        let broken = format!(
            "{}\n[[tenants]]\nid = \"delta\"\nkey_sha256 = [\"{}\"]\nrate = 5\n",
            team("gamma", 4),
            digest(5)
        );
        let (dir, path) = folder(&[("a-team.toml", team("alpha", 2)), ("c-team.toml", broken)]);
        let found = problems(&path);
        let file = dir.path().join("tenants.d/c-team.toml");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!("{}: tenants[1]", file.display())),
            "{found:?}"
        );
        assert!(found[0].contains("(line 8)"), "{found:?}");
    }

    #[test]
    fn a_problem_found_by_the_checks_names_the_file_and_the_tenant_s_line() {
        let bad_digest = "\n\n[[tenants]]\nid = \"beta\"\nkey_sha256 = [\"abc\"]\n".to_string();
        let (dir, path) = folder(&[
            ("a.toml", team("alpha", 2)),
            ("b.toml", bad_digest),
            ("c.toml", team("main", 6)),
        ]);
        let found = problems(&path);
        let folder = dir.path().join("tenants.d");
        let b = format!(
            "{}: tenants[0].key_sha256[0]",
            folder.join("b.toml").display()
        );
        let c = format!("{}: tenants[0].id", folder.join("c.toml").display());
        assert!(
            found
                .iter()
                .any(|f| f.starts_with(&b) && f.ends_with("(the tenant at line 3)")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.starts_with(&c) && f.contains("\"main\" is used twice")),
            "{found:?}"
        );
    }

    #[test]
    fn only_tenants_and_known_keys_go_in_a_team_file() {
        let text = format!(
            "[server]\nlisten = \"0.0.0.0:1\"\n{}daily_budgt = 5\n",
            team("alpha", 2)
        );
        let (_dir, path) = folder(&[("a.toml", text)]);
        let found = problems(&path).join("\n");
        assert!(
            found.contains(
                "a.toml: server: a tenants_dir file holds only [[tenants]] tables (line 1)"
            ),
            "{found}"
        );
        assert!(
            found.contains(
                "a.toml: tenants[0].daily_budgt: unknown key (line 6); did you mean daily_budget?"
            ),
            "{found}"
        );
        let (_dir, path) = folder(&[("a.toml", "[[tenants]\n".into())]);
        assert!(
            problems(&path)[0].contains("a.toml: (file): "),
            "{:?}",
            problems(&path)
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_and_no_secret_repeated() {
        let secret = "ORG-KEY-d41d8cd98f00b204e9800998ecf8427e";
        let text = format!(
            "[server]\nlisten = \"0.0.0.0:1\"\n{}burst = \"x\"\n\n{}org_key = \"{secret}\"\n",
            team("alpha", 2),
            team("beta", 3)
        );
        let (_dir, path) = folder(&[("a.toml", text)]);
        let found = problems(&path).join("\n");
        assert!(found.contains("a.toml: server: "), "{found}");
        assert!(
            found.contains("a.toml: tenants[0]") && found.contains("burst"),
            "{found}"
        );
        assert!(!found.contains(secret), "{found}");
        let valid_types = format!("{}org_key = \"{secret}\"\n", team("beta", 3));
        let (_dir, path) = folder(&[("b.toml", valid_types)]);
        let found = problems(&path).join("\n");
        assert!(
            found
                .contains("b.toml: tenants[0].org_key: the value given is not an organization key"),
            "{found}"
        );
        assert!(!found.contains(secret), "{found}");
    }

    #[test]
    fn a_file_name_need_not_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let (dir, path) = folder(&[]);
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.toml");
        std::fs::write(dir.path().join("tenants.d").join(name), team("cafe", 7)).expect("write");
        let cfg = Config::load(&path, &env).expect("valid");
        assert!(cfg.tenants.iter().any(|t| t.id == "cafe"));
    }

    #[test]
    fn a_missing_folder_is_said() {
        let (dir, path) = folder(&[]);
        std::fs::remove_dir(dir.path().join("tenants.d")).expect("rm");
        let found = problems(&path);
        assert!(
            found[0].starts_with("tenants_dir: cannot read the folder"),
            "{found:?}"
        );
    }
}
