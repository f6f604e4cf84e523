//! Tar headers, byte for byte as CPython 3.11's `tarfile` writes them in
//! `PAX_FORMAT` (its default), because nixpkgs' `stream_layered_image.py` is
//! built on `tarfile` and our layer digests must equal its digests.
//!
//! This module owns every byte of a member header: the optional pax extended
//! header (`././@PaxHeader`, type `x`) that `tarfile` prepends when a name,
//! link target or owner name does not fit ustar or is not ASCII, or a number
//! does not fit its octal field; then the ustar block itself.  It also owns the
//! block and record padding rules (`tarfile.TarFile.addfile` / `close`).
//! Names are raw bytes, the way Python holds them after `surrogateescape`
//! decoding, so invalid UTF-8 survives exactly.

/// A tar block.
pub const BLOCK: usize = 512;
/// `tarfile.RECORDSIZE`: an archive is padded to a multiple of this on close.
pub const RECORD: usize = 20 * BLOCK;

/// Type flags used by `tarfile`.
pub mod typeflag {
    pub const REGULAR: u8 = b'0';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIRECTORY: u8 = b'5';
    pub const FIFO: u8 = b'6';
    pub const PAX: u8 = b'x';
}

/// Everything that goes into one member's header(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// The member name as raw bytes; `/` is appended for directories, as
    /// `TarInfo.get_info` does.
    pub name: &'a [u8],
    /// Permission bits; masked with `0o7777` like `TarInfo.get_info`.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Seconds since the epoch; negative values go to a pax record.
    pub mtime: i64,
    pub typeflag: u8,
    pub linkname: &'a [u8],
    pub uname: &'a [u8],
    pub gname: &'a [u8],
    /// Only written for character and block devices (CPython >= 3.11.4).
    pub devmajor: u64,
    pub devminor: u64,
    /// Pax records the member already carries (a base image's member read
    /// back by `tarfile`); they come first and take priority, as in
    /// `TarInfo.create_pax_header`.
    pub pax: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> Header<'a> {
    /// A regular-file header with `tarfile.TarInfo`'s defaults (mode 0644,
    /// owner 0/0, empty owner names): what `TarInfo(path)` gives.
    pub fn plain_file(name: &'a [u8], size: u64, mtime: i64) -> Self {
        Header {
            name,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime,
            typeflag: typeflag::REGULAR,
            linkname: b"",
            uname: b"",
            gname: b"",
            devmajor: 0,
            devminor: 0,
            pax: &[],
        }
    }
}

