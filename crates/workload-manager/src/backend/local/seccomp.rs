//! The syscall filter of every local sandbox, modelled on the default Docker/OCI profile's list of
//! blocked calls: no new namespaces (so no nested user namespace, the usual first step of a
//! kernel exploit), no mounts, keyrings, BPF, perf events, kernel modules, reboot, clock or swap
//! changes, `userfaultfd`, `io_uring` or handle-based opens. Everything else is allowed, so normal
//! programs (Python, compilers, package managers, `ptrace`-based debuggers inside the sandbox)
//! keep working. Calls of another architecture (32-bit `int 0x80`) kill the process.
//!
//! One list, two encodings: classic BPF programs (compiled by `seccompiler`) handed to bubblewrap
//! (`--add-seccomp-fd`), and the OCI `linux.seccomp` section gVisor loads (`runsc --oci-seccomp`).

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Calls that fail with `EPERM` (name for the OCI profile, number for BPF).
const DENIED: &[(&str, libc::c_long)] = &[
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("quotactl", libc::SYS_quotactl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("kcmp", libc::SYS_kcmp),
    ("mbind", libc::SYS_mbind),
    ("set_mempolicy", libc::SYS_set_mempolicy),
    ("move_pages", libc::SYS_move_pages),
    ("fanotify_init", libc::SYS_fanotify_init),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    ("ustat", libc::SYS_ustat),
    #[cfg(target_arch = "x86_64")]
    ("sysfs", libc::SYS_sysfs),
    #[cfg(target_arch = "x86_64")]
    ("_sysctl", libc::SYS__sysctl),
    #[cfg(target_arch = "x86_64")]
    ("nfsservctl", libc::SYS_nfsservctl),
];

/// `clone` flags that create namespaces: a `clone` carrying any of them fails with `EPERM`.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// On x86_64 the x32 ABI reaches the same calls with this bit set in the number.
#[cfg(target_arch = "x86_64")]
const X32_BIT: libc::c_long = 0x4000_0000;

fn arch() -> Result<TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| format!("no seccomp filter for {}", std::env::consts::ARCH))
}

/// Each number, and on x86_64 its x32 alias.
fn with_aliases(nr: libc::c_long) -> Vec<i64> {
    #[cfg(target_arch = "x86_64")]
    return vec![nr, nr | X32_BIT];
    #[cfg(not(target_arch = "x86_64"))]
    return vec![nr];
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<Vec<u8>, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(|e| e.to_string())?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| {
        format!("cannot compile the seccomp filter: {e}")
    })?;
    Ok(program
        .iter()
        .flat_map(|i| {
            let mut b = Vec::with_capacity(8);
            b.extend(i.code.to_ne_bytes());
            b.push(i.jt);
            b.push(i.jf);
            b.extend(i.k.to_ne_bytes());
            b
        })
        .collect())
}

/// The filters as raw `struct sock_filter` arrays, for `bwrap --add-seccomp-fd`: the denylist
/// (`EPERM`, including `clone` with namespace flags), and `clone3` answering `ENOSYS` so that
/// libc falls back to `clone`, whose flags the first filter can see (as Docker does).
pub fn bpf_programs() -> Result<Vec<Vec<u8>>, String> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in DENIED {
        for n in with_aliases(*nr) {
            deny.insert(n, vec![]);
        }
    }
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let c = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![c]).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    for n in with_aliases(libc::SYS_clone) {
        deny.insert(n, clone_rules.clone());
    }
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = with_aliases(libc::SYS_clone3)
        .into_iter()
        .map(|n| (n, vec![]))
        .collect();
    Ok(vec![
        compile(deny, libc::EPERM)?,
        compile(clone3, libc::ENOSYS)?,
    ])
}

/// The same filter as an OCI runtime-spec `linux.seccomp` section (for gVisor). `clone3` is
/// left alone: the runsc Debian ships ignores `errnoRet` (so `ENOSYS` would arrive as `EPERM`
/// and break thread creation), and a namespace made through it lives inside gVisor's own
/// user-space kernel, not the host's.
pub fn oci_profile() -> serde_json::Value {
    use serde_json::json;
    let names: Vec<&str> = DENIED.iter().map(|(n, _)| *n).collect();
    let clone_rules = NAMESPACE_FLAGS.iter().map(|f| {
        json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
               "args": [{"index": 0, "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ"}]})
    });
    let mut syscalls =
        vec![json!({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM})];
    syscalls.extend(clone_rules);
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [match std::env::consts::ARCH {
            "aarch64" => "SCMP_ARCH_AARCH64",
            _ => "SCMP_ARCH_X86_64",
        }],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_compile_to_whole_instructions() {
        let progs = bpf_programs().unwrap();
        assert_eq!(progs.len(), 2);
        for p in &progs {
            assert!(!p.is_empty() && p.len() % 8 == 0);
        }
        // The denylist covers every listed call and the clone flag rules.
        assert!(progs[0].len() / 8 > DENIED.len());
    }

    #[test]
    fn the_oci_profile_names_the_same_calls() {
        let p = oci_profile();
        let names = p["syscalls"][0]["names"].as_array().unwrap();
        assert_eq!(names.len(), DENIED.len());
        assert!(names.iter().any(|n| n == "unshare"));
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let last = p["syscalls"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["names"][0], "clone");
        assert_eq!(last["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    }
}
