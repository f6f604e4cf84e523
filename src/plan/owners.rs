//! User and group names from the system databases, as Python's `pwd` and
//! `grp` modules give them to `tarfile.gettarinfo` (used for the
//! customisation layer's member header, which the reference stat's).

use std::ffi::CStr;

/// `pwd.getpwuid(uid)[0]`, or `None` when there is no such user.
pub fn user_name(uid: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: getpwuid_r writes only into `pwd` and `buf`, both owned here
    // and sized as passed; `result` is either null or points at `pwd`.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(CStr::from_ptr(pwd.pw_name).to_bytes().to_vec())
    }
}

/// `grp.getgrgid(gid)[0]`, or `None` when there is no such group.
pub fn group_name(gid: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0 as libc::c_char; 65536];
    // SAFETY: as above, for getgrgid_r.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || grp.gr_name.is_null() {
            return None;
        }
        Some(CStr::from_ptr(grp.gr_name).to_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_is_root() {
        assert_eq!(super::user_name(0).as_deref(), Some(&b"root"[..]));
        assert_eq!(super::group_name(0).as_deref(), Some(&b"root"[..]));
        assert_eq!(super::user_name(3_999_999_999), None);
    }
}