/// Appends the header block(s) for `h` to `out`: a pax header and its
/// records when needed, then the ustar block.
pub fn encode(h: &Header<'_>, out: &mut Vec<u8>) {
    let mut name_buf;
    let mut name = h.name;
    // TarInfo.get_info: directories get a trailing slash.
    if h.typeflag == typeflag::DIRECTORY && !name.ends_with(b"/") {
        name_buf = Vec::with_capacity(name.len() + 1);
        name_buf.extend_from_slice(name);
        name_buf.push(b'/');
        name = &name_buf[..];
    }

    // Existing records first (dict copy), then new keys in tarfile's order.
    let mut pax: Vec<(&[u8], std::borrow::Cow<'_, [u8]>)> =
        h.pax.iter().map(|(k, v)| (k.as_slice(), std::borrow::Cow::Borrowed(v.as_slice()))).collect();
    let has = |pax: &Vec<(&[u8], std::borrow::Cow<'_, [u8]>)>, key: &[u8]| pax.iter().any(|(k, _)| *k == key);

    // String fields: pax when not ASCII or longer than the ustar field.
    for (value, key, limit) in [
        (name, &b"path"[..], 100usize),
        (h.linkname, b"linkpath", 100),
        (h.uname, b"uname", 32),
        (h.gname, b"gname", 32),
    ] {
        if has(&pax, key) {
            continue;
        }
        if !value.is_ascii() || value.len() > limit {
            pax.push((key, std::borrow::Cow::Borrowed(value)));
        }
    }

    // Number fields: pax (and 0 in the ustar field) when out of range.
    let fits = |v: i128, digits: u32| 0 <= v && v < 8i128.pow(digits - 1);
    let mut nums = [
        (&b"uid"[..], h.uid as i128, 8u32),
        (b"gid", h.gid as i128, 8),
        (b"size", h.size as i128, 12),
        (b"mtime", h.mtime as i128, 12),
    ];
    for (key, value, digits) in nums.iter_mut() {
        if !fits(*value, *digits) {
            if !has(&pax, key) {
                pax.push((key, std::borrow::Cow::Owned(value.to_string().into_bytes())));
            }
            *value = 0;
        }
    }

    if !pax.is_empty() {
        let records = pax_records(&pax);
        let pax_header = Header {
            name: b"././@PaxHeader", // tarfile's hardcoded name, like star's
            mode: 0,
            uid: 0,
            gid: 0,
            size: records.len() as u64,
            mtime: 0,
            typeflag: typeflag::PAX,
            linkname: b"",
            uname: b"",
            gname: b"",
            devmajor: 0,
            devminor: 0,
            pax: &[],
        };
        ustar_block(&pax_header, pax_header.name, [0, 0, records.len() as u64, 0], out);
        out.extend_from_slice(&records);
        pad_block(out);
    }
    let [uid, gid, size, mtime] = nums.map(|(_, v, _)| v as u64);
    ustar_block(h, name, [uid, gid, size, mtime], out);
}

/// Encodes pax records `"%d %s=%s\n"`, where the length counts itself, with
/// `hdrcharset=BINARY` first when any value is not valid UTF-8 (what
/// `_create_pax_generic_header` does for surrogate-escaped names).
fn pax_records(pax: &[(&[u8], std::borrow::Cow<'_, [u8]>)]) -> Vec<u8> {
    let mut records = Vec::new();
    if pax.iter().any(|(_, v)| std::str::from_utf8(v).is_err()) {
        records.extend_from_slice(b"21 hdrcharset=BINARY\n");
    }
    for (key, value) in pax {
        let l = key.len() + value.len() + 3; // ' ' + '=' + '\n'
        let mut p = 0usize;
        loop {
            let n = l + decimal_len(p);
            if n == p {
                break;
            }
            p = n;
        }
        records.extend_from_slice(p.to_string().as_bytes());
        records.push(b' ');
        records.extend_from_slice(key);
        records.push(b'=');
        records.extend_from_slice(value);
        records.push(b'\n');
    }
    records
}

fn decimal_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// One ustar block (`TarInfo._create_header` with `USTAR_FORMAT`, encoding
/// "ascii", errors "replace"). `nums` are uid, gid, size, mtime after the
/// pax overflow rule.
fn ustar_block(h: &Header<'_>, name: &[u8], nums: [u64; 4], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + BLOCK, 0);
    let b = &mut out[start..start + BLOCK];
    put_str(&mut b[0..100], name);
    put_octal(&mut b[100..108], u64::from(h.mode & 0o7777));
    put_octal(&mut b[108..116], nums[0]);
    put_octal(&mut b[116..124], nums[1]);
    put_octal(&mut b[124..136], nums[2]);
    put_octal(&mut b[136..148], nums[3]);
    b[148..156].copy_from_slice(b"        ");
    b[156] = h.typeflag;
    put_str(&mut b[157..257], h.linkname);
    b[257..265].copy_from_slice(b"ustar\x0000"); // POSIX_MAGIC
    put_str(&mut b[265..297], h.uname);
    put_str(&mut b[297..329], h.gname);
    // CPython 3.11.4+ leaves the device fields empty for non-devices.
    if h.typeflag == typeflag::CHAR || h.typeflag == typeflag::BLOCK {
        put_octal(&mut b[329..337], h.devmajor);
        put_octal(&mut b[337..345], h.devminor);
    }
    // prefix (345..500) stays empty: tarfile never splits names in PAX mode.
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    // "%06o\0" then the field's eighth byte stays a space.
    put_octal(&mut b[148..155], u64::from(sum));
}

/// `stn(s, length, "ascii", "replace")`: each non-ASCII *character* becomes
/// one `?` (an invalid UTF-8 byte is one surrogate-escaped character), then
/// the result is truncated to the field.
fn put_str(field: &mut [u8], s: &[u8]) {
    if s.is_ascii() {
        let n = s.len().min(field.len());
        field[..n].copy_from_slice(&s[..n]);
        return;
    }
    let mut i = 0;
    for chunk in s.utf8_chunks() {
        for c in chunk.valid().chars() {
            if i == field.len() {
                return;
            }
            field[i] = if c.is_ascii() { c as u8 } else { b'?' };
            i += 1;
        }
        for _ in chunk.invalid() {
            if i == field.len() {
                return;
            }
            field[i] = b'?';
            i += 1;
        }
    }
}

/// `itn(n, digits)`: zero-padded octal with a trailing NUL. Callers have
/// already replaced values that do not fit with 0.
fn put_octal(field: &mut [u8], mut n: u64) {
    let digits = field.len() - 1;
    debug_assert!(n < 8u64.pow(digits as u32), "octal overflow");
    for d in field[..digits].iter_mut().rev() {
        *d = b'0' + (n & 7) as u8;
        n >>= 3;
    }
    field[digits] = 0;
}

/// Pads `out` with NULs to a block boundary (member data padding).
pub fn pad_block(out: &mut Vec<u8>) {
    let rem = out.len() % BLOCK;
    if rem != 0 {
        out.resize(out.len() + BLOCK - rem, 0);
    }
}

/// Number of NUL bytes that follow `size` bytes of member data.
pub fn data_padding(size: u64) -> usize {
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 {
        0
    } else {
        BLOCK - rem
    }
}

/// Number of NUL bytes `TarFile.close` writes after `offset` bytes of
/// members: two zero blocks, then zeros to a multiple of `RECORD`.
pub fn end_of_archive_len(offset: u64) -> usize {
    let after = offset + 2 * BLOCK as u64;
    let rem = (after % RECORD as u64) as usize;
    2 * BLOCK + if rem == 0 { 0 } else { RECORD - rem }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &[u8]) -> Header<'_> {
        Header {
            typeflag: typeflag::DIRECTORY,
            mode: 0o755,
            uname: b"root",
            gname: b"root",
            mtime: 1,
            ..Header::plain_file(name, 0, 1)
        }
    }

    fn one(h: &Header<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(h, &mut v);
        v
    }

    #[test]
    fn nix_root_dir_matches_reference_block() {
        // The first 512 bytes of every golden layer: "/nix/" with mode 0755.
        let b = one(&dir(b"/nix"));
        assert_eq!(b.len(), 512);
        assert_eq!(&b[0..6], b"/nix/\0");
        assert_eq!(&b[100..108], b"0000755\0");
        assert_eq!(&b[108..116], b"0000000\0");
        assert_eq!(&b[124..136], b"00000000000\0");
        assert_eq!(&b[136..148], b"00000000001\0");
        assert_eq!(&b[148..156], b"010433\0 ");
        assert_eq!(b[156], b'5');
        assert_eq!(&b[257..265], b"ustar\x0000");
        assert_eq!(&b[265..270], b"root\0");
        assert_eq!(&b[297..302], b"root\0");
        assert!(b[329..512].iter().all(|&x| x == 0));
    }

    #[test]
    fn checksum_field_is_six_octal_nul_space() {
        let b = one(&Header::plain_file(b"a", 1, 0));
        let sum: u32 = b[..148].iter().chain(b"        ").chain(&b[156..]).map(|&x| u32::from(x)).sum();
        assert_eq!(&b[148..156], format!("{sum:06o}\0 ").as_bytes());
    }

    #[test]
    fn mode_is_masked_to_permission_bits() {
        let mut h = Header::plain_file(b"f", 0, 0);
        h.mode = 0o104755;
        assert_eq!(&one(&h)[100..108], b"0004755\0");
    }

    #[test]
    fn name_of_exactly_100_bytes_fits_ustar() {
        let name = vec![b'n'; 100];
        let b = one(&Header::plain_file(&name, 0, 0));
        assert_eq!(b.len(), 512);
        assert_eq!(&b[0..100], &name[..]);
    }

    #[test]
    fn long_name_gets_pax_path_and_truncated_ustar_name() {
        let name = vec![b'n'; 101];
        let b = one(&Header::plain_file(&name, 0, 0));
        assert_eq!(b.len(), 3 * 512);
        assert_eq!(&b[0..15], b"././@PaxHeader\0");
        assert_eq!(b[156], b'x');
        assert_eq!(&b[100..108], b"0000000\0");
        assert!(b[265..297].iter().all(|&x| x == 0), "pax header has no uname");
        let rec = format!("111 path={}\n", "n".repeat(101));
        assert_eq!(&b[124..136], format!("{:011o}\0", rec.len()).as_bytes());
        assert_eq!(&b[512..512 + rec.len()], rec.as_bytes());
        assert_eq!(&b[1024..1124], &name[..100]);
    }

    #[test]
    fn directory_slash_counts_towards_the_limit() {
        let name = vec![b'd'; 100];
        let b = one(&dir(&name));
        assert_eq!(b[156], b'x', "101 bytes with the slash: pax");
    }

    #[test]
    fn pax_record_length_counts_its_own_digits() {
        // l = 4 + 92 + 3 = 99 -> "99" would make 101, so the length is 102.
        let v = [b'v'; 92];
        let r = pax_records(&[(&b"path"[..], std::borrow::Cow::Borrowed(&v[..]))]);
        assert_eq!(r.len(), 102);
        assert!(r.starts_with(b"102 path="));
    }

    #[test]
    fn non_ascii_name_is_pax_and_question_marks_per_character() {
        let name = "/a/h\u{e9}llo".as_bytes();
        let b = one(&Header::plain_file(name, 0, 0));
        assert_eq!(b.len(), 3 * 512);
        assert_eq!(&b[1024..1032], b"/a/h?llo");
        assert!(!b[512..1024].windows(9).any(|w| w == b"hdrcharset"));
    }

    #[test]
    fn invalid_utf8_name_is_binary_pax_one_question_mark_per_byte() {
        let name = b"/bad-\xff\xfe-name";
        let b = one(&Header::plain_file(name, 0, 0));
        let rec = &b[512..1024];
        assert!(rec.starts_with(b"21 hdrcharset=BINARY\n"));
        assert!(rec[21..].starts_with(b"21 path=/bad-\xff\xfe-name\n"));
        assert_eq!(&b[1024..1024 + 13], b"/bad-??-name\0");
    }

    #[test]
    fn long_symlink_target_gets_linkpath() {
        let target = vec![b't'; 150];
        let mut h = Header::plain_file(b"/l", 0, 0);
        h.typeflag = typeflag::SYMLINK;
        h.linkname = &target;
        let b = one(&h);
        assert!(b[512..].starts_with(b"164 linkpath="));
        assert_eq!(&b[1024 + 157..1024 + 257], &target[..100]);
    }

    #[test]
    fn uid_too_large_goes_to_pax_and_zero() {
        let mut h = Header::plain_file(b"f", 0, 0);
        h.uid = 2_097_152; // 8**7
        let b = one(&h);
        assert!(b[512..].starts_with(b"15 uid=2097152\n"));
        assert_eq!(&b[1024 + 108..1024 + 116], b"0000000\0");
        h.uid = 2_097_151;
        assert_eq!(one(&h).len(), 512);
    }

    #[test]
    fn owner_names_over_32_or_non_ascii_go_to_pax_in_order() {
        let mut h = Header::plain_file(b"f", 0, 0);
        h.uname = b"a-user-name-longer-than-thirty-two-chars";
        h.gname = "g\u{e9}".as_bytes();
        let b = one(&h);
        let rec = &b[512..1024];
        let text = String::from_utf8_lossy(rec);
        let u = text.find("uname=").unwrap();
        let g = text.find("gname=").unwrap();
        assert!(u < g);
        assert_eq!(&b[1024 + 265..1024 + 297], b"a-user-name-longer-than-thirty-t");
        assert_eq!(&b[1024 + 297..1024 + 300], b"g?\0");
    }

    #[test]
    fn size_over_8gib_goes_to_pax() {
        let h = Header::plain_file(b"big", 8 << 30, 0);
        let b = one(&h);
        assert!(b[512..].starts_with(b"19 size=8589934592\n"));
        assert_eq!(&b[1024 + 124..1024 + 136], b"00000000000\0");
    }

    #[test]
    fn negative_mtime_goes_to_pax() {
        let h = Header::plain_file(b"f", 0, -5);
        assert!(one(&h)[512..].starts_with(b"12 mtime=-5\n"));
    }

    #[test]
    fn existing_pax_records_come_first_and_win() {
        let pax = vec![(b"path".to_vec(), b"original".to_vec())];
        let name = vec![b'n'; 120];
        let mut h = Header::plain_file(&name, 0, 0);
        h.pax = &pax;
        let b = one(&h);
        assert!(b[512..].starts_with(b"17 path=original\n"));
        assert!(!b[512 + 17..1024].windows(5).any(|w| w == b"path="));
    }

    #[test]
    fn device_fields_only_for_devices() {
        let mut h = Header::plain_file(b"dev", 0, 0);
        h.typeflag = typeflag::CHAR;
        h.devmajor = 1;
        h.devminor = 3;
        let b = one(&h);
        assert_eq!(&b[329..345], b"0000001\x000000003\0");
    }

    #[test]
    fn padding_rules() {
        assert_eq!(data_padding(0), 0);
        assert_eq!(data_padding(1), 511);
        assert_eq!(data_padding(512), 0);
        assert_eq!(end_of_archive_len(0), RECORD);
        assert_eq!(end_of_archive_len(512), RECORD - 512);
        assert_eq!(end_of_archive_len(RECORD as u64 - 1024), 1024);
        // Regression: the largest end padding is two blocks plus a record
        // less one block (10752 bytes), more than one record.
        let max = (0..RECORD as u64 / 512).map(|b| end_of_archive_len(b * 512)).max().unwrap();
        assert_eq!(max, RECORD + BLOCK);
    }
}
