use std::os::unix::fs::PermissionsExt;

use super::*;

/// A layer blob (gzip when `gz`) from `(path, kind)` entries.
enum E<'a> {
    File(&'a str, &'a str, u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
    Char(&'a str),
}

fn layer(dir: &Path, name: &str, entries: &[E<'_>], gz: bool) -> Layer {
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        for e in entries {
            let mut h = tar::Header::new_gnu();
            match e {
                E::File(p, content, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(content.len() as u64);
                    h.set_mode(*mode);
                    b.append_data(&mut h, p, content.as_bytes()).unwrap();
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Char(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_size(0);
                    h.set_mode(0o666);
                    h.set_device_major(8).unwrap();
                    h.set_device_minor(0).unwrap();
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
            }
        }
        b.finish().unwrap();
    }
    let bytes = if gz {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap()
    } else {
        raw
    };
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    Layer {
        path,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }
}

/// A tar entry path with `..` in it (the tar crate's builder refuses to write one).
fn climbing_layer(dir: &Path) -> Layer {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..14].copy_from_slice(b"../escaped.txt");
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend([b'x']);
    raw.resize(1024 + 1024, 0);
    let path = dir.join("climb");
    fs::write(&path, raw).unwrap();
    Layer {
        path,
        media_type: String::new(),
    }
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = layer(
        tmp.path(),
        "l1",
        &[
            E::Dir("etc"),
            E::File("etc/gone", "1", 0o644),
            E::File("etc/kept", "1", 0o644),
            E::Dir("opt/old"),
            E::File("opt/old/a", "1", 0o644),
            E::Dir("opt/old/sub"),
            E::File("swap", "was a file", 0o644),
        ],
        true,
    );
    let l2 = layer(
        tmp.path(),
        "l2",
        &[
            E::File("etc/.wh.gone", "", 0o644),
            E::File("opt/old/new", "2", 0o644),
            E::File("opt/old/.wh..wh..opq", "", 0o644),
            E::Dir("swap"),
            E::File("swap/inside", "now a dir", 0o644),
            E::File("etc/kept", "2", 0o644),
        ],
        false,
    );
    let target = tmp.path().join("rootfs");
    build_rootfs(tmp.path(), &target, &[l1, l2], None).unwrap();
    assert!(!target.join("etc/gone").exists(), "whiteout");
    assert_eq!(fs::read_to_string(target.join("etc/kept")).unwrap(), "2");
    let mut old: Vec<_> = fs::read_dir(target.join("opt/old"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    old.sort();
    assert_eq!(
        old,
        ["new"],
        "opaque: lower entries gone, this layer's kept"
    );
    assert_eq!(
        fs::read_to_string(target.join("swap/inside")).unwrap(),
        "now a dir"
    );
    // Mount points, and no partial directory left.
    for d in MOUNT_DIRS {
        assert!(
            fs::symlink_metadata(target.join(d)).unwrap().is_dir(),
            "{d}"
        );
    }
    assert!(target.join("etc/resolv.conf").is_file());
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn hostile_layers_never_touch_anything_outside_the_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("host");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), "host file").unwrap();
    fs::write(outside.join("passwd"), "host passwd").unwrap();
    let host = outside.to_str().unwrap();
    let l1 = layer(
        tmp.path(),
        "l1",
        &[
            E::Link("evil", host),
            E::Dir("etc"),
            E::Link("etc/passwd", &format!("{host}/passwd")),
            E::Link("etc/resolv.conf", &format!("{host}/keep")),
            E::Link("root", host),
        ],
        true,
    );
    // Whiteouts and a file through the symlinked directory; a file over the symlinked file.
    let l2 = layer(
        tmp.path(),
        "l2",
        &[
            E::File("evil/.wh.keep", "", 0o644),
            E::File("evil/.wh..wh..opq", "", 0o644),
            E::File("etc/passwd", "image passwd", 0o644),
        ],
        true,
    );
    let target = tmp.path().join("rootfs");
    build_rootfs(tmp.path(), &target, &[l1, l2], None).unwrap();
    assert_eq!(
        fs::read_to_string(outside.join("keep")).unwrap(),
        "host file"
    );
    assert_eq!(
        fs::read_to_string(outside.join("passwd")).unwrap(),
        "host passwd"
    );
    // The file replaced the symlink; mount points replaced symlinks with real entries.
    assert_eq!(
        fs::read_to_string(target.join("etc/passwd")).unwrap(),
        "image passwd"
    );
    assert!(fs::symlink_metadata(target.join("root")).unwrap().is_dir());
    assert!(
        fs::symlink_metadata(target.join("etc/resolv.conf"))
            .unwrap()
            .is_file()
    );

    // An entry through the absolute symlink is refused (the whole image fails, nothing kept).
    let l3 = layer(
        tmp.path(),
        "l3",
        &[E::File("evil/planted", "x", 0o644)],
        true,
    );
    let other = tmp.path().join("rootfs2");
    let err = build_rootfs(tmp.path(), &other, std::slice::from_ref(&l3), None);
    let l1b = layer(tmp.path(), "l1b", &[E::Link("evil", host)], true);
    let err2 =
        build_rootfs(tmp.path(), &tmp.path().join("rootfs2b"), &[l1b, l3], None).unwrap_err();
    assert!(err.is_ok(), "evil/ as a plain directory is fine: {err:?}");
    assert!(!outside.join("planted").exists());
    assert!(err2.to_string().contains("outside"), "{err2}");
    // `..` entries are skipped.
    let third = tmp.path().join("rootfs3");
    build_rootfs(tmp.path(), &third, &[climbing_layer(tmp.path())], None).unwrap();
    assert!(!tmp.path().join("escaped.txt").exists());
}

#[test]
fn set_id_bits_devices_and_ownership_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layer(
        tmp.path(),
        "l",
        &[
            E::File("usr/bin/su", "binary", 0o4755),
            E::File("usr/bin/wall", "binary", 0o2755),
            E::Char("dev-sda"),
        ],
        true,
    );
    let target = tmp.path().join("rootfs");
    build_rootfs(tmp.path(), &target, &[l], None).unwrap();
    for f in ["usr/bin/su", "usr/bin/wall"] {
        let mode = fs::metadata(target.join(f)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{f}");
    }
    assert!(fs::symlink_metadata(target.join("dev-sda")).is_err());
    let me = nix::unistd::Uid::effective().as_raw();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(target.join("usr/bin/su")).unwrap().uid(), me);
    let root_mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(root_mode, 0o755);
}

#[test]
fn zstd_layers_unpack_across_frames_and_skippable_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = layer(
        tmp.path(),
        "plain",
        &[
            E::Dir("etc"),
            E::File("etc/a", "first", 0o644),
            E::File("etc/b", "second", 0o600),
        ],
        false,
    );
    let raw = fs::read(&plain.path).unwrap();
    // Two frames split inside `etc/a`'s header (at 512..1024), a skippable frame between them
    // (zstd:chunked writes its table of contents in one).
    let mut z = zstd::encode_all(&raw[..700], 1).unwrap();
    z.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, b't', b'o', b'c']);
    z.extend(zstd::encode_all(&raw[700..], 1).unwrap());
    let path = tmp.path().join("z");
    fs::write(&path, &z).unwrap();
    let l = Layer {
        path,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
    };
    let target = tmp.path().join("rootfs");
    build_rootfs(tmp.path(), &target, &[l], None).unwrap();
    assert_eq!(fs::read_to_string(target.join("etc/a")).unwrap(), "first");
    assert_eq!(fs::read_to_string(target.join("etc/b")).unwrap(), "second");
}

