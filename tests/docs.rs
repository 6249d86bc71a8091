//! The manual documents what the code does, and holds together: every error code of the
//! catalogue is a row of the error table in docs/clients.md, every refusal of the provider a row
//! of its table, and every one of both in one row of what to show the user; every metric is a
//! row of the metrics table in docs/observability.md, none with a row the code lacks; every relative
//! link and `#anchor` in README.md, docs/, tests/README.md and benches/README.md points at a file
//! and a heading that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn parser(text: &str) -> Parser<'_> {
    Parser::new_ext(text, Options::ENABLE_TABLES)
}

/// A table cell: its text (inline code without its backticks), and its inline code spans.
#[derive(Default)]
struct Cell {
    text: String,
    codes: Vec<String>,
}

/// The body rows of the tables whose header cells are `header`, each row as its cells.
fn table_cells(text: &str, header: &[&str]) -> Vec<Vec<Cell>> {
    let mut tables: Vec<(Vec<Cell>, Vec<Vec<Cell>>)> = Vec::new();
    let mut row: Vec<Cell> = Vec::new();
    let mut cell: Option<Cell> = None;
    for event in parser(text) {
        match event {
            Event::Start(Tag::Table(_)) => tables.push((Vec::new(), Vec::new())),
            Event::Start(Tag::TableHead) | Event::Start(Tag::TableRow) => row.clear(),
            Event::Start(Tag::TableCell) => cell = Some(Cell::default()),
            Event::Text(t) => {
                if let Some(c) = cell.as_mut() {
                    c.text.push_str(&t);
                }
            }
            Event::Code(t) => {
                if let Some(c) = cell.as_mut() {
                    c.text.push_str(&t);
                    c.codes.push(t.to_string());
                }
            }
            Event::End(TagEnd::TableCell) => row.extend(cell.take()),
            Event::End(TagEnd::TableHead) => {
                if let Some(t) = tables.last_mut() {
                    t.0 = std::mem::take(&mut row);
                }
            }
            Event::End(TagEnd::TableRow) => {
                if let Some(t) = tables.last_mut() {
                    t.1.push(std::mem::take(&mut row));
                }
            }
            _ => {}
        }
    }
    tables
        .into_iter()
        .filter(|(head, _)| {
            head.iter()
                .map(|c| c.text.as_str())
                .eq(header.iter().copied())
        })
        .flat_map(|(_, rows)| rows)
        .collect()
}

/// The body rows of the tables whose header cells are `header`, each row as its cells' text
/// (inline code without its backticks).
fn table_rows(text: &str, header: &[&str]) -> Vec<Vec<String>> {
    table_cells(text, header)
        .into_iter()
        .map(|row| row.into_iter().map(|c| c.text).collect())
        .collect()
}

/// The codes of the provider's documented refusals, as the gateway names them.
fn refusal_codes() -> BTreeSet<String> {
    liveness_gateway::verdict::UpstreamClass::ALL
        .iter()
        .filter(|c| c.is_unbilled_refusal())
        .map(|c| format!("upstream_{}", c.as_str()))
        .collect()
}

#[test]
fn the_error_table_has_one_row_per_code_of_the_catalogue() {
    let page = "docs/clients.md";
    let rows = table_rows(&read(page), &["status", "code", "meaning", "retry"]);
    let documented: Vec<(String, String)> =
        rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let catalogue: BTreeSet<(String, String)> = liveness_gateway::error::catalogue()
        .iter()
        .map(|e| (e.status().as_u16().to_string(), e.code().to_string()))
        .collect();
    for row in &catalogue {
        assert!(
            documented.contains(row),
            "{page}: the error table lacks the row | {} | `{}` |",
            row.0,
            row.1
        );
    }
    for row in &documented {
        assert!(
            catalogue.contains(row),
            "{page}: the error table has a row for | {} | `{}` |, which src/error.rs does not answer",
            row.0,
            row.1
        );
    }
    assert_eq!(documented.len(), catalogue.len(), "{page}: a code twice");
    // The OpenAPI spec's list of codes is the same.
    let spec = read("deploy/openapi.yaml");
    let listed: BTreeSet<String> = spec
        .split("description: A stable code for programs.")
        .nth(1)
        .and_then(|rest| rest.split("enum: [").nth(1))
        .and_then(|rest| rest.split(']').next())
        .expect("the GatewayError code enum")
        .split(',')
        .map(|c| c.trim().to_string())
        .collect();
    let codes: BTreeSet<String> = catalogue.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        listed, codes,
        "deploy/openapi.yaml: GatewayError.code's enum"
    );
    for r in &rows {
        assert!(
            r.iter().all(|c| !c.trim().is_empty()),
            "{page}: an empty cell in {r:?}"
        );
    }
}

