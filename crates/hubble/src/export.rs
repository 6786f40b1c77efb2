//! Flow export to a JSON-lines file (upstream's `hubble.export`): one
//! GetFlowsResponse per line, allow/deny filters, rotation by size into
//! numbered backups (`flows.json.1` newest), appending across restarts.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::filter::{FilterError, Filters};
use crate::proto::flow::{Flow, FlowFilter};
use crate::proto::observer::{GetFlowsResponse, get_flows_response::ResponseTypes};

/// Export settings.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub path: PathBuf,
    pub max_size_bytes: u64,
    pub max_backups: u32,
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
}

/// Reads `--hubble-export-allowlist`-style JSON: one FlowFilter object, a
/// list of them, or several objects separated by commas/newlines.
pub fn parse_filters(field: &'static str, text: &str) -> Result<Vec<FlowFilter>, FilterError> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let as_list = if t.starts_with('[') {
        t.to_string()
    } else {
        format!("[{}]", t.replace("}\n{", "},{").replace("} {", "},{"))
    };
    let v: Vec<FlowFilter> = serde_json::from_str(&as_list).map_err(|e| FilterError {
        field,
        value: text.to_string(),
        reason: e.to_string(),
    })?;
    Filters::new(&v, &[])?;
    Ok(v)
}

/// The exporter.
#[derive(Debug)]
pub struct Exporter {
    cfg: ExportConfig,
    filters: Filters,
    file: File,
    size: u64,
}

fn backup(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Exporter {
    pub fn open(cfg: ExportConfig) -> anyhow::Result<Exporter> {
        let filters = Filters::new(&cfg.allow, &cfg.deny)?;
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)?;
        let size = file.metadata()?.len();
        Ok(Exporter {
            cfg,
            filters,
            file,
            size,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.cfg.max_backups == 0 {
            self.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.cfg.path)?;
        } else {
            let _ = std::fs::remove_file(backup(&self.cfg.path, self.cfg.max_backups));
            for n in (1..self.cfg.max_backups).rev() {
                let _ = std::fs::rename(backup(&self.cfg.path, n), backup(&self.cfg.path, n + 1));
            }
            std::fs::rename(&self.cfg.path, backup(&self.cfg.path, 1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.cfg.path)?;
        }
        self.size = 0;
        Ok(())
    }

    /// Writes the flow if the filters let it through; returns whether it did.
    pub fn export(&mut self, f: &Flow) -> std::io::Result<bool> {
        if !self.filters.matches(f) {
            return Ok(false);
        }
        let resp = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(f.clone())),
            node_name: f.node_name.clone(),
            time: f.time,
        };
        let mut line = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.cfg.max_size_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(true)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::Verdict;

    #[test]
    fn rotates_by_size_keeps_backups_and_filters() {
        let dir = std::env::temp_dir().join(format!("hubble-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("flows.json");
        let allow = parse_filters("allowlist", r#"{"verdict":["DROPPED"]}"#).unwrap();
        let mut e = Exporter::open(ExportConfig {
            path: path.clone(),
            max_size_bytes: 300,
            max_backups: 2,
            allow,
            deny: vec![],
        })
        .unwrap();
        let dropped = Flow {
            verdict: Verdict::Dropped as i32,
            node_name: "n1".into(),
            ..Default::default()
        };
        let forwarded = Flow {
            verdict: Verdict::Forwarded as i32,
            ..Default::default()
        };
        assert!(!e.export(&forwarded).unwrap());
        for _ in 0..20 {
            assert!(e.export(&dropped).unwrap());
        }
        e.flush().unwrap();
        assert!(path.exists() && backup(&path, 1).exists() && backup(&path, 2).exists());
        assert!(!backup(&path, 3).exists());
        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["flow"]["verdict"], "DROPPED");
        assert_eq!(first["node_name"], "n1");
        assert!(std::fs::metadata(&path).unwrap().len() <= 300);
        // reopening appends
        let before = std::fs::metadata(&path).unwrap().len();
        drop(e);
        let mut e = Exporter::open(ExportConfig {
            path: path.clone(),
            max_size_bytes: 10_000,
            max_backups: 2,
            allow: vec![],
            deny: vec![],
        })
        .unwrap();
        e.export(&forwarded).unwrap();
        e.flush().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_filter_names_the_field() {
        let e = parse_filters("allowlist", r#"{"verdict":["NOPE"]}"#).unwrap_err();
        assert_eq!(e.field, "allowlist");
        let e = parse_filters("denylist", r#"{"source_ip":["10.0.0.300"]}"#).unwrap_err();
        assert_eq!(e.field, "source_ip");
    }
}
