//! The ABI check: every struct, enum and constant mirrored in cilium-abi
//! matches the compiled object's BTF and the header. No root needed.

use cilium_abi::btf::Btf;
use object::{Object, ObjectSection};

fn btf() -> Btf {
    let obj = object::File::parse(cilium_datapath::BPF_LXC).expect("parse ELF");
    let sec = obj.section_by_name(".BTF").expect(".BTF section");
    Btf::parse(sec.data().expect("BTF data")).expect("parse BTF")
}

#[test]
fn struct_layouts_match_btf() {
    let btf = btf();
    for (name, size, fields) in cilium_abi::all_layouts() {
        let (btf_size, members) = btf.struct_by_name(name).unwrap_or_else(|| panic!("struct {name} not in BTF"));
        assert_eq!(btf_size, size, "size of struct {name}");
        assert_eq!(members.len(), fields.len(), "member count of struct {name}");
        for ((fname, off, fsize), m) in fields.iter().zip(members) {
            assert_eq!(m.name, *fname, "member order of struct {name}");
            assert_eq!(m.offset_bytes, *off, "offset of {name}.{fname}");
            let btf_fsize = btf.size_of(m.type_id).unwrap_or_else(|| panic!("size of {name}.{fname}"));
            assert_eq!(btf_fsize, *fsize, "size of {name}.{fname}");
        }
    }
}

#[test]
fn enum_values_match_btf() {
    let btf = btf();
    for (name, variants) in cilium_abi::all_enums() {
        let values = btf.enum_by_name(name).unwrap_or_else(|| panic!("enum {name} not in BTF"));
        let mut c: Vec<(String, i64)> = values.to_vec();
        let mut r: Vec<(String, i64)> = variants.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        c.sort();
        r.sort();
        assert_eq!(c, r, "values of enum {name}");
    }
}

#[test]
fn defines_match_header() {
    let header = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../bpf/lib/abi.h")).unwrap();
    for (name, value) in cilium_abi::all_defines() {
        let line = header
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
            .unwrap_or_else(|| panic!("#define {name} not in abi.h"));
        let text = line.split_whitespace().nth(2).unwrap();
        let v: i64 = match text.strip_prefix("0x") {
            Some(hex) => i64::from_str_radix(hex, 16).unwrap(),
            None => text.parse().unwrap(),
        };
        assert_eq!(v, value, "#define {name}");
    }
}