#[test]
fn the_provider_refusals_table_has_one_row_per_refusal() {
    let page = "docs/clients.md";
    let rows = table_rows(
        &read(page),
        &["status", "code", "the provider's detail", "retry"],
    );
    let documented: BTreeSet<String> = rows.iter().map(|r| r[1].clone()).collect();
    assert_eq!(documented.len(), rows.len(), "{page}: a refusal twice");
    assert_eq!(
        documented,
        refusal_codes(),
        "{page}: the provider's refusals"
    );
}

/// Every code a client can get, the gateway's and the provider's refusals, is in exactly one
/// row of "What to show the user", and every row says something in each column.
#[test]
fn what_to_show_the_user_covers_every_code_once() {
    let page = "docs/clients.md";
    let rows = table_cells(&read(page), &["codes", "show the user", "the app does"]);
    assert!(rows.len() >= 5, "{page}: no table of what to show the user");
    let mut every: BTreeSet<String> = liveness_gateway::error::catalogue()
        .iter()
        .map(|e| e.code().to_string())
        .collect();
    every.extend(refusal_codes());
    let mut shown: Vec<String> = Vec::new();
    for row in &rows {
        assert!(
            row.len() == 3 && row.iter().all(|c| !c.text.trim().is_empty()),
            "{page}: an empty cell in the row of {:?}",
            row.first().map(|c| &c.codes)
        );
        assert!(!row[0].codes.is_empty(), "{page}: a row without codes");
        shown.extend(row[0].codes.iter().cloned());
    }
    for code in &every {
        let times = shown.iter().filter(|c| *c == code).count();
        assert_eq!(
            times, 1,
            "{page}: `{code}` is in {times} rows of what to show the user, not 1"
        );
    }
    for code in &shown {
        assert!(
            every.contains(code),
            "{page}: what to show the user has `{code}`, which is no code of the gateway's"
        );
    }
}

#[test]
fn the_metrics_table_has_one_row_per_metric_with_its_type() {
    let page = "docs/observability.md";
    let metrics = liveness_gateway::metrics::Metrics::new().expect("metrics");
    // Series that exist only once something happens, or that their owners put at zero (the
    // breaker's transitions, the reasons `auth` refuses a token for).
    metrics
        .circuit_transitions
        .with_label_values(&["open"])
        .inc();
    metrics.init_token_failures(["expired"]);
    metrics
        .budget_remaining
        .with_label_values(&["t", "daily"])
        .set(1);
    metrics
        .budget_limit
        .with_label_values(&["t", "daily"])
        .set(1);
    metrics
        .rejected
        .with_label_values(&["t", "not_an_image"])
        .inc();
    metrics.circuit_state.with_label_values(&["closed"]).set(1);
    metrics.init_org_key("default");
    metrics
        .org_key_lapsed
        .with_label_values(&["default"])
        .set(0);
    metrics
        .tls_certificate_expiry
        .with_label_values::<&str>(&[])
        .set(1);
    metrics
        .auth_tokens_verified
        .with_label_values(&["issuer"])
        .inc();
    metrics
        .jwks_fetches
        .with_label_values(&["issuer", "ok"])
        .inc();
    metrics
        .webhook_deliveries
        .with_label_values(&["ops", "budget.threshold", "delivered"])
        .inc();
    let text = String::from_utf8(metrics.render()).expect("utf8");
    let exported: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    assert!(exported.len() >= 16);
    let rows = table_rows(&read(page), &["metric", "type", "labels", "meaning"]);
    let documented: BTreeMap<String, String> =
        rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(documented.len(), rows.len(), "{page}: a metric twice");
    for (name, kind) in &exported {
        assert_eq!(
            documented.get(name),
            Some(kind),
            "{page}: the metrics table lacks the row | `{name}` | {kind} |"
        );
    }
    // The process collector leaves out what the system does not say (an unlimited address
    // space has no `process_virtual_memory_max_bytes`).
    for name in documented.keys().filter(|n| !n.starts_with("process_")) {
        assert!(
            exported.contains_key(name),
            "{page}: the metrics table has a row for {name}, which the gateway does not export \
             (or this test does not create its first series)"
        );
    }
}

