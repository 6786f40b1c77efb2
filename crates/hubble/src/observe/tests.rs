use super::*;

fn p(args: &[&str]) -> Result<ObserveArgs, ArgError> {
    parse(
        &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        chrono::Utc::now(),
    )
}

#[test]
fn defaults_to_the_last_20_and_follow_to_new_flows_only() {
    let o = p(&[]).unwrap();
    assert_eq!(
        (
            o.request.number,
            o.request.follow,
            o.request.whitelist.len()
        ),
        (20, false, 0)
    );
    let o = p(&["-f"]).unwrap();
    assert_eq!((o.request.number, o.request.follow), (0, true));
    let o = p(&["--last", "5", "--follow"]).unwrap();
    assert_eq!((o.request.number, o.request.follow), (5, true));
    let o = p(&["--first", "3"]).unwrap();
    assert!(o.request.first && o.request.number == 3);
    assert_eq!(p(&["--all"]).unwrap().request.number, u64::MAX);
    assert!(p(&["--since", "1m"]).unwrap().request.since.is_some());
}

#[test]
fn namespace_splits_into_source_or_destination() {
    let o = p(&["--namespace", "production", "--verdict", "DROPPED"]).unwrap();
    let w = &o.request.whitelist;
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].source_pod, vec!["production/"]);
    assert_eq!(w[1].destination_pod, vec!["production/"]);
    assert!(
        w.iter()
            .all(|f| f.verdict == vec![crate::proto::flow::Verdict::Dropped as i32])
    );
}

#[test]
fn from_and_to_flags_share_one_filter() {
    let o = p(&[
        "--from-label",
        "app=frontend",
        "--to-label",
        "app=backend",
        "--protocol",
        "tcp",
    ])
    .unwrap();
    let w = &o.request.whitelist;
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].source_label, vec!["app=frontend"]);
    assert_eq!(w[0].destination_label, vec!["app=backend"]);
    let o = p(&["--from-pod", "frontend", "-n", "shop"]).unwrap();
    assert_eq!(o.request.whitelist[0].source_pod, vec!["shop/frontend"]);
}

#[test]
fn not_negates_the_next_filter_flag() {
    let o = p(&["--not", "--verdict", "FORWARDED", "--protocol", "tcp"]).unwrap();
    assert_eq!(o.request.blacklist.len(), 1);
    assert_eq!(
        o.request.blacklist[0].verdict,
        vec![crate::proto::flow::Verdict::Forwarded as i32]
    );
    assert_eq!(o.request.whitelist[0].protocol, vec!["tcp"]);
}

#[test]
fn types_and_outputs() {
    let o = p(&["-t", "trace:to-endpoint", "-o", "json", "--type=drop"]).unwrap();
    let et = &o.request.whitelist[0].event_type;
    assert_eq!(
        (et[0].r#type, et[0].match_sub_type, et[0].sub_type),
        (4, true, 0)
    );
    assert_eq!(et[1].r#type, 1);
    assert_eq!(o.output, crate::printer::Format::Json);
}

#[test]
fn errors_name_the_flag_and_value() {
    let e = p(&["--type", "dns"]).unwrap_err();
    assert_eq!((e.flag.as_str(), e.value.as_str()), ("type", "dns"));
    assert_eq!(p(&["--verdict", "MAYBE"]).unwrap_err().flag, "verdict");
    assert_eq!(p(&["--port", "http"]).unwrap_err().flag, "port");
    assert_eq!(p(&["--since", "yesterday"]).unwrap_err().flag, "since");
    assert_eq!(p(&["--output", "xml"]).unwrap_err().flag, "output");
    assert_eq!(p(&["--bogus"]).unwrap_err().flag, "bogus");
    assert_eq!(p(&["--last"]).unwrap_err().reason, "needs a value");
    // found by the fuzz target: a multi-byte shorthand
    assert_eq!(p(&["-Ցamespace"]).unwrap_err().reason, "unknown shorthand flag");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("5"), None);
}
