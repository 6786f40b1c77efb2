//! A minimal reader of BTF (the kernel's BPF Type Format): enough to list the
//! structs and enums of a compiled object and their layouts. Pure parsing,
//! no syscalls; used to check the Rust mirrors against the C definitions.

use std::collections::BTreeMap;

/// Why BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF is truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("bad BTF magic {magic:#x}")]
    BadMagic { magic: u16 },
    #[error("unknown BTF kind {kind} in type {id}")]
    UnknownKind { kind: u32, id: u32 },
}

/// A struct member: name, byte offset, type id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset_bytes: usize,
    pub type_id: u32,
}

/// The types this reader keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    Struct { name: String, size: usize, members: Vec<Member> },
    Enum { name: String, size: usize, values: Vec<(String, i64)> },
    /// Anything with a size (int, typedef target resolved lazily, ...).
    Other { kind: u32, size_or_type: u32, array: Option<(u32, u32)> },
}

/// Parsed BTF.
#[derive(Debug, Default)]
pub struct Btf {
    types: BTreeMap<u32, Type>,
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_ENUM64: u32 = 19;

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn u32(&self, off: usize) -> Result<u32, BtfError> {
        self.bytes
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(BtfError::Truncated { offset: off })
    }
    fn u16(&self, off: usize) -> Result<u16, BtfError> {
        self.bytes
            .get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Truncated { offset: off })
    }
}

impl Btf {
    /// Parses the contents of a `.BTF` ELF section (little endian).
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let r = Reader { bytes };
        let magic = r.u16(0)?;
        if magic != 0xeb9f {
            return Err(BtfError::BadMagic { magic });
        }
        let hdr_len = r.u32(4)? as usize;
        let type_off = r.u32(8)? as usize;
        let type_len = r.u32(12)? as usize;
        let str_off = r.u32(16)? as usize;
        let str_len = r.u32(20)? as usize;
        let types_start = hdr_len + type_off;
        let strs_start = hdr_len + str_off;
        let strings = bytes
            .get(strs_start..strs_start + str_len)
            .ok_or(BtfError::Truncated { offset: strs_start })?;
        let name = |off: u32| -> String {
            let s = &strings[(off as usize).min(strings.len())..];
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };

        let mut btf = Btf::default();
        let mut off = types_start;
        let end = types_start + type_len;
        let mut id = 1u32;
        while off < end {
            let name_off = r.u32(off)?;
            let info = r.u32(off + 4)?;
            let size_or_type = r.u32(off + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            off += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw_offset = r.u32(m + 8)?;
                        let bits = if kflag { raw_offset & 0x00ff_ffff } else { raw_offset };
                        members.push(Member {
                            name: name(r.u32(m)?),
                            offset_bytes: (bits / 8) as usize,
                            type_id: r.u32(m + 4)?,
                        });
                    }
                    off += vlen * 12;
                    Type::Struct { name: name(name_off), size: size_or_type as usize, members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = off + i * 8;
                        let raw = r.u32(v + 4)?;
                        let value = if kflag { raw as i32 as i64 } else { raw as i64 };
                        values.push((name(r.u32(v)?), value));
                    }
                    off += vlen * 8;
                    Type::Enum { name: name(name_off), size: size_or_type as usize, values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = off + i * 12;
                        let lo = r.u32(v + 4)? as u64;
                        let hi = r.u32(v + 8)? as u64;
                        values.push((name(r.u32(v)?), ((hi << 32) | lo) as i64));
                    }
                    off += vlen * 12;
                    Type::Enum { name: name(name_off), size: size_or_type as usize, values }
                }
                KIND_ARRAY => {
                    let elem = r.u32(off)?;
                    let nelems = r.u32(off + 8)?;
                    off += 12;
                    Type::Other { kind, size_or_type, array: Some((elem, nelems)) }
                }
                KIND_INT | 14 | 17 => {
                    off += 4;
                    Type::Other { kind, size_or_type, array: None }
                }
                13 => {
                    off += vlen * 8;
                    Type::Other { kind, size_or_type, array: None }
                }
                15 => {
                    off += vlen * 12;
                    Type::Other { kind, size_or_type, array: None }
                }
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12
                | 16 | 18 => Type::Other { kind, size_or_type, array: None },
                _ => return Err(BtfError::UnknownKind { kind, id }),
            };
            btf.types.insert(id, ty);
            id += 1;
        }
        Ok(btf)
    }

    /// A named struct's size and members.
    pub fn struct_by_name(&self, wanted: &str) -> Option<(usize, &[Member])> {
        self.types.values().find_map(|t| match t {
            Type::Struct { name, size, members } if name == wanted => Some((*size, &members[..])),
            _ => None,
        })
    }

    /// A named enum's values.
    pub fn enum_by_name(&self, wanted: &str) -> Option<&[(String, i64)]> {
        self.types.values().find_map(|t| match t {
            Type::Enum { name, values, .. } if name == wanted => Some(&values[..]),
            _ => None,
        })
    }

    /// The size in bytes of a type, following typedefs and qualifiers.
    pub fn size_of(&self, id: u32) -> Option<usize> {
        self.size_at_depth(id, 0)
    }

    /// Follows at most 32 references in all, through arrays too, so a
    /// malformed object with a reference cycle ends instead of recursing.
    fn size_at_depth(&self, mut id: u32, mut depth: u32) -> Option<usize> {
        while depth < 32 {
            depth += 1;
            match self.types.get(&id)? {
                Type::Struct { size, .. } | Type::Enum { size, .. } => return Some(*size),
                Type::Other { kind: KIND_INT, size_or_type, .. } => return Some(*size_or_type as usize),
                Type::Other { kind: KIND_PTR, .. } => return Some(8),
                Type::Other { array: Some((elem, n)), .. } => {
                    return self.size_at_depth(*elem, depth)?.checked_mul(*n as usize);
                }
                Type::Other { kind: KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT, size_or_type, .. } => {
                    id = *size_or_type;
                }
                Type::Other { .. } => return None,
            }
        }
        None
    }
}