/// The Markdown files whose links are checked, relative to the repository.
fn manual() -> BTreeMap<PathBuf, String> {
    let mut files: Vec<PathBuf> = ["README.md", "tests/README.md", "benches/README.md"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(PathBuf::from("docs").join(path.file_name().expect("name")));
        }
    }
    files
        .into_iter()
        .map(|f| {
            let text = read(&f.to_string_lossy());
            (f, text)
        })
        .collect()
}

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and `_` kept, each space a
/// `-`, everything else dropped; a repeated heading gets `-1`, `-2`… (no crate computes it).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut heading: Option<String> = None;
    for event in parser(text) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let Some(h) = heading.take() else { continue };
                let slug: String = h
                    .trim()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect();
                let mut anchor = slug.clone();
                let mut n = 0;
                while seen.contains(&anchor) {
                    n += 1;
                    anchor = format!("{slug}-{n}");
                }
                seen.insert(anchor);
            }
            _ => {}
        }
    }
    seen
}

/// `a/b/../c` as `a/c`, without asking the file system.
fn normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every relative link of `files` whose file, or whose heading, does not exist. A target that is
/// not one of `files` is looked for in the repository.
fn broken_links(files: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let mut broken = Vec::new();
    for (file, text) in files {
        for event in parser(text) {
            let dest = match event {
                Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => dest_url,
                _ => continue,
            };
            if dest.contains("://") || dest.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = dest.split_once('#').unwrap_or((&dest, ""));
            let target = if path.is_empty() {
                file.clone()
            } else {
                normal(&file.parent().unwrap_or(Path::new("")).join(path))
            };
            let here = files.get(&target).cloned().or_else(|| {
                let on_disk = Path::new(ROOT).join(&target);
                if on_disk.is_file() {
                    std::fs::read_to_string(on_disk).ok()
                } else if on_disk.is_dir() {
                    Some(String::new())
                } else {
                    None
                }
            });
            let Some(content) = here else {
                broken.push(format!(
                    "{}: ({dest}): no file {}",
                    file.display(),
                    target.display()
                ));
                continue;
            };
            if !anchor.is_empty() && !anchors(&content).contains(anchor) {
                broken.push(format!(
                    "{}: ({dest}): {} has no heading #{anchor}",
                    file.display(),
                    target.display()
                ));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_and_anchor_of_the_manual_exists() {
    let files = manual();
    assert!(files.len() >= 10, "{:?}", files.keys());
    let broken = broken_links(&files);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_page_of_docs_is_in_its_table_of_contents() {
    let toc = read("docs/README.md");
    for file in manual().keys() {
        if file.starts_with("docs") && !file.ends_with("README.md") {
            let name = file.file_name().expect("name").to_string_lossy();
            assert!(
                toc.contains(&format!("]({name})")),
                "docs/README.md does not list {name}"
            );
        }
    }
}

#[test]
fn the_link_check_finds_a_missing_file_and_a_missing_heading() {
    let files: BTreeMap<PathBuf, String> = [
        (
            PathBuf::from("docs/a.md"),
            "# A\n\n## Two words\n\nSee [b](b.md#real), [gone](gone.md), [none](b.md#nowhere), \
             [self](#two-words), [up](../README.md#quick-start) and `[code](x.md)`.\n"
                .to_string(),
        ),
        (
            PathBuf::from("docs/b.md"),
            "# B\n\n## Real\n\n## Real\n\n[twice](#real-1) [web](https://example.com/x.md)\n"
                .to_string(),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        broken_links(&files),
        [
            "docs/a.md: (gone.md): no file docs/gone.md",
            "docs/a.md: (b.md#nowhere): docs/b.md has no heading #nowhere",
        ]
    );
}
