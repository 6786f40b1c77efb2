//! Compiles every `bpf/*.c` into an object with BTF, for the crate to embed.
//! Needs clang (CLANG overrides the binary; default clang-19, then clang).

use std::path::{Path, PathBuf};
use std::process::Command;

fn clang() -> String {
    if let Ok(c) = std::env::var("CLANG") {
        return c;
    }
    for c in ["clang-19", "clang"] {
        if Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return c.to_string();
        }
    }
    panic!("clang not found: install clang-19 (apt-get install -y clang-19 libbpf-dev) or set CLANG");
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let bpf = manifest.join("../../bpf").canonicalize().expect("bpf/ directory");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = clang();
    let mut sources = Vec::new();
    for dir in [bpf.clone(), bpf.join("lib")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("c") | Some("h")) {
                println!("cargo:rerun-if-changed={}", p.display());
                if p.extension().unwrap() == "c" && dir == bpf {
                    sources.push(p);
                }
            }
        }
    }
    sources.sort();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        compile(&clang, &bpf, src, &out.join(format!("{stem}.o")));
    }
}

fn compile(clang: &str, include: &Path, src: &Path, obj: &Path) {
    let status = Command::new(clang)
        .args(["-g", "-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", include.display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj)
        .status()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
}