#[test]
fn a_corrupt_zstd_layer_fails_and_leaves_no_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("z");
    let mut z = zstd::encode_all(&[7u8; 4096][..], 1).unwrap();
    let end = z.len() - 1;
    z[8..end].fill(0xff);
    fs::write(&path, z).unwrap();
    let l = Layer {
        path,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
    };
    let err = build_rootfs(tmp.path(), &tmp.path().join("r"), &[l], None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("layer z (application/vnd.oci.image.layer.v1.tar+zstd): "),
        "{err}"
    );
    assert!(!tmp.path().join("r").exists());
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "only the blob: {left:?}");
}

#[test]
fn an_image_unpacking_past_its_limit_fails_and_leaves_no_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let big = "x".repeat(64 * 1024);
    let l1 = layer(tmp.path(), "l1", &[E::File("a", &big, 0o644)], true);
    let l2 = layer(tmp.path(), "l2", &[E::File("b", &big, 0o644)], true);
    // Each layer alone fits; together they do not (the limit is the image's, not a layer's).
    let limit = Some(100 * 1024);
    let target = tmp.path().join("one");
    build_rootfs(tmp.path(), &target, std::slice::from_ref(&l1), limit).unwrap();
    let err = build_rootfs(tmp.path(), &tmp.path().join("r"), &[l1, l2], limit).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::FileTooLarge, "{err}");
    assert!(err.to_string().contains("102400 bytes"), "{err}");
    assert!(!tmp.path().join("r").exists());
    let partials = fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .count();
    assert_eq!(partials, 0);
}
