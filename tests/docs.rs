//! The README documents what the code does: every error code and every metric.

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

#[test]
fn every_error_code_is_in_the_readme_table() {
    let readme = readme();
    for e in liveness_gateway::error::catalogue() {
        let row = format!("| {} | `{}` |", e.status().as_u16(), e.code());
        assert!(readme.contains(&row), "README lacks the row {row}");
    }
}

#[test]
fn every_metric_is_in_the_readme_reference() {
    let readme = readme();
    let metrics = liveness_gateway::metrics::Metrics::new().expect("metrics");
    // Series that exist only once something happens.
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
    let text = String::from_utf8(metrics.render()).expect("utf8");
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(names.len() >= 16);
    for name in names {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README lacks the metric {name}"
        );
    }
}
